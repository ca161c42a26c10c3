# Sourced by the .ci/gpu-* scripts. `time_left LIMIT` prints the seconds a run may take: LIMIT, or
# less where DEADLINE (seconds since the epoch) comes sooner; with under a minute left it prints a
# note on stderr, nothing on stdout, and fails, and the caller skips the run.
time_left() {
  local limit=$1 left
  [ -z "${DEADLINE:-}" ] && { echo "$limit"; return 0; }
  left=$((DEADLINE - $(date +%s)))
  if [ "$left" -lt 60 ]; then
    echo "-- skipped: ${left} s left before DEADLINE" >&2
    return 1
  fi
  [ "$left" -lt "$limit" ] && limit=$left
  echo "$limit"
}
