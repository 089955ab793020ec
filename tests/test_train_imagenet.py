"""fgsgd_cuda.train_imagenet on the CPU: the tiny CNN on synthetic 16×16 images, in-process (a world of one) and
as two gloo ranks; resume is bitwise exact; the torchvision models skip where torchvision does not import."""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from torch import nn

from conftest import compile_unusable, run_ranks
from fgsgd_cuda import FGSGD, codes as C, manifolds as M
from fgsgd_cuda import train_imagenet as T
from fgsgd_cuda.imagenet_data import SyntheticImages
from fgsgd_cuda.imagenet_models import SE_RESNETS, SEModule, build_model
from fgsgd_cuda.imagenet_optim import lr_factor

pytestmark = pytest.mark.usefixtures("one_thread")

VAL_SIZE = 37  # odd: the two ranks' validation shards are 19 and 18 images
TINY = ["--arch", "tiny", "--synthetic", "--image-size", "16", "--num-classes", "10", "--synthetic-size", "96",
        "--synthetic-val-size", str(VAL_SIZE), "--batch-size", "16", "--workers", "0", "--print-freq", "1000",
        "--lr", "1.0", "--warmup-epochs", "0.5", "--device", "cpu"]
FG = TINY + ["--manifold-lr", "8.0"]  # FG-SGD: 8× the lr on the manifold groups
LOG_KEYS = {"epoch", "train_loss", "val_loss", "val_top1", "val_top5", "val_images", "lr", "manifold_lr", "step_ms",
            "images_per_s", "world_size", "arch", "optimizer"}


