#!/usr/bin/env bash
# GPU check of raad-kernels, for a GPU machine with PyTorch, Triton and nvcc but no network.
#
#   benchmarks/gpu_check.sh [SAGE_WHEEL_DIR]
#
# Run from the repository root (or anywhere: it cd's there). Steps, each logged, time-boxed and
# continued past on failure:
#   1. build the extensions in place for this GPU's architecture (setup.py build_ext --inplace);
#   2. the `gpu` tests, and the Triton, API and dispatch-table tests on the GPU (pytest, xdist
#      when present; JUnit XML kept: which backends passed decides what enters the speed table),
#      the CUDA-graph capture tests among them;
#   3. compute-sanitizer memcheck (every CUDA kernel and the Triton kernels) and racecheck (CUDA
#      kernels) on small calls;
#   4. benchmarks/profile_gpu.py (kernels of one small call), benchmarks/host_overhead.py --gpu
#      (host µs per call against GPU µs, launches per call), then the benchmark table
#      (benchmarks/bench_gpu.py): cuda/triton against SDPA fp16/bf16, and against
#      SageAttention 1.0.6 when SAGE_WHEEL_DIR holds its wheel (installed offline into a
#      temporary folder, --no-deps --no-index), and the speed table `auto` dispatches from;
#   4b. the detector: a real-photo category fitted with --device cuda (the plan timed on this
#      GPU), scored there in both precisions, and raad bench --device cuda at batch 32 against
#      fp16/bf16 autocast and torch.compile, CUDA-graph replays (detector_gpu.json);
#   5. results under $OUT (default ./gpu_check_out): gpu_results.md, gpu_results.json,
#      gpu_speed.json (to commit as raad_kernels/gpu_speed.json), host_overhead.json, gpu_tests.xml,
#      and the logs gpu_check.log, build.log, gpu_tests.log, sanitizer.log, profile.log,
#      host_overhead.log, bench.log.
# The whole run is budgeted to finish within 8 minutes (GPU_CHECK_BUDGET_S, default 460 s);
# the exit code is non-zero when the build, a test or a sanitizer check failed, 2 when no GPU
# is visible (nothing is checked then).
set -u -o pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
SAGE_DIR="${1:-}"
NAME=gpu_check
BUDGET=${GPU_CHECK_BUDGET_S:-460}
source benchmarks/check_common.sh

# run_tb SECONDS CMD...: CMD in its own process group, the whole group ended after SECONDS (so a
# timed-out build takes its compilers with it). Returns CMD's status, 124 on timeout.
run_tb() {
  local secs=$1; shift
  setsid -w "$@" &
  local pid=$!
  setsid bash -c "sleep $secs; touch '$OUT/.timeout.$pid'; kill -TERM -- -$pid 2>/dev/null; sleep 5; kill -KILL -- -$pid 2>/dev/null" &
  local wd=$!
  wait "$pid"
  local rc=$?
  kill -TERM -- -"$wd" 2>/dev/null
  wait "$wd" 2>/dev/null
  if [[ -e "$OUT/.timeout.$pid" ]]; then rm -f "$OUT/.timeout.$pid"; rc=124; fi
  return $rc
}

log "start: $(date -u +%FT%TZ) on $(hostname); budget ${BUDGET}s; results in $OUT"
"$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import torch, sys
print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda)
print("GPU:", torch.cuda.get_device_name() if torch.cuda.is_available() else "none visible")
try:
    import triton; print("triton", triton.__version__)
except Exception as e:
    print("triton: not importable:", e)
EOF
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv 2>&1 | tee -a "$LOG"
command -v nvcc >/dev/null && nvcc --version | tail -1 | tee -a "$LOG"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  log "no CUDA GPU visible to torch: nothing to check here (build, tests and timings need one)"
  log "RESULT: NOT RUN (no GPU)"
  exit 2
fi

# ---------------------------------------------------------------------------------------------
# 1. Build (this GPU's arch only, all cores)
# ---------------------------------------------------------------------------------------------
ARCH=$("$PY" -c "import torch; c=torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}')" 2>/dev/null || echo "9.0")
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$ARCH}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
log "1. build: TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"
T=$(step_timeout 200 260)
if run_tb "$T" "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
  log "   build ok"
