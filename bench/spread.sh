#!/usr/bin/env bash
# How evenly a few long-lived connections load the workers, and what an
# uneven split costs: for each build, runs of `h2load -c CONNECTIONS` (fresh
# connections every run, so the kernel's SO_REUSEPORT hash places them
# anew), each reporting requests per second and the busiest worker
# thread's share of the workers' CPU. The builds alternate, one proxy
# start per build per round.
#
#   bench/spread.sh BINARY [BINARY...]
#
# Knobs: CONNECTIONS=2, STREAMS=64 (concurrent streams per connection),
# DURATION=4 (seconds per run), RUNS=5 (per round), ROUNDS=2, WORKERS=2,
# LOG_LEVEL=info, PORT=22443, UPSTREAM_PORT=22080, EXTRA_TOML.
# Needs nginx, h2load, openssl, curl, python3.
#
# A worker's CPU is /proc/PID/task/TID/schedstat of the threads named
# portcullis-wN, read before and after each run. With two workers and two
# connections, a run whose busiest worker did 90% or more of the work had
# both connections on it.

set -euo pipefail

[[ $# -ge 1 ]] || { echo "usage: bench/spread.sh BINARY [BINARY...]" >&2; exit 2; }
CONNECTIONS="${CONNECTIONS:-2}"
STREAMS="${STREAMS:-64}"
DURATION="${DURATION:-4}"
RUNS="${RUNS:-5}"
ROUNDS="${ROUNDS:-2}"
WORKERS="${WORKERS:-2}"
LOG_LEVEL="${LOG_LEVEL:-info}"
PORT="${PORT:-22443}"
UPSTREAM_PORT="${UPSTREAM_PORT:-22080}"
HERE="$(cd "$(dirname "$0")" && pwd)"

# shellcheck source=bench/lab.sh
. "$HERE/lab.sh"
lab_need spread.sh nginx h2load openssl curl python3
BINS=()
for bin in "$@"; do
    [[ -x "$bin" ]] || { echo "spread.sh: no executable at $bin" >&2; exit 1; }
    BINS+=("$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")")
done

lab_setup spread
lab_proxy_toml "$WORKERS"

# worker_cpu: "TID NANOSECONDS" for each worker thread of the proxy.
worker_cpu() {
    local task
    for task in /proc/"$PROXY_PID"/task/*; do
        [[ "$(cat "$task/comm")" == portcullis-w* ]] || continue
        echo "$(basename "$task") $(cut -d' ' -f1 "$task/schedstat")"
    done
}

RESULTS="$T/results.txt"
for round in $(seq "$ROUNDS"); do
    for which in "${!BINS[@]}"; do
        "${BINS[$which]}" run --config "$T/proxy.toml" >"$T/access.log" 2>"$T/proxy.err" &
        PROXY_PID=$!
        lab_wait_ready || { echo "spread.sh: ${BINS[$which]} did not start, see $T/proxy.err" >&2; exit 1; }
        for run in $(seq "$RUNS"); do
            worker_cpu | sort >"$T/before"
            out="$(h2load -t2 -c"$CONNECTIONS" -m"$STREAMS" -D"$DURATION" "https://127.0.0.1:$PORT/plain")"
            worker_cpu | sort >"$T/after"
            grep -q " 0 failed, 0 errored" <<<"$out" ||
                { echo "spread.sh: requests failed: $(grep '^requests:' <<<"$out")" >&2; exit 1; }
            rps="$(sed -n 's/^finished in [^,]*, \([0-9.]*\) req\/s.*/\1/p' <<<"$out")"
            busiest="$(join "$T/before" "$T/after" |
                awk '{d = $3 - $2; s += d; if (d > m) m = d} END {printf "%.2f", s ? m / s : 0}')"
            echo "$which $rps $busiest" >>"$RESULTS"
            echo "round $round build $which run $run: $rps req/s, busiest worker $busiest of the workers' CPU" >&2
        done
        kill "$PROXY_PID" 2>/dev/null || true
        wait "$PROXY_PID" 2>/dev/null || true
        PROXY_PID=""
    done
done

python3 - "$RESULTS" "$@" <<'EOF'
import collections, statistics, sys
runs = collections.defaultdict(list)
for line in open(sys.argv[1]):
    which, rps, busiest = line.split()
    runs[int(which)].append((float(rps), float(busiest)))
for which, binary in enumerate(sys.argv[2:]):
    rows = runs[which]
    rps = [r for r, _ in rows]
    lopsided = [r for r, b in rows if b >= 0.9]
    print(f"{binary}: median {statistics.median(rps):,.0f} req/s ({min(rps):,.0f}–{max(rps):,.0f}); "
          f"busiest worker ≥ 90% of the work in {len(lopsided)} of {len(rows)} runs"
          + (f" ({min(lopsided):,.0f}–{max(lopsided):,.0f} req/s)" if lopsided else ""))
EOF
