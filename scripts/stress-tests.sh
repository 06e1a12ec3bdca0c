#!/usr/bin/env bash
# Runs the whole test suite several times on a loaded machine, to find the
# races behind flaky tests before CI does: a busy loop per core stretches
# the windows a race needs (a JWKS race that failed one CI-like run in five
# failed 99 runs in 100 of its module this way).
#
#   scripts/stress-tests.sh [RUNS]      # default 5
#
# Knobs: LOAD=N busy loops beside the tests (default: one per core),
# FILTER=... passed to cargo test (default: the whole suite), and
# CI=true as in CI (tests whose services are missing fail instead of
# skipping). Each run's log stays in the temporary directory it names.
# Prints one line per run and the tests that failed; exits 1 if any did.

set -euo pipefail
cd "$(dirname "$0")/.."

RUNS="${1:-5}"
LOAD="${LOAD:-$(nproc)}"
FILTER="${FILTER:-}"
[[ "$RUNS" =~ ^[1-9][0-9]*$ ]] || { echo "stress-tests.sh: RUNS must be a whole number, got '$RUNS'" >&2; exit 2; }
[[ "$LOAD" =~ ^[0-9]+$ ]] || { echo "stress-tests.sh: LOAD must be a whole number, got '$LOAD'" >&2; exit 2; }

logs="$(mktemp -d /tmp/portcullis-stress.XXXXXX)"
hogs=()
stop_hogs() { for pid in "${hogs[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap stop_hogs EXIT

# Built before the load starts, so that the runs time tests, not the build.
# shellcheck disable=SC2086 # FILTER is words for cargo test
cargo test --no-run -q $FILTER

for _ in $(seq "$LOAD"); do
    yes >/dev/null &
    hogs+=("$!")
done
echo "stress-tests.sh: $RUNS runs beside $LOAD busy loops; logs in $logs"

failed_runs=0
for run in $(seq "$RUNS"); do
    log="$logs/run-$run.log"
    started=$SECONDS
    # shellcheck disable=SC2086
    if cargo test --no-fail-fast $FILTER >"$log" 2>&1; then
        echo "run $run: ok ($((SECONDS - started)) s)"
    else
        failed_runs=$((failed_runs + 1))
        echo "run $run: FAILED ($((SECONDS - started)) s), see $log"
        # libtest's "failures:" list names each failed test on a line of its own.
        grep -E '^    [A-Za-z_][A-Za-z0-9_:]*$' "$log" | sort -u | sed 's/^ */    /' || true
    fi
done

echo "stress-tests.sh: $failed_runs of $RUNS runs failed"
[[ "$failed_runs" -eq 0 ]]
