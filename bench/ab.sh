#!/usr/bin/env bash
# CPU per unit of work of two portcullis builds, measured in alternating
# pairs on the same machine: to tell whether a change moved the proxy's
# own CPU (user and kernel) by a few per cent, which bench/run.sh's ratios
# (peers, rounds, 10 ms CPU ticks) cannot show and bench/instructions.sh
# (user-space instructions under valgrind, which hides the CPU's SHA and
# ADX extensions and counts no kernel time) can mislead about.
#
#   bench/ab.sh OLD_BINARY NEW_BINARY
#
# Scenarios (SCENARIOS="hs h2"):
#   hs  full TLS 1.3 handshakes without resumption, one HTTP/1.1 request
#       each (bench/handshake.py): µs of CPU per connection
#   h2  HTTP/2, h2load -t2 -c32 -m10: µs of CPU per request
#   h1  HTTPS/1.1 keep-alive, h2load --h1 -t2 -c64: µs of CPU per request
# Knobs: PAIRS=7, HANDSHAKES=3000, HS_CLIENTS=16, REQUESTS=300000,
# WORKERS=2, LOG_LEVEL=info (the default a user runs: one access line per
# request, to a file here; "warn" for none), PORT=21443,
# UPSTREAM_PORT=21080, EXTRA_TOML (appended to proxy.toml).
# Needs nginx, h2load, openssl, curl, python3.
#
# CPU is `benchlib.py cpu` (as bench/run.sh reads it): the sum over the
# proxy's threads of /proc/PID/task/*/schedstat (nanoseconds on a CPU),
# read before and after each load run; every
# portcullis thread lives as long as the process, so none is missed. Each
# pair runs both builds back to back, the order swapped every other pair.
# Prints, per scenario, each build's median, and the median over pairs of
# NEW/OLD: below 1 is less CPU for NEW.

set -euo pipefail

[[ $# -eq 2 ]] || { echo "usage: bench/ab.sh OLD_BINARY NEW_BINARY" >&2; exit 2; }
PAIRS="${PAIRS:-7}"
SCENARIOS="${SCENARIOS:-hs h2}"
HANDSHAKES="${HANDSHAKES:-3000}"
HS_CLIENTS="${HS_CLIENTS:-16}"
REQUESTS="${REQUESTS:-300000}"
WORKERS="${WORKERS:-2}"
LOG_LEVEL="${LOG_LEVEL:-info}"
PORT="${PORT:-21443}"
UPSTREAM_PORT="${UPSTREAM_PORT:-21080}"
HERE="$(cd "$(dirname "$0")" && pwd)"

# shellcheck source=bench/lab.sh
. "$HERE/lab.sh"
lab_need ab.sh nginx h2load openssl curl python3
for s in $SCENARIOS; do
    case "$s" in hs | h2 | h1) ;; *) echo "ab.sh: unknown scenario '$s'" >&2; exit 2 ;; esac
done
BINS=()
for bin in "$1" "$2"; do
    [[ -x "$bin" ]] || { echo "ab.sh: no executable at $bin" >&2; exit 1; }
    BINS+=("$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")")
done

lab_setup ab
lab_proxy_toml "$WORKERS"

start_proxy() {
    "$1" run --config "$T/proxy.toml" >"$T/access.log" 2>"$T/proxy.err" &
    PROXY_PID=$!
    lab_wait_ready || { echo "ab.sh: $1 did not start (port $PORT taken?), see $T/proxy.err" >&2; exit 1; }
}

stop_proxy() {
    kill "$PROXY_PID" 2>/dev/null || true
    wait "$PROXY_PID" 2>/dev/null || true
    PROXY_PID=""
}

# load SCENARIO UNITS: runs it, fails unless every unit succeeded.
load() {
    local out
    case "$1" in
        hs)
            out="$(python3 "$HERE/handshake.py" --port "$PORT" --path /plain -n "$2" -c "$HS_CLIENTS")"
            grep -q "\"connections\": $2," <<<"$out" && grep -q '"error_total": 0}' <<<"$out" ||
                { echo "ab.sh: handshakes failed: $out" >&2; exit 1; }
            ;;
        h2 | h1)
            local proto=() clients=32 streams=10
            [[ "$1" == h1 ]] && { proto=(--h1); clients=64; streams=1; }
            out="$(h2load "${proto[@]}" -t2 -c"$clients" -m"$streams" -n "$2" "https://127.0.0.1:$PORT/plain")"
            grep -q "^requests: $2 total, $2 started, $2 done, $2 succeeded" <<<"$out" ||
                { echo "ab.sh: requests failed: $(grep '^requests:' <<<"$out")" >&2; exit 1; }
            ;;
    esac
}

# measure BINARY SCENARIO -> µs of CPU per connection or request
measure() {
    local units=$REQUESTS warmup=$((REQUESTS / 10)) before after
    [[ "$2" == hs ]] && { units=$HANDSHAKES; warmup=300; }
    start_proxy "$1"
    load "$2" "$warmup"
    before="$(python3 "$HERE/benchlib.py" cpu "$PROXY_PID")"
    load "$2" "$units"
    after="$(python3 "$HERE/benchlib.py" cpu "$PROXY_PID")"
    stop_proxy
    awk -v b="$before" -v a="$after" -v n="$units" 'BEGIN {printf "%.2f\n", (a - b) / n * 1e6}'
}

RESULTS="$T/results.txt"
for pair in $(seq "$PAIRS"); do
    order=(0 1)
    ((pair % 2 == 0)) && order=(1 0)
    for s in $SCENARIOS; do
        for which in "${order[@]}"; do
            value="$(measure "${BINS[$which]}" "$s")"
            echo "$s $pair $which $value" >>"$RESULTS"
            echo "pair $pair $s $([[ $which == 0 ]] && echo old || echo new) $value" >&2
        done
    done
done

python3 - "$RESULTS" "$1" "$2" <<'EOF'
import collections, statistics, sys
rows = collections.defaultdict(dict)
for line in open(sys.argv[1]):
    scenario, pair, which, value = line.split()
    rows[scenario].setdefault(int(pair), {})[int(which)] = float(value)
unit = {"hs": "µs CPU per connection", "h2": "µs CPU per request", "h1": "µs CPU per request"}
print(f"old: {sys.argv[2]}\nnew: {sys.argv[3]}")
for scenario, pairs in rows.items():
    old = [p[0] for p in pairs.values()]
    new = [p[1] for p in pairs.values()]
    ratios = [p[1] / p[0] for p in pairs.values()]
    print(f"{scenario}: old {statistics.median(old):.2f}, new {statistics.median(new):.2f} {unit[scenario]}; "
          f"new/old {statistics.median(ratios):.3f} (pairs: {', '.join(f'{r:.3f}' for r in ratios)})")
EOF