else
  rc=$?; FAIL=1
  log "   BUILD FAILED (rc=$rc, timeout ${T}s); tail of build.log:"
  tail -25 "$OUT/build.log" | tee -a "$LOG"
fi
"$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import raad_kernels as rk
for name, st in rk.backends().items():
    print(f"   backend {name:7s} built={st.built} runnable={st.runnable}: {st.reason}")
EOF
SO=$(ls raad_kernels/_cuda*.so 2>/dev/null | head -1)
if [[ -n "$SO" ]] && command -v cuobjdump >/dev/null; then
  log "   tensor-core instructions in $SO (cuobjdump -sass):"
  cuobjdump -sass "$SO" 2>/dev/null | grep -oE "\b(IMMA|HMMA|HGMMA|IGMMA)\.[A-Z0-9.]+" | sort | uniq -c | tee -a "$LOG"
fi

# ---------------------------------------------------------------------------------------------
# 2. GPU tests
# ---------------------------------------------------------------------------------------------
# The `gpu` tests (CUDA backend against the torch spec) and the Triton tests, which on a GPU run
# the compiled kernels instead of the interpreter; pytest-xdist spreads them when it is there.
T=$(step_timeout 180 150)
XDIST=""
"$PY" -c "import xdist" 2>/dev/null && XDIST="-n $(( $(nproc) > 8 ? 8 : $(nproc) ))"
log "2. pytest -m gpu tests/ and tests/test_triton_backend.py on the GPU ${XDIST:+($XDIST) }(timeout ${T}s)"
# -rfs --tb=short: each failure's reason; 2 OpenMP threads per worker (no oversubscription).
# The JUnit XML says per test file what passed: bench_gpu.py lets only those backends into
# the speed table.
run_tb "$T" env OMP_NUM_THREADS=2 "$PY" -m pytest -q $XDIST --no-header -p no:cacheprovider -rfs --tb=short \
  --junitxml="$OUT/gpu_tests.xml" -m "gpu or not slow" tests/test_cuda_backend.py tests/test_triton_backend.py \
  tests/test_api.py tests/test_linear.py tests/test_dispatch_table.py tests/test_speedplan.py \
  > "$OUT/gpu_tests.log" 2>&1
rc=$?
tail -15 "$OUT/gpu_tests.log" | tee -a "$LOG"
if (( rc == 0 )); then log "   gpu tests passed"
elif (( rc == 5 )); then log "   no gpu tests collected (rc=5)"; FAIL=1
else log "   GPU TESTS FAILED or timed out (rc=$rc)"; FAIL=1; fi

# ---------------------------------------------------------------------------------------------
# 3. compute-sanitizer on one small call of each kernel
# ---------------------------------------------------------------------------------------------
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
: > "$OUT/sanitizer.log"
if [[ -z "$SAN" ]]; then
  log "3. compute-sanitizer not found: skipped"
else
  for tool in memcheck racecheck; do
    if [[ $tool == memcheck ]]; then T=$(step_timeout 50 120); else T=$(step_timeout 50 75); fi
    log "3. compute-sanitizer --tool $tool (timeout ${T}s)"
    echo "===== $tool =====" >> "$OUT/sanitizer.log"
    # memcheck also runs the Triton kernels (their workspace offsets); racecheck (shared
    # memory) the CUDA ones only
    SAN_ARGS=""; [[ $tool == memcheck ]] && SAN_ARGS="--triton"
    run_tb "$T" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool "$tool" --error-exitcode 99 \
      "$PY" benchmarks/sanitize_gpu.py $SAN_ARGS >> "$OUT/sanitizer.log" 2>&1
    rc=$?
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|sanitize_gpu:" "$OUT/sanitizer.log" | tail -3 | tee -a "$LOG"
    if (( rc == 0 )); then log "   $tool clean"
    elif (( rc == 124 )); then log "   $tool timed out (not a finding)"
    else log "   $tool FOUND ERRORS or failed (rc=$rc)"; FAIL=1; fi
  done
fi

