#!/usr/bin/env bash
# Side-by-side benchmark: portcullis against nginx, HAProxy and h2o doing the
# same job (TLS 1.2/1.3 termination, HSTS, X-Forwarded-For, pooled HTTP/1.1
# keep-alive to one fast upstream), plus the direct-to-upstream ceiling.
# See bench/README.md. Everything listens on 127.0.0.1 only.
#
# Knobs (environment):
#   DURATION=10s            length of each wrk / h2load run
#   ROUNDS=3                rounds; servers alternate inside a round, medians are reported
#   SERVERS="nginx haproxy h2o portcullis direct"
#   SCENARIOS="ka h2 hs mem jwt checks limits"
#                           ka  keep-alive HTTPS/1.1 (wrk -t2 -c64 --latency)
#                           h2  HTTP/2 (h2load -c32 -m10 -t2)
#                           hs  full TLS handshakes, no resumption (bench/handshake.py)
#                           mem KiB per idle TLS keep-alive connection (bench/idleconns.py)
#                           jwt portcullis only: jwt = true + rate_limit route vs a plain route
#                           checks portcullis only: csrf = true and json_schema routes vs a plain
#                               route, POSTs of the same bodies (bench/wrk_post.lua, bench/checks.py)
#                           limits portcullis only: a rate-limited route shared on Redis ([redis], a
#                               redis-server on REDIS_PORT) vs the same route limited in-process vs
#                               /plain, then the Redis-limited route with Redis frozen (SIGSTOP)
#                               (bench/limits.py)
#                           multi  three upstream servers, round robin over keep-alive pools:
#                               nginx, HAProxy and portcullis (wrk and h2load, as ka and h2)
#                           unix   portcullis only: the same upstream over a Unix socket vs TCP
#   LOGS="on off"           access logging of every server, one row each: "on" is what
#                           users run (portcullis at its defaults, one JSON line per request
#                           on stdout to a file; nginx access_log to a file with a JSON
#                           log_format, buffer=64k flush=1s; HAProxy option httplog to
#                           stdout, a file; h2o access-log to a file, JSON); "off" is every
#                           server silent (portcullis [log] level = "warn"), rows "NAME-nolog".
#                           The portcullis-only scenarios (jwt checks limits) run in the
#                           first mode listed.
#   PEER_HEADERS=hsts       the response headers nginx, HAProxy and h2o add: "hsts" (HSTS
#                           only, as most deployments configure them) or "security" (HSTS
#                           and the three headers portcullis adds by default:
#                           X-Content-Type-Options, X-Frame-Options, Referrer-Policy), so
#                           that every server sends the client the same response
#   PORTCULLIS_BIN=path     use this binary instead of `cargo build --release`
#   HANDSHAKES=2000         new connections in the hs scenario
#   HS_TLS=1.3              TLS version of the hs scenario: 1.3, 1.2 or any
#   IDLE_CONNS=2000         idle connections in the mem scenario
#   WORKERS=2               worker processes/threads of every server
#   UPSTREAM_WORKERS=1      worker processes of the upstream nginx
#   SKIP_INSTALL=1          do not apt-get anything (tools must be on PATH)
#   KEEP_TMP=1              keep the temporary directory (configs, logs)
#   RESULTS_DIR=bench/results
#   UPSTREAM_PORT=18080 STATUS_PORT=18081 PROXY_PORT=18443 REDIS_PORT=18379
#   UPSTREAM2_PORT=18082 UPSTREAM3_PORT=18083 (the multi scenario's other two servers)

set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"

DURATION="${DURATION:-10s}"
PEER_HEADERS="${PEER_HEADERS:-hsts}"
ROUNDS="${ROUNDS:-3}"
SERVERS="${SERVERS:-nginx haproxy h2o portcullis direct}"
SCENARIOS="${SCENARIOS:-ka h2 hs mem jwt checks limits}"
HANDSHAKES="${HANDSHAKES:-2000}"
HS_TLS="${HS_TLS:-1.3}"
HS_CONCURRENCY="${HS_CONCURRENCY:-4}"
IDLE_CONNS="${IDLE_CONNS:-2000}"
WORKERS="${WORKERS:-2}"
UPSTREAM_WORKERS="${UPSTREAM_WORKERS:-1}"
RESULTS_DIR="${RESULTS_DIR:-$HERE/results}"
UPSTREAM_PORT="${UPSTREAM_PORT:-18080}"
STATUS_PORT="${STATUS_PORT:-18081}"
PROXY_PORT="${PROXY_PORT:-18443}"
REDIS_PORT="${REDIS_PORT:-18379}"
UPSTREAM2_PORT="${UPSTREAM2_PORT:-18082}"
UPSTREAM3_PORT="${UPSTREAM3_PORT:-18083}"
LOGS="${LOGS:-on off}"
WRK_THREADS="${WRK_THREADS:-2}"
WRK_CONNECTIONS="${WRK_CONNECTIONS:-64}"
H2_CLIENTS="${H2_CLIENTS:-32}"
H2_STREAMS="${H2_STREAMS:-10}"
H2_THREADS="${H2_THREADS:-2}"
PYTHON="${PYTHON:-python3}"
export PYTHONDONTWRITEBYTECODE=1
HOST=127.0.0.1

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
has() { [[ " $2 " == *" $1 "* ]]; }

case "$ROUNDS" in '' | *[!0-9]*) die "ROUNDS must be a positive integer" ;; esac
[[ "$ROUNDS" -ge 1 && "$ROUNDS" -le 50 ]] || die "ROUNDS must be between 1 and 50"
for s in $SERVERS; do
    case "$s" in nginx | haproxy | h2o | portcullis | direct) ;; *) die "unknown server '$s' in SERVERS" ;; esac
done
for s in $SCENARIOS; do
    case "$s" in ka | h2 | hs | mem | jwt | checks | limits | multi | unix) ;; *) die "unknown scenario '$s' in SCENARIOS" ;; esac
done
for s in $LOGS; do
    case "$s" in on | off) ;; *) die "unknown mode '$s' in LOGS (on, off)" ;; esac
done
[[ -n "${LOGS// /}" ]] || die "LOGS must name at least one mode: on, off"
case "$PEER_HEADERS" in hsts | security) ;; *) die "unknown PEER_HEADERS '$PEER_HEADERS' (hsts, security)" ;; esac
[[ -z "${PORTCULLIS_LOG_LEVEL:-}" ]] || die "PORTCULLIS_LOG_LEVEL is gone: LOGS=on runs portcullis at level info, LOGS=off at warn"
read -r -a LOG_MODES <<<"$LOGS"
# the portcullis-only route comparisons run once, in the first mode
EXTRA_MODE="${LOG_MODES[0]}"

# seconds in DURATION (wrk and h2load both take 10s / 2m / 10)
duration_seconds() {
    local d="$1"
    case "$d" in
        *ms) echo 1 ;;
        *s) echo "${d%s}" ;;
        *m) echo $((${d%m} * 60)) ;;
        *h) echo $((${d%h} * 3600)) ;;
        *) echo "$d" ;;
    esac
}
DURATION_S="$(duration_seconds "$DURATION")"
[[ "$DURATION_S" =~ ^[0-9]+$ ]] || die "DURATION must look like 10s, 2m or 10"
RUN_TIMEOUT=$((DURATION_S + 120))

