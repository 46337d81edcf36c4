#!/usr/bin/env bash
# CPU check of raad-kernels on another machine's CPU (the lent GPU machine's, say): the AVX-512
# VNNI kernels can only be tested and timed where the CPU has them.
#
#   benchmarks/cpu_check.sh
#
# Needs the CPU extension built in place (benchmarks/gpu_check.sh step 1 does it; else this runs
# `setup.py build_ext --inplace` itself). Steps, each time-boxed and continued past on failure:
#   1. the CPU's model and flags, and what the extension detects (capabilities()); whether a
#      bad argument raises or crashes (benchmarks/probe_errors.py);
#   2. tests/test_cpu_backend.py (every ISA path the CPU has, the avx512 one included);
#   3. benchmarks/cpu_peak.cpp: int8 and fp32 ceilings (vpdpbusd where present), bandwidth;
#   4. the issue-3 ratio table (benchmarks/test_bench_cpu.py) on all cores, with the best ISA
#      and, for comparison on the same CPU, forced to avx2.
# Results in $OUT (default ./cpu_check_out): cpu_check.log (everything), cpu_tests.log.
# CPU_CHECK_BUDGET_S (default 200) bounds the whole run.
set -u -o pipefail
export PYTHONUNBUFFERED=1

cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/cpu_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
NAME=cpu_check
BUDGET=${CPU_CHECK_BUDGET_S:-200}
source benchmarks/check_common.sh
THREADS=$(nproc)

log "start: $(date -u +%FT%TZ) on $(hostname); $THREADS CPUs; budget ${BUDGET}s"
{ lscpu | grep -E "^(Model name|Vendor ID|CPU\(s\)|Thread|Core|Socket|L1d|L2|L3|NUMA node\(s\))"
  grep -m1 -o -wE "avx512f|avx512bw|avx512_vnni|avx512_bf16|amx_int8|amx_bf16|amx_tile|avx_vnni" /proc/cpuinfo \
    >/dev/null && echo "AVX-512/AMX flags: $(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx512f|avx512bw|avx512_vnni|avx512_bf16|amx_int8|amx_bf16|amx_tile|avx_vnni)$' | tr '\n' ' ')"
} 2>&1 | tee -a "$LOG"

if ! "$PY" -c "import raad_kernels._cpu" 2>/dev/null; then
  log "building the extensions in place"
  timeout "$(step_timeout 200 60)" "$PY" setup.py build_ext --inplace > "$OUT/cpu_build.log" 2>&1 || { FAIL=1; log "BUILD FAILED"; }
fi
"$PY" -c "from raad_kernels import _cpu; print('capabilities:', _cpu.capabilities())" 2>&1 | tee -a "$LOG"

log "1b. bad arguments raise, not crash (benchmarks/probe_errors.py)"
timeout 60 "$PY" benchmarks/probe_errors.py 2>&1 | tee -a "$LOG" || FAIL=1

T=$(step_timeout 120 70)
log "2. tests/test_cpu_backend.py (timeout ${T}s)"
XDIST=""
"$PY" -c "import xdist" 2>/dev/null && XDIST="-n $(( THREADS > 8 ? 8 : THREADS ))"
OMP_NUM_THREADS=2 timeout "$T" "$PY" -m pytest -q $XDIST --no-header -p no:cacheprovider --tb=short -rfs \
  tests/test_cpu_backend.py \
  > "$OUT/cpu_tests.log" 2>&1
rc=$?
tail -8 "$OUT/cpu_tests.log" | tee -a "$LOG"
if (( rc == 0 )); then log "   cpu tests passed"; else log "   CPU TESTS FAILED or timed out (rc=$rc)"; FAIL=1; fi

T=$(step_timeout 40 45)
log "3. cpu_peak (timeout ${T}s)"
if g++ -O3 -mavx2 -mfma -mf16c -fopenmp benchmarks/cpu_peak.cpp -o /tmp/raad_cpu_peak >> "$LOG" 2>&1; then
  OMP_NUM_THREADS=$THREADS timeout "$T" /tmp/raad_cpu_peak 2>&1 | tee -a "$LOG"
else
  log "   cpu_peak did not compile"
fi

for isa in best avx2; do
  T=$(step_timeout 60 5)
  log "4. ratio table, $THREADS threads, ISA $isa (timeout ${T}s)"
  if [[ $isa == best ]]; then env_isa=(); else env_isa=(RAAD_CPU_ISA=$isa); fi
  env "${env_isa[@]}" timeout "$T" "$PY" -m benchmarks.test_bench_cpu --rounds 10 --threads "$THREADS" 2>&1 | tee -a "$LOG"
done

log "done in $(( $(date +%s) - START ))s"
if (( FAIL )); then log "RESULT: FAILED"; else log "RESULT: passed"; fi
exit $FAIL
