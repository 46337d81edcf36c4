# Sourced by gpu_check.sh and cpu_check.sh: the run's clock, time budget and log.
# Set NAME (log prefix and file name), OUT (results folder) and BUDGET (seconds) before sourcing.
START=$(date +%s)
DEADLINE=$((START + BUDGET))
LOG="$OUT/$NAME.log"
: > "$LOG"
FAIL=0

log() { echo "[$NAME +$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }
left() { echo $(( DEADLINE - $(date +%s) )); }
# step_timeout WANTED RESERVE: WANTED seconds, cut so RESERVE seconds stay for later steps
step_timeout() {
  local t=$(( $(left) - $2 ))
  (( t > $1 )) && t=$1
  (( t < 5 )) && t=5
  echo "$t"
}
