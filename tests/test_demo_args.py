"""The demo's command line (README command 1): bad numbers are refused by name before any data is loaded."""
from __future__ import annotations

import pytest

from fgsgd_cuda import demo


@pytest.mark.parametrize("argv,message", [
    (["--epochs", "0"], "--epochs: must be at least 1, got 0"),
    (["--seeds", "0"], "--seeds: must be at least 1, got 0"),
    (["--batch-size", "-2"], "--batch-size: must be at least 1, got -2"),
    (["--lr", "nan"], "--lr: must be a finite number > 0, got nan"),
    (["--manifold-lr", "0"], "--manifold-lr: must be a finite number > 0, got 0.0"),
    (["--momentum", "-0.5"], "--momentum: must be a finite number >= 0, got -0.5"),
    (["--device", "bogus"], "--device: cannot use 'bogus'"),
])
def test_bad_arguments_are_refused(argv, message, capsys, monkeypatch):
    monkeypatch.setattr(demo, "load_data", lambda device: pytest.fail("loaded data despite a bad argument"))
    with pytest.raises(SystemExit) as exc:
        demo.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
