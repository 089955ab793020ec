#!/usr/bin/env bash
# One call on a lent GPU machine (the device tool): build the CUDA extension for sm_90, check the step
# kernels against the reference, run the benchmarks on the idle machine, then the whole test suite on
# the GPU. Everything lands under $OUT (default ./gpu-out), at most 8 files: run.log (summary),
# tests_first.log, tests.log, test_triton.log, bench.log, kernels.json, step.json, step.png
# Usage there:  bash benchmarks/gpu_check.sh [quick]     ("quick": ResNet-50 only, fewer repeats)
# Carry geoopt as a wheel in .whl/ to get the geoopt cases (benchmarks/README.md).
set -u
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
MODE="${1:-full}"
T0=$(date +%s)
log() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/run.log"; }

export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used,memory.total --format=csv >>"$OUT/run.log" 2>&1
"$PY" -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" >>"$OUT/run.log" 2>&1

log "build (TORCH_CUDA_ARCH_LIST=9.0)"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
if ! "$PY" setup.py build_ext --inplace >/tmp/build.log 2>&1; then
  tail -60 /tmp/build.log | tee -a "$OUT/run.log"
  exit 1
fi
grep -E "warning|error" /tmp/build.log | grep -v "UserWarning\|SetuptoolsDeprecationWarning" | head -20 >>"$OUT/run.log"
"$PY" -c "import fgsgd_cuda; assert fgsgd_cuda._ext.HAS_CUDA_KERNELS, fgsgd_cuda._ext.LOAD_ERROR" 2>&1 | tee -a "$OUT/run.log"
log "built"

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # the scripts in benchmarks/ import fgsgd_cuda from here

# The step kernels against the reference first (a minute), so that a broken kernel shows before any timing.
timeout 120 "$PY" -m pytest tests/test_cuda_step.py tests/test_ops_compiled.py -q -p no:cacheprovider -n 8 \
  -k "cuda_step or (cuda and step)" >"$OUT/tests_first.log" 2>&1
log "step kernels vs reference, exit $?: $(tail -1 "$OUT/tests_first.log")"
grep -E "^(FAILED|ERROR)" "$OUT/tests_first.log" | head -10 | tee -a "$OUT/run.log"

# Timings next, on an idle machine (nothing else running), then the whole suite.
if [ "$MODE" = quick ]; then
  MODELS=resnet50; REPEATS=20
else
  MODELS=resnet101,resnet50,resnet18; REPEATS=50   # the targets' models first: bench_step.py writes its JSON after each
fi
log "bench_kernels"
timeout 180 "$PY" benchmarks/bench_kernels.py --models "$MODELS" --out "$OUT/kernels.json" >>"$OUT/bench.log" 2>&1
log "bench_kernels exit $?"
timeout 300 "$PY" benchmarks/bench_step.py --models "$MODELS" --backends cuda --torch-backend-models none \
  --slow-cases 'sphere\+oblique\+stiefel normalize/qr$' --repeats "$REPEATS" --row-view --group-clip 1.0 --capturable --out "$OUT/step.json" \
  >>"$OUT/bench.log" 2>&1
log "bench_step exit $?"

# Triton on the GPU (compile-heavy: the 5x5/7x7/8x8 kernels take minutes to compile, so small shapes only),
# beside the rest of the suite.
( timeout 150 "$PY" -m pytest tests/test_triton.py -q -p no:cacheprovider -n 4 \
    -k "not 7-7 and not 5-5 and not 8-8 and not 4-16 and not compile_for_sm90" >"$OUT/test_triton.log" 2>&1
  echo "exit $?" >>"$OUT/test_triton.log" ) &
TRITON_PID=$!
timeout 240 "$PY" -m pytest tests -q -p no:cacheprovider -n 8 -rfE --ignore=tests/test_triton.py >"$OUT/tests.log" 2>&1
log "tests exit $?: $(tail -1 "$OUT/tests.log")"
wait $TRITON_PID
log "triton tests: $(tail -2 "$OUT/test_triton.log" | tr '\n' ' ')"
grep -E "^==|copy|sgd-|sphere\+oblique\+stiefel |fgsgd (staged|sorted|thread) mix" "$OUT/bench.log" | head -60
grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -20
