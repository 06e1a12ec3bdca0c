#!/usr/bin/env bash
# Instructions per proxied request, counted by valgrind's callgrind: a
# deterministic measure of the proxy's own CPU work, for comparing two
# builds where wall-clock runs on a shared machine are too noisy to show a
# few per cent. Kernel time (most of a request's cost here) is not counted.
#
#   bench/instructions.sh [BINARY]        # default target/release/portcullis
#
# Knobs: PROTO=h2|h1 (default h2), REQUESTS=4000, WARMUP=1000,
# CLIENTS=8, STREAMS=10 (h2; h1 sends one request at a time per connection),
# PORT=21443 UPSTREAM_PORT=21080, LOG_LEVEL=warn (no access log; "info" is
# the default a user runs: one access line per request, written to a file
# here), EXTRA_TOML (appended to proxy.toml, e.g. $'[headers]\nadd = {}' to
# price the default security headers). Needs valgrind, nginx, h2load, openssl.
# The upstream is nginx answering `ok`, as in bench/run.sh; portcullis runs
# with one worker, HSTS and its default security headers.
#
# Prints "Ir/request N" and keeps the callgrind file (callgrind_annotate it)
# in the temporary directory it names.

set -euo pipefail

BIN="${1:-target/release/portcullis}"
PROTO="${PROTO:-h2}"
REQUESTS="${REQUESTS:-4000}"
WARMUP="${WARMUP:-1000}"
CLIENTS="${CLIENTS:-8}"
STREAMS="${STREAMS:-10}"
PORT="${PORT:-21443}"
UPSTREAM_PORT="${UPSTREAM_PORT:-21080}"
LOG_LEVEL="${LOG_LEVEL:-warn}"

# shellcheck source=bench/lab.sh
. "$(dirname "$0")/lab.sh"
lab_need instructions.sh valgrind callgrind_control nginx h2load openssl curl
[[ -x "$BIN" ]] || { echo "instructions.sh: no executable at $BIN (cargo build --release)" >&2; exit 1; }
BIN="$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")"

lab_setup instructions
lab_proxy_toml 1

valgrind --tool=callgrind --callgrind-out-file="$T/callgrind.out" \
    "$BIN" run --config "$T/proxy.toml" >"$T/proxy.log" 2>&1 &
PROXY_PID=$!

lab_wait_ready ||
    { echo "instructions.sh: the proxy did not start (port $PORT taken?), see $T/proxy.log" >&2; exit 1; }

load() {
    local n="$1"
    if [[ "$PROTO" == h1 ]]; then
        h2load --h1 -c"$CLIENTS" -m1 -t1 -n "$n" "https://127.0.0.1:$PORT/plain"
    else
        h2load -c"$CLIENTS" -m"$STREAMS" -t1 -n "$n" "https://127.0.0.1:$PORT/plain"
    fi
}

# Counted: REQUESTS after WARMUP (connections, pools and caches warm).
load "$WARMUP" >/dev/null
callgrind_control -z "$PROXY_PID" >/dev/null
load "$REQUESTS" | grep -E "^requests:"
callgrind_control -d "$PROXY_PID" >/dev/null

total=0
for dump in "$T"/callgrind.out.*; do
    ir="$(grep -m1 '^summary:' "$dump" | awk '{print $2}')"
    total=$((total + ${ir:-0}))
done
echo "Ir/request $((total / REQUESTS))   ($PROTO, $REQUESTS requests; callgrind files in $T)"