# ---------------------------------------------------------------------------
# 1. tools

install_tools() {
    local missing=()
    command -v nginx >/dev/null || missing+=(nginx)
    command -v haproxy >/dev/null || missing+=(haproxy)
    command -v h2o >/dev/null || missing+=(h2o)
    command -v wrk >/dev/null || missing+=(wrk)
    command -v h2load >/dev/null || missing+=(nghttp2-client)
    command -v openssl >/dev/null || missing+=(openssl)
    command -v curl >/dev/null || missing+=(curl)
    command -v "$PYTHON" >/dev/null || { missing+=(python3); PYTHON=python3; }
    command -v setsid >/dev/null || missing+=(util-linux)
    if has limits "$SCENARIOS"; then command -v redis-server >/dev/null || missing+=(redis-server); fi
    if [[ ${#missing[@]} -eq 0 ]]; then
        log "tools present: nginx haproxy h2o wrk h2load openssl curl $PYTHON"
        return
    fi
    [[ "${SKIP_INSTALL:-0}" == 1 ]] && die "missing tools (${missing[*]}) and SKIP_INSTALL=1"
    [[ "$(id -u)" == 0 ]] || die "missing tools (${missing[*]}); run as root so apt-get can install them"
    log "installing: ${missing[*]}"
    apt-get update
    # The packages' own services must not start (they would listen on :80 and
    # eat CPU during the run): a policy-rc.d is put in place only if there is
    # none, and removed again only if we put it there.
    local policy=/usr/sbin/policy-rc.d created_policy=0
    if [[ ! -e "$policy" ]]; then
        printf '#!/bin/sh\n# temporary, bench/run.sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        created_policy=1
    fi
    local rc=0
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" || rc=$?
    [[ $created_policy == 1 ]] && rm -f "$policy"
    [[ $rc == 0 ]] || die "apt-get install failed"
}

# ---------------------------------------------------------------------------
# 2. processes: everything started is recorded and killed on exit

T=""
PIDS_FILE=""
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [[ -n "$PIDS_FILE" && -f "$PIDS_FILE" ]]; then
        local pid
        while read -r pid; do
            [[ -n "$pid" ]] && stop_pid "$pid" quiet
        done <"$PIDS_FILE"
    fi
    if [[ -n "$T" && -d "$T" ]]; then
        if [[ "${KEEP_TMP:-0}" == 1 ]]; then
            log "kept $T"
        else
            rm -rf "$T"
        fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

alive() { # alive PID: running and not a zombie
    local st
    [[ -r "/proc/$1/stat" ]] || return 1
    st="$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)" || return 1
    [[ -n "$st" && "$st" != Z ]]
}

# stop_pid PID [quiet]: SIGTERM to the process group (servers are started with
# setsid, so the group holds the master and its workers), up to 10 s, then SIGKILL.
stop_pid() {
    local pid="$1" target="$1" i
    # field 5 of /proc/PID/stat is the process group (no procps needed)
    if [[ "$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f3)" == "$pid" ]]; then
        target="-$pid"
    fi
    kill -TERM -- "$target" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        alive "$pid" || break
        sleep 0.1
    done
    if alive "$pid"; then
        [[ "${2:-}" == quiet ]] || log "pid $pid did not stop in 10 s: SIGKILL"
        kill -KILL -- "$target" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
    if [[ -n "$PIDS_FILE" && -f "$PIDS_FILE" ]]; then
        sed -i "/^$pid\$/d" "$PIDS_FILE"
    fi
}

port_open() { (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }

wait_port() { # wait_port PORT PID NAME: up to 15 s for the port to accept
    local port="$1" pid="$2" name="$3" i
    for ((i = 0; i < 150; i++)); do
        alive "$pid" || return 1
        port_open "$port" && return 0
        sleep 0.1
    done
    log "$name did not open port $port within 15 s"
    return 1
}

# start_bg NAME LOGPREFIX CMD...: starts CMD in its own session; sets STARTED_PID
STARTED_PID=""
start_bg() {
    local name="$1" logp="$2"
    shift 2
    setsid "$@" >"$logp.stdout" 2>"$logp.stderr" </dev/null &
    STARTED_PID=$!
    echo "$STARTED_PID" >>"$PIDS_FILE"
}

# ---------------------------------------------------------------------------
# 3. setup

install_tools

ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
NOFILE="$(ulimit -n)"
[[ "$NOFILE" == unlimited ]] && NOFILE=1048576
if [[ "$NOFILE" -lt $((2 * IDLE_CONNS + 1000)) ]]; then
    die "open-file limit $NOFILE is too low for IDLE_CONNS=$IDLE_CONNS (hard limit $(ulimit -Hn))"
fi
log "open-file limit: $NOFILE (65536 asked; the hard limit here is $(ulimit -Hn))"

for p in "$UPSTREAM_PORT" "$STATUS_PORT" "$PROXY_PORT" "$UPSTREAM2_PORT" "$UPSTREAM3_PORT"; do
    port_open "$p" && die "port $HOST:$p is already in use (set UPSTREAM_PORT/STATUS_PORT/PROXY_PORT)"
done

T="$(mktemp -d /tmp/portcullis-bench.XXXXXX)"
chmod 755 "$T"
PIDS_FILE="$T/pids"
: >"$PIDS_FILE"
mkdir -p "$RESULTS_DIR" "$T/logs"
RAW="$T/raw.jsonl"
: >"$RAW"
: >"$T/checks.tsv"
: >"$T/notes.txt"
log "work directory: $T"

# ECDSA P-256 certificate for localhost / 127.0.0.1
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$T/key.pem" -out "$T/cert.pem" -days 7 -subj "/CN=localhost" \
    -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" 2>/dev/null ||
    die "openssl could not generate the certificate"
cat "$T/cert.pem" "$T/key.pem" >"$T/combined.pem"
chmod 600 "$T/key.pem" "$T/combined.pem"

# portcullis binary
PORTCULLIS=""
if has portcullis "$SERVERS"; then
    if [[ -n "${PORTCULLIS_BIN:-}" ]]; then
        PORTCULLIS="$PORTCULLIS_BIN"
    else
        command -v cargo >/dev/null || die "cargo not found: install Rust or set PORTCULLIS_BIN"
        log "cargo build --release (in $ROOT)"
        (cd "$ROOT" && cargo build --release) || die "cargo build --release failed"
        PORTCULLIS="$ROOT/target/release/portcullis"
    fi
    [[ -x "$PORTCULLIS" ]] || die "portcullis binary $PORTCULLIS is not executable"
fi

JWT_SECRET="$(openssl rand -hex 32)"
export BENCH_JWT_SECRET="$JWT_SECRET"
HSTS="max-age=31536000; includeSubDomains"
# The headers portcullis adds by default besides HSTS ([headers] add in SPEC).
SECURITY_HEADERS=("X-Content-Type-Options: nosniff" "X-Frame-Options: DENY"
    "Referrer-Policy: strict-origin-when-cross-origin")
NGINX_PEER_HEADERS=""
HAPROXY_PEER_HEADERS=""
# h2o 2.2 takes one header.* command of a kind per level, and a level
# inherits its parents' commands: one of the three at each level.
H2O_GLOBAL_HEADERS=""
H2O_HOST_HEADERS=""
H2O_PATH_HEADERS=""
if [[ "$PEER_HEADERS" == security ]]; then
    for header in "${SECURITY_HEADERS[@]}"; do
        NGINX_PEER_HEADERS+="
            add_header ${header%%: *} \"${header#*: }\" always;"
        HAPROXY_PEER_HEADERS+="
    http-response set-header ${header%%: *} \"${header#*: }\""
    done
    H2O_PATH_HEADERS="
        header.setifempty: \"${SECURITY_HEADERS[0]}\""
    H2O_HOST_HEADERS="
    header.setifempty: \"${SECURITY_HEADERS[1]}\""
    H2O_GLOBAL_HEADERS="header.setifempty: \"${SECURITY_HEADERS[2]}\""
fi

# ---------------------------------------------------------------------------
# 4. configurations

mkdir -p "$T/upstream" "$T/nginx" "$T/haproxy" "$T/h2o" "$T/portcullis"
NGINX_CONNS=$((NOFILE / 2 > 16384 ? 16384 : NOFILE / 2))
HAPROXY_MAXCONN=$((NOFILE / 2 - 200))

common_nginx_paths() { # temp paths inside the prefix, so nothing outside $T is written
    local d="$1"
    mkdir -p "$d/tmp"
    cat <<EOF
    client_body_temp_path $d/tmp/body;
    proxy_temp_path $d/tmp/proxy;
    fastcgi_temp_path $d/tmp/fastcgi;
    uwsgi_temp_path $d/tmp/uwsgi;
    scgi_temp_path $d/tmp/scgi;
EOF
}

# The one upstream: answers "ok"; stub_status on its own port so every
# proxy's upstream connections and requests can be counted.
# POSTs of the checks scenario (/plain, /csrf, /schema) are answered only
# once the whole body has been read, as an application that uses the body
# does: `return` answers at once and discards the body as it arrives, and a
# proxy that streams the upload then sees an answer to an unfinished request
# (portcullis does not reuse such an upstream connection, and wrk then saw
# socket errors on its client connections: the baseline measured reconnects). So
# mirror_request_body reads the body (in memory) first, the static handler
# refuses a POST to an existing file (405) and error_page turns that into
# the same 200 "ok". GETs there (the jwt scenario's /plain) still get `return`.
mkdir -p "$T/upstream/www"
for f in plain csrf schema; do echo ok >"$T/upstream/www/$f"; done
cat >"$T/upstream/nginx.conf" <<EOF
user root;
daemon off;
worker_processes $UPSTREAM_WORKERS;
worker_rlimit_nofile $NOFILE;
pid $T/upstream/nginx.pid;
error_log $T/upstream/error.log warn;
events { worker_connections $NGINX_CONNS; }
http {
    access_log off;
    server_tokens off;
    default_type text/plain;
    keepalive_requests 100000000;
    keepalive_timeout 600s;
$(common_nginx_paths "$T/upstream")
    server {
        listen $HOST:$UPSTREAM_PORT;
        listen $HOST:$UPSTREAM2_PORT;
        listen $HOST:$UPSTREAM3_PORT;
        listen unix:$T/upstream/app.sock;
        location = /xff { return 200 "\$http_x_forwarded_for"; }
        location / { return 200 "ok"; }
        location ~ ^/(plain|csrf|schema)\$ {
            if (\$request_method != POST) { return 200 "ok"; }
            client_body_buffer_size 128k;
            mirror /_mirror;
            mirror_request_body on;
            root $T/upstream/www;
            error_page 405 =200 @ok;
        }
        location = /_mirror { internal; return 204; }
        location @ok { return 200 "ok"; }
    }
    server {
        listen $HOST:$STATUS_PORT;
        location = /status { stub_status; }
    }
}
EOF

# Access logging for LOGS=on, the same fields as portcullis's JSON line
# (SPEC "Logs"); nginx's recommended buffered file log.
NGINX_ACCESS_ON='log_format bench_json escape=json '"'"'{"time":"$time_iso8601","client":"$remote_addr","method":"$request_method","path":"$uri","route":"-","status":$status,"bytes":$body_bytes_sent,"duration_ms":$request_time,"upstream_status":"$upstream_status","tls":"$ssl_protocol"}'"'"';
    access_log '"$T"'/nginx/access.log bench_json buffer=64k flush=1s;'
write_nginx_conf() { # write_nginx_conf FILE ACCESS_LOG_LINES [UPSTREAM_SERVER_LINES]
    local file="$1" access="$2" servers="${3:-server $HOST:$UPSTREAM_PORT;}"
    cat >"$file" <<EOF
user root;
daemon off;
worker_processes $WORKERS;
worker_rlimit_nofile $NOFILE;
pid $T/nginx/nginx.pid;
error_log $T/nginx/error.log warn;
events { worker_connections $NGINX_CONNS; }
http {
    $access
    server_tokens off;
    keepalive_requests 100000000;      # 1.22 default 1000 closes client connections (and h2) early
    keepalive_timeout 300s;
$(common_nginx_paths "$T/nginx")
    upstream app {
        $servers
        keepalive 512;                 # idle pool per worker; >= h2's 320 concurrent streams
        keepalive_requests 100000000;
        keepalive_timeout 300s;
    }
    server {
        listen $HOST:$PROXY_PORT ssl http2 reuseport;
        ssl_certificate $T/cert.pem;
        ssl_certificate_key $T/key.pem;
        ssl_protocols TLSv1.2 TLSv1.3;
        location / {
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host \$host;
            proxy_set_header X-Forwarded-For \$remote_addr;
            proxy_set_header X-Forwarded-Proto https;
            add_header Strict-Transport-Security "$HSTS" always;$NGINX_PEER_HEADERS
        }
    }
}
EOF
}
write_nginx_conf "$T/nginx/nginx-nolog.conf" "access_log off;"
write_nginx_conf "$T/nginx/nginx-log.conf" "$NGINX_ACCESS_ON"
# multi: three servers, round robin (nginx's default), the same keep-alive pool
MULTI_NGINX="server $HOST:$UPSTREAM_PORT; server $HOST:$UPSTREAM2_PORT; server $HOST:$UPSTREAM3_PORT;"
write_nginx_conf "$T/nginx/nginx-multi-nolog.conf" "access_log off;" "$MULTI_NGINX"
write_nginx_conf "$T/nginx/nginx-multi-log.conf" "$NGINX_ACCESS_ON" "$MULTI_NGINX"

# LOGS=on: HAProxy's standard HTTP log line (option httplog) to standard
# output, which is a file here; LOGS=off: no "log" line, no logging at all.
write_haproxy_cfg() { # write_haproxy_cfg FILE GLOBAL_LOG DEFAULTS_LOG [BACKEND_LINES]
    local backend="${4:-    server s1 $HOST:$UPSTREAM_PORT}"
    cat >"$1" <<EOF
global
    nbthread $WORKERS
    maxconn $HAPROXY_MAXCONN
    ssl-default-bind-options ssl-min-ver TLSv1.2
$2

defaults
    mode http
$3
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 300s
    timeout server 30s
    timeout http-request 10s
    timeout http-keep-alive 300s

frontend fe
    bind $HOST:$PROXY_PORT ssl crt $T/combined.pem alpn h2,http/1.1
    http-request set-header X-Forwarded-For %[src]
    http-request set-header X-Forwarded-Proto https
    http-response set-header Strict-Transport-Security "$HSTS"$HAPROXY_PEER_HEADERS
    default_backend app

backend app
    http-reuse always
$backend
EOF
}
write_haproxy_cfg "$T/haproxy/haproxy-nolog.cfg" "" ""
write_haproxy_cfg "$T/haproxy/haproxy-log.cfg" "    log stdout format raw local0 info" "    log global
    option httplog"
MULTI_HAPROXY="    balance roundrobin
    server s1 $HOST:$UPSTREAM_PORT
    server s2 $HOST:$UPSTREAM2_PORT
    server s3 $HOST:$UPSTREAM3_PORT"
write_haproxy_cfg "$T/haproxy/haproxy-multi-nolog.cfg" "" "" "$MULTI_HAPROXY"
write_haproxy_cfg "$T/haproxy/haproxy-multi-log.cfg" "    log stdout format raw local0 info" "    log global
    option httplog" "$MULTI_HAPROXY"

# LOGS=on: h2o's access-log to a file, in JSON with portcullis's fields
H2O_ACCESS_ON="access-log:
  path: $T/h2o/access.log
  escape: json
  format: '{\"time\":\"%{%Y-%m-%dT%H:%M:%S%z}t\",\"client\":\"%h\",\"method\":\"%m\",\"path\":\"%U\",\"route\":\"-\",\"status\":%s,\"bytes\":%b,\"duration_ms\":%{duration}x,\"upstream_status\":\"%s\",\"tls\":\"%{ssl.protocol-version}x\"}'"
write_h2o_conf() { # write_h2o_conf FILE ACCESS_LOG_YAML
    cat >"$1" <<EOF
$2
user: root
pid-file: $T/h2o/h2o.pid
num-threads: $WORKERS
max-connections: 10000
http1-request-timeout: 300
http2-idle-timeout: 300
proxy.timeout.keepalive: 300000
proxy.preserve-host: ON
listen:
  host: $HOST
  port: $PROXY_PORT
  ssl:
    certificate-file: $T/cert.pem
    key-file: $T/key.pem
    minimum-version: TLSv1.2
    ocsp-update-interval: 0     # no OCSP helper process (self-signed cert has no OCSP URI)
$H2O_GLOBAL_HEADERS
hosts:
  default:
    paths:
      /:
        proxy.reverse.url: http://$HOST:$UPSTREAM_PORT/
        header.add: "Strict-Transport-Security: $HSTS"$H2O_PATH_HEADERS$H2O_HOST_HEADERS
EOF
}
write_h2o_conf "$T/h2o/h2o-nolog.conf" ""
write_h2o_conf "$T/h2o/h2o-log.conf" "$H2O_ACCESS_ON"
# h2o adds X-Forwarded-For / X-Forwarded-Proto by default
# (proxy.emit-x-forwarded-headers: ON) and writes no access log unless told.

cat >"$T/portcullis/proxy.toml" <<EOF
# HSTS, X-Forwarded-For and the pooled HTTP/1.1 upstream are portcullis's
# defaults; so are its security headers (more work than the peers do unless
# PEER_HEADERS=security).
[server]
https_listen = "$HOST:$PROXY_PORT"
workers = $WORKERS
max_connections = 10000
idle_timeout = "300s"
shutdown_timeout = "2s"

[tls]
cert = "$T/cert.pem"
key = "$T/key.pem"
min_version = "1.2"

[upstream]
url = "http://$HOST:$UPSTREAM_PORT"
pool_idle_timeout = "300s"

[jwt]
algorithms = ["HS256"]
secret_env = "BENCH_JWT_SECRET"
issuer = "bench"
audience = "bench"

[log]
format = "json"
level = "info"                  # the default: one access line per request (LOGS=off: "warn", none)

[[routes]]
path = "/plain"

[[routes]]
path = "/jwt"
jwt = true
rate_limit = { rate = "100000000/s", burst = 100000000, key = "sub" }
EOF

# checks scenario: a CSRF route and a JSON-schema route beside /plain (only
# when the scenario runs, so an older binary without these keys still runs
# the others). The schema: an order, items of {sku, qty} and a note.
CHECKS_DIR="$T/checks"
if has portcullis "$SERVERS" && has checks "$SCENARIOS"; then
    cat >"$T/bench-schema.json" <<'EOF'
{
  "$schema": "https://json-schema.org/draft/2020-12/schema",
  "type": "object",
  "required": ["items"],
  "additionalProperties": false,
  "properties": {
    "items": {
      "type": "array",
      "minItems": 1,
      "items": {
        "type": "object",
        "required": ["sku", "qty"],
        "additionalProperties": false,
        "properties": {
          "sku": { "type": "string", "pattern": "^[A-Z]{3}-[0-9]+$" },
          "qty": { "type": "integer", "minimum": 1 }
        }
      }
    },
    "note": { "type": "string" }
  }
}
EOF
    cat >>"$T/portcullis/proxy.toml" <<EOF

[[routes]]
path = "/csrf"
csrf = true

[[routes]]
path = "/schema"
json_schema = "$T/bench-schema.json"
max_body_bytes = "1MiB"
EOF
    # valid 1 KiB and 64 KiB orders, a tiny form body, an invalid order
    bodies_info="$("$PYTHON" "$HERE/checks.py" bodies "$CHECKS_DIR")" || die "checks.py could not write the request bodies"
    log "checks scenario bodies: $bodies_info"
fi

# limits scenario: the same effectively unlimited rate_limit (it never
# refuses, so every request is forwarded) on /limited, counted in-process by
# proxy.toml and on Redis by proxy-redis.toml (proxy.toml plus [redis]).
if has portcullis "$SERVERS" && has limits "$SCENARIOS"; then
    cat >>"$T/portcullis/proxy.toml" <<EOF

[[routes]]
path = "/limited"
rate_limit = { rate = "100000000/s", burst = 100000000, key = "ip" }
EOF
    cp "$T/portcullis/proxy.toml" "$T/portcullis/proxy-redis.toml"
    cat >>"$T/portcullis/proxy-redis.toml" <<EOF

[redis]
url = "redis://$HOST:$REDIS_PORT"
key_prefix = "bench"
timeout = "25ms"
on_error = "local"
EOF
fi

# multi: the same three servers, round robin; unix: the upstream over its
# Unix socket. Copies of proxy.toml with another [upstream].
if has portcullis "$SERVERS" && { has multi "$SCENARIOS" || has unix "$SCENARIOS"; }; then
    sed "s|^url = \"http://$HOST:$UPSTREAM_PORT\"|servers = [\"http://$HOST:$UPSTREAM_PORT\", \"http://$HOST:$UPSTREAM2_PORT\", \"http://$HOST:$UPSTREAM3_PORT\"]\nbalance = \"round_robin\"|" \
        "$T/portcullis/proxy.toml" >"$T/portcullis/proxy-multi.toml"
    sed "s|^url = \"http://$HOST:$UPSTREAM_PORT\"|url = \"unix:$T/upstream/app.sock\"|" \
        "$T/portcullis/proxy.toml" >"$T/portcullis/proxy-unix.toml"
fi

# LOGS=off: the same portcullis configurations at level "warn"
for f in "$T"/portcullis/proxy*.toml; do
    sed 's/^level = "info".*/level = "warn"                  # access lines are info: none are written/' "$f" >"${f%.toml}-nolog.toml"
done

# the configuration file of SERVER in MODE (on / off)
server_config() { # server_config SERVER MODE [VARIANT: redis, multi, unix]
    local d="$T/$1" suffix=log variant="${3:+-$3}"
    [[ "$2" == off ]] && suffix=nolog
    case "$1" in
        nginx) echo "$d/nginx$variant-$suffix.conf" ;;
        haproxy) echo "$d/haproxy$variant-$suffix.cfg" ;;
        h2o) echo "$d/h2o-$suffix.conf" ;;
        portcullis)
            if [[ "$2" == off ]]; then echo "$d/proxy$variant-nolog.toml"; else echo "$d/proxy$variant.toml"; fi
            ;;
    esac
}