# ---------------------------------------------------------------------------------------------
# 4. Benchmarks (SageAttention from a wheel folder when given)
# ---------------------------------------------------------------------------------------------
if [[ -n "$SAGE_DIR" ]]; then
  WHL=$(ls "$SAGE_DIR"/sageattention-1.0.6*.whl 2>/dev/null | head -1)
  [[ -z "$WHL" ]] && WHL=$(ls "$SAGE_DIR"/sageattention-*.whl 2>/dev/null | head -1)
  if [[ -n "$WHL" ]]; then
    SITE=$(mktemp -d)
    if "$PY" -m pip install -q --no-deps --no-index --no-compile --target "$SITE" "$WHL" >> "$LOG" 2>&1; then
      export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
      log "4. SageAttention from $(basename "$WHL") in $SITE"
    else
      log "4. SageAttention wheel $WHL did not install: benchmarking without it"
    fi
  else
    log "4. no sageattention wheel in $SAGE_DIR: benchmarking without it"
  fi
fi
# where a ViT-sized call's time goes: the kernels it launches and its host time (seconds)
T=$(step_timeout 30 60)
log "4. profile_gpu.py at 8x6x197x64 (timeout ${T}s)"
run_tb "$T" "$PY" benchmarks/profile_gpu.py > "$OUT/profile.log" 2>&1
grep -E "host .* ms/call" "$OUT/profile.log" | tee -a "$LOG"
# host time per call against GPU time, launches per call (target: <= 25 µs host, triton)
T=$(step_timeout 40 60)
log "4. host_overhead.py --gpu at 8x6x197x64 (timeout ${T}s)"
run_tb "$T" "$PY" benchmarks/host_overhead.py --gpu --out "$OUT/host_overhead.json" > "$OUT/host_overhead.log" 2>&1
tee -a "$LOG" < "$OUT/host_overhead.log"
# the detector at 256 px: one real-photo category fitted for this GPU (training on the CPU, the
# plan timed on the GPU), scored on it in both precisions, then raad bench at batch 32 against
# fp16/bf16 autocast and torch.compile, every variant replayed from CUDA graphs
T=$(step_timeout 200 150)
log "4. the detector on the GPU: make-data --real brick, fit --device cuda, score, bench --batch-size 32 --peers (timeout ${T}s)"
run_tb "$T" env OUT="$OUT" PY="$PY" bash -c '
  set -e; D="$OUT/detector"; mkdir -p "$D"
  "$PY" -m raad.cli make-data "$D/data" --real --categories brick
  "$PY" -m raad.cli fit "$D/data/brick" --out "$D/run" --device cuda --quiet
  for p in plan fp32; do "$PY" -m raad.cli score "$D/run" "$D/data/brick" --out "$D/scores_$p" --precision $p --device cuda --quiet; done
  "$PY" -m raad.cli bench "$D/run" --device cuda --batch-size 32 --repeats 20 --data "$D/data/brick" --peers --json > "$OUT/detector_gpu.json"
  cp "$D/run/plan.json" "$OUT/detector_plan.json"; cp "$D/run/hqs.json" "$OUT/detector_hqs.json"
  cp "$D/scores_plan/metrics.json" "$OUT/detector_metrics_plan.json"; cp "$D/scores_fp32/metrics.json" "$OUT/detector_metrics_fp32.json"
' > "$OUT/detector.log" 2>&1
rc=$?
tail -12 "$OUT/detector.log" | tee -a "$LOG"
if (( rc == 0 )); then log "   detector on the GPU: $OUT/detector_gpu.json"
else log "   the detector step failed or timed out (rc=$rc)"; FAIL=1; fi
T=$(( $(left) - 10 ))
if (( T > 30 )); then
  log "4. bench_gpu.py (budget $((T - 15))s, hard timeout ${T}s) and the speed table"
  run_tb "$T" "$PY" benchmarks/bench_gpu.py --out "$OUT" --budget $((T - 15)) \
    --speed-table "$OUT/gpu_speed.json" --tests-junit "$OUT/gpu_tests.xml" > "$OUT/bench.log" 2>&1
  rc=$?
  tail -45 "$OUT/bench.log" | tee -a "$LOG"
  (( rc != 0 )) && log "   bench_gpu.py ended early (rc=$rc; its partial table is in $OUT)"
else
  log "4. no time left for the benchmarks"
fi

# ---------------------------------------------------------------------------------------------
# 5. Summary
# ---------------------------------------------------------------------------------------------
log "5. done in $(( $(date +%s) - START ))s; results: $(ls "$OUT" | tr '\n' ' ')"
if (( FAIL )); then log "RESULT: FAILED (see the logs above)"; else log "RESULT: passed"; fi
exit $FAIL
