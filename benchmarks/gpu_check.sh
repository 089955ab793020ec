#!/usr/bin/env bash
# One call on a lent GPU machine (the device tool): build the CUDA extension for sm_90, check the step
# kernels against the reference, run the benchmarks on the idle machine, then the test suite on the GPU.
#
# Usage there:  bash benchmarks/gpu_check.sh [SECONDS]      (SECONDS: the call's budget, default 480)
#   PHASES="build first diag kernels parts step host cd cl tests geoopt triton_step tests_cpu" picks phases (default: all, in that order).
#   Every phase has its own time limit, cut to what is left of SECONDS, so a slow phase never costs the
#   ones after it their logs; the JSON files are written as they go (after every model).
# Outputs under $OUT (default ./gpu-out): run.log (summary), tests_first.log, tests.log, bench.log, kernels.json,
# parts.json, step.json, host.json, cd.json, cl.json, geoopt.json, triton_step.json (plots: bench_step.py --replot here). The device
# tool brings back at most 8 files: where there are more at the end, the logs but run.log go into logs.tar. STEP_ARGS replaces bench_step.py's extra cases (default: --row-view --group-clip 1.0 --capturable).
# Carry geoopt as a wheel in .whl/ to get the geoopt cases (benchmarks/README.md).
set -u
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
BUDGET="${1:-480}"
PHASES="${PHASES:-build first diag kernels parts step host cd cl tests geoopt triton_step tests_cpu}"
T0=$(date +%s)
log() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/run.log"; }
want() { [[ " $PHASES " == *" $1 "* ]]; }
# limit N: N seconds, or what is left of the budget (minus a margin for the logs), whichever is less
limit() { local left=$(( BUDGET - ($(date +%s) - T0) - 8 )); (( left < $1 )) && echo $(( left > 1 ? left : 1 )) || echo "$1"; }