log "checking configurations"
nginx -t -p "$T/upstream" -c "$T/upstream/nginx.conf" -e "$T/upstream/error.log" 2>"$T/logs/check-upstream.txt" ||
    { cat "$T/logs/check-upstream.txt" >&2; die "upstream nginx config"; }
for mode in "${LOG_MODES[@]}"; do
    if has nginx "$SERVERS"; then
        nginx -t -p "$T/nginx" -c "$(server_config nginx "$mode")" -e "$T/nginx/error.log" 2>"$T/logs/check-nginx.txt" ||
            { cat "$T/logs/check-nginx.txt" >&2; die "nginx config (logs $mode)"; }
    fi
    if has haproxy "$SERVERS"; then
        haproxy -c -f "$(server_config haproxy "$mode")" >"$T/logs/check-haproxy.txt" 2>&1 ||
            { cat "$T/logs/check-haproxy.txt" >&2; die "haproxy config (logs $mode)"; }
    fi
    if has h2o "$SERVERS"; then
        h2o -t -c "$(server_config h2o "$mode")" >"$T/logs/check-h2o.txt" 2>&1 ||
            { cat "$T/logs/check-h2o.txt" >&2; die "h2o config (logs $mode)"; }
    fi
    if has portcullis "$SERVERS"; then
        "$PORTCULLIS" check --config "$(server_config portcullis "$mode")" >"$T/logs/check-portcullis.txt" 2>&1 ||
            { cat "$T/logs/check-portcullis.txt" >&2; die "portcullis config (logs $mode)"; }
        if has limits "$SCENARIOS"; then
            "$PORTCULLIS" check --config "$(server_config portcullis "$mode" redis)" >"$T/logs/check-portcullis-redis.txt" 2>&1 ||
                { cat "$T/logs/check-portcullis-redis.txt" >&2; die "portcullis config with [redis] (logs $mode)"; }
        fi
    fi