def read_log(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def assert_on_manifolds(opt: FGSGD) -> set[str]:
    """Every manifold component ω = p/R meets the paper's Table 1 to 1e-5; returns the kinds seen."""
    kinds = set()
    for _, p, st in opt.manifold_params():
        w = opt.components(p).detach().double() / opt.rescale(p).double().view(-1, 1, 1)
        codes = opt.codes(p)
        for code in torch.unique(codes).tolist():
            kind = C.manifold_of(code)
            kinds.add(kind)
            x = w[codes == code]
            fro, spectral, _ = M.norms(x).unbind(-1)
            assert float((fro - M.table1_norms(kind, st["shape"][1])["frobenius"]).abs().max()) < 1e-5, kind
            if kind == "stiefel":
                assert float((spectral - 1).abs().max()) < 1e-5
            if kind == "oblique":
                assert float((x.norm(dim=-2) - 1).abs().max()) < 1e-5
    return kinds


def test_fgsgd_two_epochs_log_checkpoint_and_manifolds(tmp_path):
    log = tmp_path / "log.jsonl"
    out = T.main(FG + ["--epochs", "2", "--max-steps-per-epoch", "4", "--output", str(tmp_path / "run"),
                       "--log-file", str(log), "--renorm", "running", "--row-view", "--time-step"])
    records = read_log(log)
    assert len(records) == 2 and [r["epoch"] for r in records] == [1, 2]
    for r in records:
        assert LOG_KEYS <= set(r), LOG_KEYS - set(r)
        assert math.isfinite(r["train_loss"]) and math.isfinite(r["val_loss"]) and r["step_ms"] > 0
        assert r["train_images"] == 4 * 16 and r["val_images"] == VAL_SIZE and r["world_size"] == 1
        assert 0 <= r["val_top1"] <= r["val_top5"] <= 100
        assert r["manifold_lr"] == pytest.approx(8 * r["lr"])  # both follow the schedule from their own base
    assert records == out["history"]
    opt = out["optimizer"]
    assert {"sphere", "oblique", "stiefel"} <= assert_on_manifolds(opt)
    # the Renormalizer set R = γ/λ after each epoch; the row view put the classifier's rows on manifolds
    assert any(not torch.equal(opt.rescale(p), torch.ones_like(opt.rescale(p))) for _, p, _ in opt.manifold_params())
    assert any(p is out["model"].fc.weight for _, p, _ in opt.manifold_params())
    # weight decay only on the Euclidean group(s)
    assert all((g["weight_decay"] == 0) == bool(g["manifolds"]) for g in opt.param_groups)
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and set(ckpt) >= {"model", "optimizer", "scheduler", "scaler", "args", "renorm"}
    for k, v in out["model"].state_dict().items():
        assert torch.equal(v, ckpt["model"][k]), k


def test_resume_is_exact(tmp_path):
    common = FG + ["--epochs", "2", "--nesterov", "--group-clip", "1.0", "--renorm", "running",
                   "--retraction", "stiefel=cayley,sphere=exp", "--stabilize", "3"]
    run_a = ["--output", str(tmp_path / "a"), "--log-file", str(tmp_path / "a.jsonl")]
    run_b = ["--output", str(tmp_path / "b"), "--log-file", str(tmp_path / "b.jsonl")]
    straight = T.main(common + run_a)
    first = T.main(common + run_b + ["--stop-after", "1"])  # an interrupted run: epoch 1 of 2
    assert [r["epoch"] for r in first["history"]] == [1]
    resumed = T.main(common + run_b + ["--resume", "auto"])
    assert [r["epoch"] for r in resumed["history"]] == [2]
    a, b = straight["model"].state_dict(), resumed["model"].state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not torch.equal(a["features.0.weight"], first["model"].state_dict()["features.0.weight"])
    for pa, pb in zip(straight["model"].parameters(), resumed["model"].parameters()):
        sa, sb = straight["optimizer"].state[pa], resumed["optimizer"].state[pb]
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    drop = ("epoch_s", "images_per_s", "step_ms")
    la, lb = read_log(tmp_path / "a.jsonl"), read_log(tmp_path / "b.jsonl")
    assert [{k: v for k, v in r.items() if k not in drop} for r in la] == \
        [{k: v for k, v in r.items() if k not in drop} for r in lb]


def _rank_entry(rank: int, world: int, port: int, argv: list[str], out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    res = T.main(argv)
    torch.save({"model": res["model"].state_dict(), "history": res["history"]}, os.path.join(out_dir, f"r{rank}.pt"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo")
@pytest.mark.parametrize("layout", [[], ["--channels-last"]], ids=["contiguous", "channels-last"])
def test_two_gloo_ranks(tmp_path, layout):
    argv = FG + layout + ["--epochs", "2", "--max-steps-per-epoch", "2", "--output", str(tmp_path / "run"),
                          "--log-file", str(tmp_path / "log.jsonl")]
    port = _free_port()
    run_ranks(_rank_entry, 2, lambda r: (r, 2, port, argv, str(tmp_path)), tmp_path)
    res = [torch.load(tmp_path / f"r{r}.pt", weights_only=True) for r in range(2)]
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    for k, v in ckpt["model"].items():  # parameters and (broadcast) batch-norm statistics
        assert torch.equal(v, res[0]["model"][k]) and torch.equal(v, res[1]["model"][k]), k
    assert res[0]["history"] == res[1]["history"] == read_log(tmp_path / "log.jsonl")
    last = res[0]["history"][-1]
    assert last["world_size"] == 2 and last["global_batch"] == 32 and last["train_images"] == 2 * 2 * 16
    assert last["val_images"] == VAL_SIZE  # every image once: the shards are not padded
    # the logged metrics are those of the whole validation set with rank 0's model
    model = build_model("tiny", 10)
    model.load_state_dict(ckpt["model"])
    model.eval()
    val = SyntheticImages(VAL_SIZE, 16, 10, seed=0, split=1)
    x = torch.stack([val[i][0] for i in range(VAL_SIZE)])
    y = torch.tensor([val[i][1] for i in range(VAL_SIZE)])
    with torch.no_grad():
        logits = model(x)
    top5 = logits.topk(5, dim=1).indices == y[:, None]
    assert last["val_top1"] == pytest.approx(100 * top5[:, 0].double().mean().item(), abs=1e-9)
    assert last["val_top5"] == pytest.approx(100 * top5.any(1).double().mean().item(), abs=1e-9)
    assert last["val_loss"] == pytest.approx(nn.functional.cross_entropy(logits, y).item(), rel=1e-5)


def test_sgd_baseline_bf16_channels_last(tmp_path):
    out = T.main(TINY + ["--optimizer", "sgd", "--epochs", "1", "--max-steps-per-epoch", "3", "--no-wd-bn-bias",
                         "--amp", "bf16", "--channels-last", "--schedule", "step", "--lr-steps", "1"])
    model, opt = out["model"], out["optimizer"]
    assert type(opt) is torch.optim.SGD and math.isfinite(out["history"][0]["train_loss"])
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0
    assert all(p.dim() > 1 for p in decay["params"]) and all(p.dim() <= 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert model.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    torch.manual_seed(0)
    assert not torch.equal(build_model("tiny", 10).features[0].weight, model.features[0].weight.contiguous())
    # 3 steps per epoch, warm-up round(0.5 · 3) = 2 steps, the first milestone (epoch 1) not reached: factor 1
    assert out["history"][0]["lr"] == pytest.approx(1.0 * 16 / 256)


def test_fgsgd_fp16_grad_scaler(tmp_path):
    out = T.main(FG + ["--epochs", "1", "--max-steps-per-epoch", "3", "--amp", "fp16", "--output", str(tmp_path)])
    assert math.isfinite(out["history"][0]["train_loss"])
    assert assert_on_manifolds(out["optimizer"])
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["scaler"]["scale"] > 0  # an enabled GradScaler's state was saved


def test_fgsgd_channels_last(tmp_path):
    """--channels-last converts the model for FG-SGD too: its filters stay channels-last and on their manifolds."""
    out = T.main(FG + ["--epochs", "1", "--max-steps-per-epoch", "3", "--channels-last"])
    model, opt = out["model"], out["optimizer"]
    assert math.isfinite(out["history"][0]["train_loss"])
    convs = [p for _, p, _ in opt.manifold_params() if p.dim() == 4 and p.shape[-1] > 1]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
                         for p in convs)
    assert assert_on_manifolds(opt)


@pytest.mark.parametrize("optimizer", ["fgsgd", "sgd"])
def test_compile_gives_the_eager_run(optimizer):
    """--compile (aot_eager here: the same aten ops, no code generation) trains to the eager run's losses,
    accuracies and weights."""
    why = compile_unusable("aot_eager")
    if why:
        pytest.skip(why)
    torch._dynamo.reset()
    argv = (FG if optimizer == "fgsgd" else TINY) + ["--optimizer", optimizer, "--epochs", "2",
                                                     "--max-steps-per-epoch", "3"]
    eager = T.main(argv)
    compiled = T.main(argv + ["--compile", "default", "--compile-backend", "aot_eager"])
    timing = {"epoch_s", "images_per_s", "step_ms"}
    for a, b in zip(eager["history"], compiled["history"]):
        assert {k: v for k, v in a.items() if k not in timing} == {k: v for k, v in b.items() if k not in timing}
    for p, q in zip(eager["model"].parameters(), compiled["model"].parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("optimizer", ["fgsgd", "sgd"])
def test_channel_directed_gradients_every_step(optimizer, monkeypatch):
    """--channel-directed preconditions the conv weights' gradients after every backward, before the step, with
    either optimizer; it changes the training (against the same run without it)."""
    from fgsgd_cuda import reference as R
    calls, original = [], T.channel_directed_

    def spy(params, metric, lam):
        before = [p.grad.clone() for p in params]
        original(params, metric, lam)
        calls.append(([tuple(p.shape) for p in params], metric, lam, before, [p.grad.clone() for p in params]))

    monkeypatch.setattr(T, "channel_directed_", spy)
    argv = (FG if optimizer == "fgsgd" else TINY) + ["--optimizer", optimizer, "--epochs", "1",
                                                     "--max-steps-per-epoch", "3"]
    out = T.main(argv + ["--channel-directed", "sobolev", "--channel-directed-lam", "2.0"])
    convs = [tuple(m.weight.shape) for m in out["model"].modules() if isinstance(m, nn.Conv2d)]
    assert len(calls) == 3 and all(c[0] == convs and c[1:3] == ("sobolev", 2.0) for c in calls)
    for before, after in zip(calls[0][3], calls[0][4]):
        torch.testing.assert_close(after.double(), R.channel_directed(before.double(), "sobolev", 2.0),
                                   rtol=1e-5, atol=1e-7)
    plain = T.main(argv)
    assert not torch.equal(out["model"].features[0].weight, plain["model"].features[0].weight)
    assert out["history"][0]["channel_directed"] == "sobolev" and plain["history"][0]["channel_directed"] == "none"


@pytest.mark.parametrize("optimizer", ["fgsgd", "sgd"])
def test_learns_the_synthetic_classes(optimizer):
    """Each synthetic class shifts the channel means: a few epochs take validation top-1 far above chance (10 %)."""
    argv = ["--arch", "tiny", "--synthetic", "--image-size", "8", "--num-classes", "10", "--synthetic-size", "512",
            "--synthetic-val-size", "100", "--batch-size", "32", "--workers", "0", "--print-freq", "1000",
            "--warmup-epochs", "0.5", "--epochs", "3", "--lr", "2.0", "--device", "cpu", "--optimizer", optimizer]
    out = T.main(argv + (["--manifold-lr", "16"] if optimizer == "fgsgd" else []))
    first, last = out["history"][0], out["history"][-1]
    assert last["val_top1"] >= 60 and last["train_loss"] < first["train_loss"], out["history"]


@pytest.mark.parametrize("argv,message", [
    (["--arch", "tiny"], "--data"),
    (["--synthetic", "--arch", "resnet7"], "invalid choice"),
    (["--synthetic", "--manifolds", "sphere,torus"], "--manifolds"),
    (["--synthetic", "--retraction", "stiefel=exp"], "--retraction"),
    (["--synthetic", "--batch-size", "0"], "--batch-size"),
    (["--synthetic", "--resume", "auto"], "--output"),
    (["--synthetic", "--optimizer", "sgd", "--row-view", "--manifold-lr", "3"], "--manifold-lr, --row-view"),
    (["--synthetic", "--channel-directed", "reweighted", "--channel-directed-lam", "0"], "--channel-directed-lam"),
    (["--synthetic", "--compile", "default", "--renorm", "running"], "--renorm running"),
    (["--synthetic", "--schedule", "step", "--lr-gamma", "-1"], "--lr-gamma: must be a finite number > 0"),
    (["--synthetic", "--schedule", "step", "--lr-steps", "30", "-5"], "--lr-steps: epochs must be at least 1"),
    (["--synthetic", "--lr", "inf"], "--lr: must be a finite number > 0"),
    (["--synthetic", "--warmup-epochs", "nan"], "--warmup-epochs: must be a finite number >= 0"),
    (["--synthetic", "--label-smoothing", "nan"], "--label-smoothing: must be a finite number >= 0"),
    (["--synthetic", "--manifold-lr", "0"], "--manifold-lr: must be a finite number > 0"),
    (["--synthetic", "--lr-steps", "1", "2"], "--lr-steps: changes nothing without --schedule step"),
    (["--synthetic", "--renorm-batches", "7"], "--renorm-batches: changes nothing without --renorm running"),
    (["--synthetic", "--channel-directed-lam", "-5"], "--channel-directed-lam: changes nothing without"),
    (["--synthetic", "--stabilize", "-1"], "--stabilize: must be a finite number >= 0"),
], ids=["no-data", "arch", "manifolds", "retraction", "batch-size", "resume-auto", "sgd-with-fgsgd-option",
        "channel-directed-lam", "compile-with-renorm", "negative-lr-gamma", "negative-lr-step", "infinite-lr",
        "nan-warmup", "nan-label-smoothing", "zero-manifold-lr", "lr-steps-with-cosine", "renorm-batches-off",
        "channel-directed-lam-off", "negative-stabilize"])
def test_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        T.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_data_dir_without_train_folder(tmp_path, capsys):
    with pytest.raises(SystemExit):
        T.parse_args(["--data", str(tmp_path)])
    assert "no train/ folder" in capsys.readouterr().err


def test_lr_schedule():
    kw = dict(steps_per_epoch=10, epochs=9, warmup_epochs=1)
    assert [lr_factor(s, schedule="cosine", **kw) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert lr_factor(10, schedule="cosine", **kw) == 1.0
    assert lr_factor(50, schedule="cosine", **kw) == pytest.approx(0.5)
    assert lr_factor(89, schedule="cosine", **kw) == pytest.approx(0.5 * (1 + math.cos(math.pi * 79 / 80)))
    steps = [lr_factor(s, schedule="step", milestones=(3, 6), gamma=0.1, **kw) for s in (10, 29, 30, 59, 60)]
    assert steps == pytest.approx([1, 1, 0.1, 0.1, 0.01])


def test_synthetic_data_is_a_function_of_seed_split_and_index():
    a, b = SyntheticImages(8, 16, 10, seed=3), SyntheticImages(8, 16, 10, seed=3)
    assert all(torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1] for i in (0, 5, 7))
    assert not torch.equal(a[0][0], a[1][0])
    assert not torch.equal(a[0][0], SyntheticImages(8, 16, 10, seed=4)[0][0])
    assert not torch.equal(a[0][0], SyntheticImages(8, 16, 10, seed=3, split=1)[0][0])


def test_cli_runs_without_torchvision(tmp_path):
    """``python -m fgsgd_cuda.train_imagenet`` end to end; the tiny/synthetic path never imports torchvision."""
    code = ("import runpy, sys; sys.argv = ['train_imagenet'] + sys.argv[1:]; "
            "runpy.run_module('fgsgd_cuda.train_imagenet', run_name='__main__'); "
            "assert 'torchvision' not in sys.modules, 'torchvision was imported'")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, "-c", code, *FG, "--epochs", "1", "--max-steps-per-epoch", "2",
                           "--log-file", str(tmp_path / "log.jsonl")], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "tiny (" in proc.stdout and len(read_log(tmp_path / "log.jsonl")) == 1


def test_se_resnet():
    pytest.importorskip("torchvision")
    model = build_model("se_resnet50", num_classes=10)
    blocks = [m for m in model.modules() if hasattr(m, "se")]
    assert len(blocks) == sum(SE_RESNETS["se_resnet50"]) == 16
    assert sum(isinstance(m, SEModule) for m in model.modules()) == 16
    for blk in blocks:
        c = blk.bn3.num_features
        assert blk.se.fc1.weight.shape == (c // 16, c, 1, 1) and blk.se.fc1.bias.shape == (c // 16,)
        assert blk.se.fc2.weight.shape == (c, c // 16, 1, 1) and blk.se.fc2.bias.shape == (c,)
    # the SE module reads the last batch norm's output, before the residual addition
    seen = {}
    blk = blocks[0]
    blk.bn3.register_forward_hook(lambda m, a, o: seen.__setitem__("bn3", o.detach().clone()))
    blk.se.register_forward_hook(lambda m, a, o: seen.__setitem__("se_in", a[0].detach().clone()))
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert torch.equal(seen["bn3"], seen["se_in"])
    # torchvision's ResNet-50 + 2·C·C/16 + C/16 + C per bottleneck (benchmarks/bench_step.py counts the same)
    assert sum(p.numel() for p in build_model("se_resnet50").parameters()) == 28_088_024


def test_torchvision_resnet():
    pytest.importorskip("torchvision")
    model = build_model("resnet18", num_classes=7)
    assert sum(p.numel() for p in build_model("resnet18").parameters()) == 11_689_512
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 7)


@pytest.mark.parametrize("optimizer", ["fgsgd", "sgd"])
def test_bounds_report_of_a_training_checkpoint(tmp_path, optimizer, capsys):
    """python -m fgsgd_cuda.bounds reads the training script's checkpoint.pt (it had refused it as 'not an fgsgd_cuda
    checkpoint'): the model and optimizer are rebuilt from the run's arguments and give the report of the run's own
    model and optimizer, with the training set's size as n."""
    from fgsgd_cuda import bounds
    argv = (FG if optimizer == "fgsgd" else TINY) + ["--optimizer", optimizer, "--epochs", "1",
                                                     "--max-steps-per-epoch", "3", "--output", str(tmp_path)]
    if optimizer == "fgsgd":
        argv += ["--renorm", "running", "--row-view"]
    out = T.main(argv)
    ref = bounds.report(out["model"], out["optimizer"] if optimizer == "fgsgd" else None, 96, print_table=False)
    capsys.readouterr()
    assert bounds.main([str(tmp_path / "checkpoint.pt"), "--json", str(tmp_path / "b.json")]) == 0
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["n_samples"] == 96
    for which in ("p", "omega"):
        for name in bounds.BOUNDS:
            assert data["bounds"][which][name]["log"] == pytest.approx(ref["bounds"][which][name]["log"], rel=1e-12)
