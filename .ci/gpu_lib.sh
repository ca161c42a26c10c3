# Sourced by .ci/gpu-figures and .ci/gpu-timm, from the repository root.

# vit_jax from this checkout, also for the scripts in .ci/ (a machine with a GPU may not have it
# installed: `python .ci/x.py` puts .ci/, not the checkout, on the module path).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# `time_left LIMIT` prints the seconds a run may take: LIMIT, or less where DEADLINE (seconds since
# the epoch) comes sooner; with under a minute left it prints a note on stderr, nothing on stdout,
# and fails, and the caller skips the run.
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

# `run_json FILE LIMIT COMMAND...` runs COMMAND for at most LIMIT seconds (less near DEADLINE) and
# appends what it prints, one JSON object, to FILE; a failure or a timeout is reported, and the
# caller goes on to its next run. (A benchmark step that runs out of memory prints its JSON, with
# "error", and exits with status 1.)
run_json() {
  local file=$1 limit json status
  limit=$(time_left "$2") || return 0
  shift 2
  json=$(timeout "$limit" "$@")
  status=$?
  [ -n "$json" ] && echo "$json" | tee -a "$file"
  [ "$status" = 0 ] || echo "-- failed or timed out (status $status)"
}