done
if has portcullis "$SERVERS"; then
    TOKEN="$("$PORTCULLIS" token --config "$T/portcullis/proxy.toml" --sub bench --ttl 24h)" ||
        die "portcullis token failed"
fi

# ---------------------------------------------------------------------------
# 5. servers

UPSTREAM_PID=""
start_upstream() {
    start_bg upstream "$T/upstream/run" nginx -p "$T/upstream" -c "$T/upstream/nginx.conf" -e "$T/upstream/error.log"
    UPSTREAM_PID=$STARTED_PID
    wait_port "$UPSTREAM_PORT" "$UPSTREAM_PID" upstream && wait_port "$STATUS_PORT" "$UPSTREAM_PID" upstream ||
        { cat "$T/upstream/error.log" "$T/upstream/run.stderr" >&2 2>/dev/null; die "upstream nginx did not start"; }
}

SERVER_PID=""
start_server() { # start_server NAME MODE [VARIANT]
    local name="$1" mode="$2" d="$T/$1" config
    config="$(server_config "$name" "$mode" "${3:-}")"
    port_open "$PROXY_PORT" && die "port $PROXY_PORT still in use before starting $name"
    case "$name" in
        nginx) start_bg nginx "$d/run" nginx -p "$d" -c "$config" -e "$d/error.log" ;;
        haproxy) start_bg haproxy "$d/run" haproxy -db -f "$config" ;;
        h2o) start_bg h2o "$d/run" h2o -c "$config" ;;
        portcullis) start_bg portcullis "$d/run" "$PORTCULLIS" run --config "$config" ;;
    esac
    SERVER_PID=$STARTED_PID
    if ! wait_port "$PROXY_PORT" "$SERVER_PID" "$name"; then
        tail -n 30 "$d/run.stderr" "$d/error.log" >&2 2>/dev/null || true
        die "$name did not start"
    fi
    if [[ "$name" == portcullis ]]; then
        # every worker binds its own SO_REUSEPORT listener: wait for the banner too
        local i
        for ((i = 0; i < 50; i++)); do
            grep -q "https listening" "$d/run.stderr" && break
            sleep 0.1
        done
    fi
    sleep 0.3
}