export PYTHONUNBUFFERED=1
pack() {  # at most 8 files come back: the logs but run.log into one tar when there are more
  (( $(find "$OUT" -maxdepth 1 -type f | wc -l) > 8 )) || return 0
  (cd "$OUT" && ls ./*.log | grep -v '^./run.log$' | xargs tar -cf logs.tar && ls ./*.log | grep -v '^./run.log$' | xargs rm -f)
}
trap pack EXIT
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem,memory.used,memory.total --format=csv >>"$OUT/run.log" 2>&1
"$PY" -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" >>"$OUT/run.log" 2>&1
git log -1 --format='commit %h %s' >>"$OUT/run.log" 2>&1

export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
if want build; then
  log "build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
  if ! timeout "$(limit 150)" "$PY" setup.py build_ext --inplace >/tmp/build.log 2>&1; then
    tail -60 /tmp/build.log | tee -a "$OUT/run.log"
    exit 1
  fi
  grep -E "warning|error" /tmp/build.log | grep -v "UserWarning\|SetuptoolsDeprecationWarning" | head -20 >>"$OUT/run.log"
  "$PY" -c "import fgsgd_cuda; assert fgsgd_cuda._ext.HAS_CUDA_KERNELS, fgsgd_cuda._ext.LOAD_ERROR" 2>&1 | tee -a "$OUT/run.log"
  log "built"
fi

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # the scripts in benchmarks/ import fgsgd_cuda from here
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -rfE)
FIRST=(tests/test_cuda_step.py tests/test_step_controls.py tests/test_packed_codes.py tests/test_leading_dims.py
       tests/test_channel_directed.py tests/test_channels_last.py tests/test_radial_gradients.py
       tests/test_mixed_dtypes.py)

# The CUDA kernels against the reference first, so that a broken kernel shows before any timing.
# Beside them, the same checks of the Triton backend on the GPU (small shapes: compiling takes most of it).
if want first; then
  L=$(limit 150)  # 90 s ran out on the H200 (2026-11-29) with 67 of the CUDA tests done
  ( timeout "$L" "${PYTEST[@]}" -n 6 "${FIRST[@]}" tests/test_triton.py \
      -k "triton and cuda and (controls or packed) and not 7-7 and not 5-5 and not 8-8" >/tmp/first_triton.log 2>&1
    echo "exit $?" >>/tmp/first_triton.log ) &
  FT_PID=$!
  timeout "$L" "${PYTEST[@]}" -n 10 "${FIRST[@]}" -k "not triton" >"$OUT/tests_first.log" 2>&1
  log "first: CUDA step kernels and controls vs reference, exit $?: $(tail -1 "$OUT/tests_first.log")"
  wait $FT_PID
  log "first (Triton on the GPU): $(tail -2 /tmp/first_triton.log | tr '\n' ' ')"
  cat /tmp/first_triton.log >>"$OUT/tests_first.log"
  grep -E "^(FAILED|ERROR)" "$OUT/tests_first.log" | head -10 | tee -a "$OUT/run.log"
fi
# A diagnostic command of the session's own (DIAG), its output in run.log.
if want diag && [ -n "${DIAG:-}" ]; then
  timeout "$(limit 60)" bash -c "$DIAG" >>"$OUT/run.log" 2>&1
  log "diag exit $?"
fi

# Timings next, on an idle machine (nothing else running). ResNet-101 first: the targets' model.
MODELS="${MODELS:-resnet101,resnet50}"
if want kernels; then
  timeout "$(limit 75)" "$PY" benchmarks/bench_kernels.py --models "$MODELS" --repeats 20 --inner 20 \
    --out "$OUT/kernels.json" >>"$OUT/bench.log" 2>&1
  log "bench_kernels exit $?"
fi
if want parts; then
  timeout "$(limit 90)" "$PY" benchmarks/step_parts.py --models "$MODELS" --out "$OUT/parts.json" >>"$OUT/bench.log" 2>&1
  log "step_parts exit $?"
fi
if want step; then
  # shellcheck disable=SC2086
  timeout "$(limit 150)" "$PY" benchmarks/bench_step.py --models "$MODELS" --backends cuda --geoopt-models none \
    --torch-backend-models none --repeats 50 ${STEP_ARGS:---row-view --group-clip 1.0 --capturable} --no-plot \
    --out "$OUT/step.json" >>"$OUT/bench.log" 2>&1
  log "bench_step exit $?"
fi
# Host time of an eager step (no synchronisation in the timed loop): FGSGD against SGD, and its parts.
if want host; then
  timeout "$(limit 60)" "$PY" benchmarks/host_overhead.py --models "$MODELS" --profile --out "$OUT/host.json" \
    >>"$OUT/bench.log" 2>&1
  log "host_overhead exit $?"
fi

# Channel-directed gradients: cuda, triton and torch (FFT) against one SGD step on ResNet-101/50's conv weights.
if want cd; then
  timeout "$(limit 60)" "$PY" benchmarks/bench_channel_directed.py --device cuda --models "$MODELS" --repeats 30 \
    --out "$OUT/cd.json" >>"$OUT/bench.log" 2>&1
  log "bench_channel_directed exit $?"
fi

# Channels-last weights: the cuda backend steps their filter banks where they are (csrc/cuda/staged.cuh gather_in),
# against SGD on the same layout (and, in the step phase, against the contiguous weights).
if want cl; then
  timeout "$(limit 60)" "$PY" benchmarks/bench_step.py --models resnet50 --backends cuda --channels-last \
    --mixes sphere+oblique+stiefel --retractions default --geoopt-models none --torch-backend-models none \
    --repeats 30 --no-plot --out "$OUT/cl.json" >>"$OUT/bench.log" 2>&1
  log "bench_step channels-last exit $?"
fi

# The rest of the suite on the GPU, Triton beside it (compile-heavy: small shapes only; its 5x5/7x7/8x8
# kernels take minutes to compile).
if want tests; then
  L=$(limit 150)
  ( timeout "$L" "${PYTEST[@]}" -n 6 tests/test_triton.py tests/test_step_controls.py tests/test_packed_codes.py \
      tests/test_renorm.py -k "triton and not 7-7 and not 5-5 and not 8-8 and not 4-16 and not sm90 and not interpreter" \
      >"$OUT/test_triton.log" 2>&1; echo "exit $?" >>"$OUT/test_triton.log" ) &
  TRITON_PID=$!
  timeout "$L" "${PYTEST[@]}" -n 8 tests/test_ops_compiled.py tests/test_renorm.py tests/test_registration.py \
    -k "cuda and not triton" >"$OUT/tests.log" 2>&1
  log "tests: the other CUDA tests, exit $?: $(tail -1 "$OUT/tests.log")"
  wait $TRITON_PID
  log "triton tests: $(tail -2 "$OUT/test_triton.log" | tr '\n' ' ')"
  cat "$OUT/test_triton.log" >>"$OUT/tests.log"; rm -f "$OUT/test_triton.log"
  grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -20 | tee -a "$OUT/run.log"
fi

# geoopt on the GPU (seconds per step: batched torch.linalg.qr on tiny matrices), main mix only.
if want geoopt && "$PY" -c "import geoopt" 2>/dev/null; then
  timeout "$(limit 120)" "$PY" benchmarks/bench_step.py --models "${GEOOPT_MODELS:-resnet50,resnet101}" --backends cuda \
    --mixes sphere+oblique+stiefel --retractions default --geoopt-models all --torch-backend-models none \
    --slow-cases 'sphere\+oblique\+stiefel normalize/qr$' --slow-warmup 1 --slow-repeats "${GEOOPT_REPEATS:-2}" \
    --repeats 30 --no-plot \
    --out "$OUT/geoopt.json" >>"$OUT/bench.log" 2>&1
  log "bench_step geoopt exit $?"
fi
# The Triton backend's whole step (compiles its kernels first), main mix.
if want triton_step; then
  timeout "$(limit 120)" "$PY" benchmarks/bench_step.py --models resnet50 --backends triton --mixes sphere+oblique+stiefel \
    --retractions default --geoopt-models none --torch-backend-models none --capturable --repeats 30 --no-plot \
    --out "$OUT/triton_step.json" >>"$OUT/bench.log" 2>&1
  log "bench_step triton exit $?"
fi
# Last, the CPU tests under this machine's torch (CI runs them under the torch that setup.py pins).
if want tests_cpu; then
  timeout "$(limit 200)" "${PYTEST[@]}" -n 12 tests --ignore=tests/test_triton.py "${FIRST[@]/#/--ignore=}" \
    -k "not triton and not cuda" >/tmp/tests_cpu.log 2>&1
  log "tests_cpu exit $?: $(tail -1 /tmp/tests_cpu.log)"
  grep -E "^(FAILED|ERROR)" /tmp/tests_cpu.log | head -20 | tee -a "$OUT/run.log"
  cat /tmp/tests_cpu.log >>"$OUT/tests.log"
fi
grep -E "^==|copy|sgd-|sphere\+oblique\+stiefel |fgsgd (staged|sorted|thread) mix|geoopt" "$OUT/bench.log" | head -80
log "done"
