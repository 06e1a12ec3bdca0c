# shellcheck shell=bash
# What bench/instructions.sh, bench/ab.sh and bench/spread.sh share,
# sourced by each: a
# temporary directory with a certificate, the nginx upstream answering `ok`,
# the proxy's configuration, and waiting for a proxy to answer. bench/run.sh
# keeps its own, richer set-up (peers, status page, several upstreams).
#
# The sourcing script sets PORT, UPSTREAM_PORT and LOG_LEVEL (EXTRA_TOML
# optional) and keeps the started proxy's PID in PROXY_PID; the EXIT trap
# set here stops the proxy and the upstream.

# lab_need SCRIPT TOOL...: exits, naming the first TOOL missing from PATH.
lab_need() {
    local script="$1" tool
    shift
    for tool in "$@"; do
        command -v "$tool" >/dev/null || { echo "$script: needs $tool" >&2; exit 1; }
    done
}

# lab_setup NAME: T, the directory (/tmp/portcullis-NAME.XXXXXX), with
# key.pem and cert.pem; the upstream running on UPSTREAM_PORT.
lab_setup() {
    T="$(mktemp -d "/tmp/portcullis-$1.XXXXXX")"
    UPSTREAM_PID=""
    PROXY_PID=""
    trap lab_cleanup EXIT

    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
        -subj /CN=localhost -keyout "$T/key.pem" -out "$T/cert.pem" 2>/dev/null

    mkdir -p "$T/upstream"
    cat >"$T/upstream/nginx.conf" <<EOF
daemon off;
worker_processes 1;
pid $T/upstream/nginx.pid;
error_log $T/upstream/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    default_type text/plain;
    keepalive_requests 100000000;
    server { listen 127.0.0.1:$UPSTREAM_PORT; location / { return 200 "ok"; } }
}
EOF
    nginx -p "$T/upstream" -c "$T/upstream/nginx.conf" -e "$T/upstream/error.log" &
    UPSTREAM_PID=$!
}

lab_cleanup() {
    [[ -n "$PROXY_PID" ]] && kill "$PROXY_PID" 2>/dev/null || true
    [[ -n "$UPSTREAM_PID" ]] && kill "$UPSTREAM_PID" 2>/dev/null || true
    # Gone before the next run binds the same ports: valgrind takes a
    # moment to write its last dump and exit.
    wait 2>/dev/null || true
}

# lab_proxy_toml WORKERS: $T/proxy.toml, HSTS and the default security
# headers on, one route (/plain), the pooled upstream.
lab_proxy_toml() {
    cat >"$T/proxy.toml" <<EOF
[server]
https_listen = "127.0.0.1:$PORT"
workers = $1
idle_timeout = "300s"

[tls]
cert = "$T/cert.pem"
key = "$T/key.pem"

[upstream]
url = "http://127.0.0.1:$UPSTREAM_PORT"
pool_idle_timeout = "300s"

[log]
level = "$LOG_LEVEL"

[[routes]]
path = "/plain"

${EXTRA_TOML:-}
EOF
}

# lab_wait_ready: returns once PROXY_PID answers on PORT (up to 2 minutes:
# valgrind starts slowly); fails if it dies or never answers.
lab_wait_ready() {
    for _ in $(seq 240); do
        # Alive first: an answer from whatever else holds the port is not ours.
        kill -0 "$PROXY_PID" 2>/dev/null || return 1
        curl -sk -o /dev/null "https://127.0.0.1:$PORT/plain" && return 0
        sleep 0.5
    done
    return 1
}