# access_lines NAME: lines in NAME's access log (after it stopped, so buffers are flushed)
access_lines() {
    local file
    case "$1" in
        nginx | h2o) file="$T/$1/access.log" ;;
        haproxy) file="$T/haproxy/run.stdout" ;;
        portcullis)
            grep -c '"target":"access"' "$T/portcullis/run.stdout" 2>/dev/null || true
            return
            ;;
    esac
    if [[ -f "$file" ]]; then wc -l <"$file"; else echo 0; fi
}

stop_server() { # stop_server NAME MODE ROUND
    local name="$1" mode="$2" round="$3" lines
    [[ -n "$SERVER_PID" ]] || return 0
    stop_pid "$SERVER_PID"
    SERVER_PID=""
    # every server logged in LOGS=on and none in LOGS=off (portcullis's
    # security events, e.g. the smoke check's deliberate 401, are warn and stay)
    lines="$(access_lines "$name")"
    lines="${lines:-0}"
    printf '%s\t%s\t%s\n' "$name" "$mode" "$lines" >>"$T/access-lines.tsv"
    if [[ "$mode" == off && "$lines" != 0 ]]; then
        echo "$name wrote $lines access-log lines in round $round with logging off" >>"$T/notes.txt"
        log "WARNING: $name wrote $lines access-log lines with logging off"
    fi
    if [[ "$name" == portcullis ]]; then
        # (not the access lines themselves: with logs on they are millions)
        grep -v '"target":"access"' "$T/portcullis/run.stdout" >>"$T/logs/portcullis-stdout-all.txt" || true
        # keep its stderr for the report (errors under load)
        cat "$T/portcullis/run.stderr" >>"$T/logs/portcullis-stderr-all.txt"
    fi
    rm -f "$T/$name/run.stdout" "$T/$name/access.log"
    # wait (bounded) for the listening socket to go away
    local i
    for ((i = 0; i < 50; i++)); do
        port_open "$PROXY_PORT" || break
        sleep 0.1
    done
}

# ---------------------------------------------------------------------------
# 6. fairness and correctness checks (once per server, before the first round)

check() { # check SERVER TEXT
    printf '%s\t%s\n' "$1" "$2" >>"$T/checks.tsv"
    log "check $1: $2"
}

