"""`import fgsgd_cuda` on its own (torch not imported first) loads the compiled extension."""
import subprocess
import sys

from conftest import requires_cpu_kernels


@requires_cpu_kernels
def test_import_alone_loads_compiled_ops():
    code = ("import warnings; warnings.simplefilter('error'); import fgsgd_cuda, torch; "
            "assert fgsgd_cuda._ext.HAS_CPU_KERNELS, fgsgd_cuda._ext.LOAD_ERROR; "
            "assert hasattr(torch.ops.fgsgd, 'step_')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