smoke_check() { # smoke_check SERVER ROW
    local name="$1" row="$2" url="https://$HOST:$PROXY_PORT" out problems=() x
    out="$(curl -sk --http1.1 --tlsv1.2 --tls-max 1.2 -D - -o /dev/null -w 'STATUS=%{http_code}' "$url/")" || true
    [[ "$out" == *"STATUS=200"* ]] || problems+=("TLS 1.2 request did not get 200")
    out="$(curl -sk --http1.1 --tlsv1.3 -D - -o /dev/null -w 'STATUS=%{http_code}' "$url/")" || true
    [[ "$out" == *"STATUS=200"* ]] || problems+=("TLS 1.3 request did not get 200")
    grep -qi "^strict-transport-security: max-age=31536000" <<<"$out" || problems+=("no HSTS header")
    if [[ "$PEER_HEADERS" == security || "$name" == portcullis ]]; then
        for x in "${SECURITY_HEADERS[@]}"; do
            grep -qi "^$x" <<<"$out" || problems+=("no '$x' header")
        done
    fi
    x="$(curl -sk --http2 -o /dev/null -w '%{http_version}' "$url/")" || true
    [[ "$x" == 2 ]] || problems+=("HTTP/2 not negotiated (got '$x')")
    x="$(curl -sk --http1.1 "$url/xff")" || true
    [[ "$x" == "$HOST" ]] || problems+=("upstream saw X-Forwarded-For '$x', expected $HOST")
    if curl -sk --http1.1 --tlsv1.1 --tls-max 1.1 -o /dev/null "$url/" 2>/dev/null; then
        problems+=("TLS 1.1 accepted")
    fi
    if [[ ${#problems[@]} -eq 0 ]]; then
        x="HSTS added"
        [[ "$PEER_HEADERS" == security || "$name" == portcullis ]] && x="HSTS and the three security headers added"
        check "$row" "ok: TLS 1.2 and 1.3 (1.1 refused), h2 by ALPN, $x, X-Forwarded-For=$HOST at the upstream"
    else
        check "$row" "PROBLEM: $(IFS='; '; echo "${problems[*]}")"
    fi
    if [[ "$name" == portcullis ]]; then
        local a b
        a="$(curl -sk -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $TOKEN" "$url/jwt")" || true
        b="$(curl -sk -o /dev/null -w '%{http_code}' "$url/jwt")" || true
        if [[ "$a" == 200 && "$b" == 401 ]]; then
            check "$row" "ok: /jwt answers 200 with the bench token and 401 without"
        else
            check "$row" "PROBLEM: /jwt answered $a with the token and $b without"
        fi
        has checks "$SCENARIOS" && checks_smoke_check "$url"
    fi
    return 0
}

# post_code URL FILE CONTENT-TYPE [curl args...]: the status of one HTTP/1.1 POST of FILE
post_code() {
    local url="$1" file="$2" ctype="$3"
    shift 3
    curl -sk --http1.1 -o /dev/null -w '%{http_code}' -X POST -H "Content-Type: $ctype" \
        --data-binary "@$file" "$@" "$url" || true
}

SAME_ORIGIN=(-H "Sec-Fetch-Site: same-origin" -H "Origin: https://localhost:$PROXY_PORT")
CROSS_SITE=(-H "Sec-Fetch-Site: cross-site" -H "Origin: https://evil.example")
FORM=application/x-www-form-urlencoded

checks_smoke_check() { # the checks refuse what they must, and every request wrk sends gets 200
    local url="$1" d="$CHECKS_DIR" problems=() c
    c="$(post_code "$url/csrf" "$d/body-small.txt" "$FORM" "${CROSS_SITE[@]}")"
    [[ "$c" == 403 ]] || problems+=("/csrf cross-site POST (Origin: https://evil.example) answered $c, not 403")
    c="$(post_code "$url/csrf" "$d/body-small.txt" "$FORM" "${SAME_ORIGIN[@]}")"
    [[ "$c" == 200 ]] || problems+=("/csrf same-origin POST answered $c, not 200")
    c="$(post_code "$url/schema" "$d/body-invalid.json" application/json)"
    [[ "$c" == 400 ]] || problems+=("/schema invalid body answered $c, not 400")
    c="$(post_code "$url/schema" "$d/body-1k.json" application/json)"
    [[ "$c" == 200 ]] || problems+=("/schema valid 1 KiB body answered $c, not 200")
    c="$(post_code "$url/schema" "$d/body-64k.json" application/json)"
    [[ "$c" == 200 ]] || problems+=("/schema valid 64 KiB body answered $c, not 200")
    c="$(post_code "$url/plain" "$d/body-small.txt" "$FORM" "${SAME_ORIGIN[@]}")"
    [[ "$c" == 200 ]] || problems+=("/plain small POST answered $c, not 200")
    c="$(post_code "$url/plain" "$d/body-1k.json" application/json)"
    [[ "$c" == 200 ]] || problems+=("/plain 1 KiB POST answered $c, not 200")
    c="$(post_code "$url/plain" "$d/body-64k.json" application/json)"
    [[ "$c" == 200 ]] || problems+=("/plain 64 KiB POST answered $c, not 200")
    if [[ ${#problems[@]} -eq 0 ]]; then
        check portcullis "ok: /csrf answers 403 cross-site and 200 same-origin; /schema answers 400 to an invalid body and 200 to the valid 1 KiB and 64 KiB bodies; /plain answers 200 to the three POSTs"
    else
        check portcullis "PROBLEM: $(IFS='; '; echo "${problems[*]}")"
    fi
}

# ---------------------------------------------------------------------------
# 7. measurements

STATUS_URL="http://$HOST:$STATUS_PORT/status"

measure() { # measure ROUND SERVER SCENARIO KIND PID CMD...
    local round="$1" server="$2" scenario="$3" kind="$4" pid="$5"
    shift 5
    # in the background, in its own process group, so that a signal reaches
    # the trap at once and cleanup can stop the load generator too
    setsid "$PYTHON" "$HERE/benchlib.py" measure --raw "$RAW" --log "$T/logs/r$round-$server-$scenario.log" \
        --round "$round" --server "$server" --scenario "$scenario" --kind "$kind" --pid "$pid" \
        --status-url "$STATUS_URL" --timeout "$RUN_TIMEOUT" -- "$@" </dev/null &
    local mpid=$!
    echo "$mpid" >>"$PIDS_FILE"
    wait "$mpid" || log "measurement $server/$scenario failed (log: $T/logs/r$round-$server-$scenario.log; KEEP_TMP=1 keeps it)"
    sed -i "/^$mpid\$/d" "$PIDS_FILE"
    sleep 1
}

# the row of SERVER in MODE: the name alone with logs on (what users run),
# NAME-nolog with logs off
label() { if [[ "$2" == off ]]; then echo "$1-nolog"; else echo "$1"; fi; }

run_server_round() { # run_server_round ROUND SERVER MODE
    local round="$1" name="$2" mode="$3" url="https://$HOST:$PROXY_PORT" row
    row="$(label "$name" "$mode")"
    # the portcullis-only route comparisons: once per round, in the first mode
    local extras=0
    [[ "$name" == portcullis && "$mode" == "$EXTRA_MODE" ]] && extras=1
    # three upstream servers: nginx, HAProxy and portcullis, in the first mode
    local multi=0
    if has multi "$SCENARIOS" && [[ "$mode" == "$EXTRA_MODE" ]]; then
        case "$name" in nginx | haproxy | portcullis) multi=1 ;; esac
    fi
    if [[ "$name" == direct ]]; then
        if has ka "$SCENARIOS"; then
            measure "$round" direct ka wrk "$UPSTREAM_PID" \
                wrk -t"$WRK_THREADS" -c"$WRK_CONNECTIONS" -d"$DURATION" --latency -s "$HERE/wrk_report.lua" \
                "http://$HOST:$UPSTREAM_PORT/"
        fi
        return
    fi
    # (4) memory first, on a freshly started server
    if has mem "$SCENARIOS"; then
        start_server "$name" "$mode"
        measure "$round" "$row" mem idle "$SERVER_PID" \
            "$PYTHON" "$HERE/idleconns.py" --host "$HOST" --port "$PROXY_PORT" --pid "$SERVER_PID" -n "$IDLE_CONNS"
        stop_server "$name" "$mode" "$round"
    fi
    local need=0 s
    for s in ka h2 hs; do has $s "$SCENARIOS" && need=1; done
    [[ $extras == 1 ]] && has jwt "$SCENARIOS" && need=1
    [[ $extras == 1 ]] && has checks "$SCENARIOS" && need=1
    [[ $extras == 1 ]] && has limits "$SCENARIOS" && need=1
    [[ $multi == 1 || $extras == 1 ]] && need=1
    [[ $need == 1 ]] || return 0
    start_server "$name" "$mode"
    [[ "$round" == 1 ]] && smoke_check "$name" "$row"
    if has ka "$SCENARIOS"; then
        measure "$round" "$row" ka wrk "$SERVER_PID" \
            wrk -t"$WRK_THREADS" -c"$WRK_CONNECTIONS" -d"$DURATION" --latency -s "$HERE/wrk_report.lua" "$url/"
    fi
    if has h2 "$SCENARIOS"; then
        measure "$round" "$row" h2 h2load "$SERVER_PID" \
            h2load -c"$H2_CLIENTS" -m"$H2_STREAMS" -t"$H2_THREADS" -D "$DURATION" "$url/"
    fi
    if has hs "$SCENARIOS"; then
        measure "$round" "$row" hs handshake "$SERVER_PID" \
            "$PYTHON" "$HERE/handshake.py" --host "$HOST" --port "$PROXY_PORT" -n "$HANDSHAKES" \
            -c "$HS_CONCURRENCY" --tls "$HS_TLS"
    fi
    if [[ $extras == 1 ]] && has jwt "$SCENARIOS"; then
        # the same Authorization header on both routes; the order alternates by round
        local order=(jwt_plain jwt_auth) sc path
        ((round % 2 == 0)) && order=(jwt_auth jwt_plain)
        for sc in "${order[@]}"; do
            path=/plain
            [[ "$sc" == jwt_auth ]] && path=/jwt
            measure "$round" portcullis "$sc" wrk "$SERVER_PID" \
                wrk -t"$WRK_THREADS" -c"$WRK_CONNECTIONS" -d"$DURATION" --latency -s "$HERE/wrk_report.lua" \
                -H "Authorization: Bearer $TOKEN" "$url$path"
        done
    fi
    if [[ $extras == 1 ]] && has checks "$SCENARIOS"; then
        # each check route right beside its plain baseline, the same request
        # to both; the whole order reverses every other round
        local runs=(plain_post_small csrf plain_post_1k schema_1k plain_post_64k schema_64k) i body ctype hdrs sc path
        if ((round % 2 == 0)); then
            local rev=()
            for ((i = ${#runs[@]} - 1; i >= 0; i--)); do rev+=("${runs[i]}"); done
            runs=("${rev[@]}")
        fi
        for sc in "${runs[@]}"; do
            hdrs=()
            case "$sc" in
                plain_post_small | csrf)
                    body="$CHECKS_DIR/body-small.txt"
                    ctype="$FORM"
                    hdrs=("${SAME_ORIGIN[@]}")
                    ;;
                plain_post_1k | schema_1k) body="$CHECKS_DIR/body-1k.json" ctype=application/json ;;
                plain_post_64k | schema_64k) body="$CHECKS_DIR/body-64k.json" ctype=application/json ;;
            esac
            case "$sc" in
                csrf) path=/csrf ;;
                schema_*) path=/schema ;;
                *) path=/plain ;;
            esac
            measure "$round" portcullis "$sc" wrk "$SERVER_PID" \
                env BENCH_BODY_FILE="$body" BENCH_CONTENT_TYPE="$ctype" \
                wrk -t"$WRK_THREADS" -c"$WRK_CONNECTIONS" -d"$DURATION" --latency -s "$HERE/wrk_post.lua" \
                ${hdrs[@]+"${hdrs[@]}"} "$url$path"
        done
    fi
    if [[ $extras == 1 ]] && has limits "$SCENARIOS"; then
        local order=(limits_plain limits_local) sc path
        ((round % 2 == 0)) && order=(limits_local limits_plain)
        for sc in "${order[@]}"; do
            path=/plain
            [[ "$sc" == limits_local ]] && path=/limited
            measure "$round" portcullis "$sc" wrk "$SERVER_PID" \
                wrk -t"$WRK_THREADS" -c"$WRK_CONNECTIONS" -d"$DURATION" --latency -s "$HERE/wrk_report.lua" "$url$path"
        done
        # the same route, counted on Redis; then with Redis frozen (accepting,
        # never answering): 3 requests wait out the timeout, then the circuit
        # opens and the in-process limiter decides
        stop_server "$name" "$mode" "$round"
        start_server "$name" "$mode" redis
        measure "$round" portcullis limits_redis wrk "$SERVER_PID" \
            wrk -t"$WRK_THREADS" -c"$WRK_CONNECTIONS" -d"$DURATION" --latency -s "$HERE/wrk_report.lua" "$url/limited"
        kill -STOP "$REDIS_PID"
        measure "$round" portcullis limits_frozen wrk "$SERVER_PID" \
            wrk -t"$WRK_THREADS" -c"$WRK_CONNECTIONS" -d"$DURATION" --latency -s "$HERE/wrk_report.lua" "$url/limited"
        kill -CONT "$REDIS_PID"
        # diagnostics go to standard error (stdout carries access and security records only)
        grep -q 'redis is failing' "$T/portcullis/run.stderr" ||
            echo "limits_frozen round $round: portcullis never logged 'redis is failing'" >>"$T/notes.txt"
    fi
    if [[ $extras == 1 ]] && has unix "$SCENARIOS"; then
        # the same requests as ka, to the same upstream over its Unix socket
        stop_server "$name" "$mode" "$round"
        start_server "$name" "$mode" unix
        measure "$round" "$row" unix_ka wrk "$SERVER_PID" \
            wrk -t"$WRK_THREADS" -c"$WRK_CONNECTIONS" -d"$DURATION" --latency -s "$HERE/wrk_report.lua" "$url/"
    fi
    if [[ $multi == 1 ]]; then
        stop_server "$name" "$mode" "$round"
        start_server "$name" "$mode" multi
        measure "$round" "$row" multi_ka wrk "$SERVER_PID" \
            wrk -t"$WRK_THREADS" -c"$WRK_CONNECTIONS" -d"$DURATION" --latency -s "$HERE/wrk_report.lua" "$url/"
        measure "$round" "$row" multi_h2 h2load "$SERVER_PID" \
            h2load -c"$H2_CLIENTS" -m"$H2_STREAMS" -t"$H2_THREADS" -D "$DURATION" "$url/"
    fi
    stop_server "$name" "$mode" "$round"
}

REDIS_PID=""
if has portcullis "$SERVERS" && has limits "$SCENARIOS"; then
    port_open "$REDIS_PORT" && die "port $REDIS_PORT (REDIS_PORT) already in use"
    mkdir -p "$T/redis"
    start_bg redis "$T/redis/run" redis-server --bind "$HOST" --port "$REDIS_PORT" --save "" --appendonly no \
        --dir "$T/redis"
    REDIS_PID=$STARTED_PID
    wait_port "$REDIS_PORT" "$REDIS_PID" redis || die "redis-server did not start"
    log "redis-server pid $REDIS_PID on $HOST:$REDIS_PORT"
fi

start_upstream
log "upstream nginx pid $UPSTREAM_PID on $HOST:$UPSTREAM_PORT (stub_status on :$STATUS_PORT)"

read -r -a SERVER_LIST <<<"$SERVERS"
N=${#SERVER_LIST[@]}
for ((round = 1; round <= ROUNDS; round++)); do
    log "round $round / $ROUNDS"
    for ((i = 0; i < N; i++)); do
        # rotate the order every round so no server always goes first or last
        name="${SERVER_LIST[$(((i + round - 1) % N))]}"
        if [[ "$name" == direct ]]; then
            run_server_round "$round" direct on
            continue
        fi
        # both modes of one server back to back, their order alternating by
        # round, so the logging cost is a difference measured minutes apart at most
        modes=("${LOG_MODES[@]}")
        if ((round % 2 == 0)) && ((${#modes[@]} == 2)); then modes=("${modes[1]}" "${modes[0]}"); fi
        for mode in "${modes[@]}"; do
            run_server_round "$round" "$name" "$mode"
        done
    done
done

# ---------------------------------------------------------------------------
# 8. report

ver() { "$@" 2>&1 | head -n 1 | tr -d '\n' | sed 's/"/\\"/g'; }
GIT_REV="$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown)"
GIT_DIRTY="$(cd "$ROOT" && git status --porcelain --untracked-files=no 2>/dev/null | grep -q . && echo "+dirty" || true)"
export BENCH_META_DATE="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
export BENCH_META_CPU="$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
export BENCH_META_CORES="$(nproc)"
export BENCH_META_KERNEL="$(uname -sr)"
export BENCH_META_NGINX="$(ver nginx -v)"
export BENCH_META_HAPROXY="$(ver haproxy -v)"
export BENCH_META_H2O="$(ver h2o -v)"
export BENCH_META_WRK="$(wrk -v 2>&1 | head -n1 | cut -c1-60)"
export BENCH_META_H2LOAD="$(ver h2load --version)"
export BENCH_META_OPENSSL="$(ver openssl version)"
export BENCH_META_PORTCULLIS="${PORTCULLIS:+$GIT_REV$GIT_DIRTY ($PORTCULLIS)}"
export BENCH_META_COMMAND="DURATION=$DURATION ROUNDS=$ROUNDS SERVERS=\"$SERVERS\" SCENARIOS=\"$SCENARIOS\" LOGS=\"$LOGS\" PEER_HEADERS=$PEER_HEADERS bench/run.sh"
export BENCH_META_NOFILE="$NOFILE"
# access-log lines each server wrote per run, as the fairness proof that
# every server logged with LOGS=on (and none with LOGS=off)
if [[ -s "$T/access-lines.tsv" ]]; then
    awk -F'\t' '{ k = $1 " (logs " $2 ")"; n[k]++; sum[k] += $3; if (!(k in lo) || $3 < lo[k]) lo[k] = $3; if ($3 > hi[k]) hi[k] = $3 }
        END { for (k in n) printf "access-log lines written per server run: %s: %d runs, %d to %d lines\n", k, n[k], lo[k], hi[k] }' \
        "$T/access-lines.tsv" | sort >>"$T/notes.txt"
fi
export DURATION ROUNDS SERVERS SCENARIOS HANDSHAKES HS_TLS IDLE_CONNS WORKERS UPSTREAM_WORKERS
"$PYTHON" - "$T/checks.tsv" "$T/notes.txt" "$T/meta.json" <<'EOF'
import json, os, sys
checks = {}
for line in open(sys.argv[1]):
    if "\t" in line:
        s, t = line.rstrip("\n").split("\t", 1)
        checks.setdefault(s, []).append(t)
notes = [l.strip() for l in open(sys.argv[2]) if l.strip()]
e = os.environ
meta = {
    "date": e["BENCH_META_DATE"], "cpu": e["BENCH_META_CPU"], "cores": e["BENCH_META_CORES"],
    "kernel": e["BENCH_META_KERNEL"], "duration": e["DURATION"], "rounds": int(e["ROUNDS"]),
    "servers": e["SERVERS"], "scenarios": e["SCENARIOS"], "handshakes": int(e["HANDSHAKES"]),
    "handshake_tls": e["HS_TLS"], "idle_connections": int(e["IDLE_CONNS"]), "workers": int(e["WORKERS"]),
    "upstream_workers": int(e["UPSTREAM_WORKERS"]), "open_file_limit": e["BENCH_META_NOFILE"],
    "versions": {k: e["BENCH_META_" + k.upper()] for k in
                 ["nginx", "haproxy", "h2o", "portcullis", "wrk", "h2load", "openssl"] if e.get("BENCH_META_" + k.upper())},
    "checks": {s: "; ".join(v) for s, v in checks.items()},
    "notes": notes,
    "command": e["BENCH_META_COMMAND"],
}
json.dump(meta, open(sys.argv[3], "w"), indent=2)
EOF
# what portcullis said on stderr / stdout under load, counted by message
if [[ -s "$T/logs/portcullis-stderr-all.txt" || -s "$T/logs/portcullis-stdout-all.txt" ]]; then
    "$PYTHON" "$HERE/benchlib.py" summarize-log "$T/logs/portcullis-stderr-all.txt" "$T/logs/portcullis-stdout-all.txt" \
        --meta "$T/meta.json" || true
    head -n 200 "$T/logs/portcullis-stderr-all.txt" >"$RESULTS_DIR/latest.portcullis-stderr.txt" 2>/dev/null || true
fi
cp "$RAW" "$RESULTS_DIR/latest.raw.jsonl"
REPORT_ROWS=""
for s in $SERVERS; do
    if [[ "$s" == direct ]]; then continue; fi
    for mode in "${LOG_MODES[@]}"; do REPORT_ROWS+=" $(label "$s" "$mode")"; done
done
has direct "$SERVERS" && REPORT_ROWS+=" direct"
"$PYTHON" "$HERE/benchlib.py" report --raw "$RAW" --meta "$T/meta.json" --servers "$REPORT_ROWS" \
    --json "$RESULTS_DIR/latest.json" --md "$RESULTS_DIR/latest.md" >/dev/null
# adds the checks scenario's table (if it ran) to both files, then prints the Markdown
"$PYTHON" "$HERE/checks.py" report --raw "$RAW" --bodies "$CHECKS_DIR/bodies.json" \
    --json "$RESULTS_DIR/latest.json" --md "$RESULTS_DIR/latest.md" >/dev/null
# adds the limits scenario's table (if it ran), then prints the Markdown
"$PYTHON" "$HERE/limits.py" report --raw "$RAW" --json "$RESULTS_DIR/latest.json" --md "$RESULTS_DIR/latest.md"
log "wrote $RESULTS_DIR/latest.md and $RESULTS_DIR/latest.json"
