#!/usr/bin/env python3
"""Full TLS handshakes without session resumption.

Makes N new TLS connections to HOST:PORT, each with a brand-new SSLContext
(so no client-side session cache can exist) and never passing a saved
session, sends one HTTP/1.1 request, reads the whole response and closes.
wrk and h2load resume sessions silently, which is why this client exists.
The server's CPU time is measured around this process by benchlib.py.

Prints one line `RESULT {json}`: connections completed, failures by kind,
non-200 answers, how many sessions were reused (must be 0), TLS versions.
"""

import argparse
import collections
import json
import socket
import ssl
import sys
import threading
import time


def read_response(s, deadline):
    """Reads one HTTP/1.1 response (Content-Length or chunked); returns the status."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        if time.monotonic() > deadline:
            raise TimeoutError("response head")
        chunk = s.recv(16384)
        if not chunk:
            raise ConnectionError("closed before the response head")
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        headers[k.strip().lower()] = v.strip()
    if b"content-length" in headers:
        need = int(headers[b"content-length"])
        while len(body) < need:
            chunk = s.recv(16384)
            if not chunk:
                raise ConnectionError("closed inside the body")
            body += chunk
    elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        while not body.endswith(b"0\r\n\r\n"):
            if time.monotonic() > deadline:
                raise TimeoutError("response body")
            chunk = s.recv(16384)
            if not chunk:
                raise ConnectionError("closed inside the body")
            body += chunk
    return status


def make_context(version):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if version == "1.2":
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    elif version == "1.3":
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    else:
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--sni", default="localhost")
    ap.add_argument("--path", default="/")
    ap.add_argument("-n", "--connections", type=int, default=2000)
    ap.add_argument("-c", "--concurrency", type=int, default=4)
    ap.add_argument("--tls", choices=["1.2", "1.3", "any"], default="1.3")
    ap.add_argument("--timeout", type=float, default=10.0, help="per connection, seconds")
    ap.add_argument("--max-seconds", type=float, default=600.0, help="the whole run")
    a = ap.parse_args()

    request = (f"GET {a.path} HTTP/1.1\r\nHost: {a.sni}:{a.port}\r\n"
               "User-Agent: portcullis-bench-handshake\r\nAccept: */*\r\n\r\n").encode()
    lock = threading.Lock()
    state = {"next": 0, "ok": 0, "non200": 0, "reused": 0}
    failures = collections.Counter()
    versions = collections.Counter()
    ciphers = collections.Counter()
    stop_at = time.monotonic() + a.max_seconds

    def worker():
        while True:
            with lock:
                if state["next"] >= a.connections or time.monotonic() > stop_at:
                    return
                state["next"] += 1
            try:
                ctx = make_context(a.tls)  # new context every time: nothing to resume from
                deadline = time.monotonic() + a.timeout
                with socket.create_connection((a.host, a.port), timeout=a.timeout) as raw:
                    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    with ctx.wrap_socket(raw, server_hostname=a.sni) as s:
                        s.sendall(request)
                        status = read_response(s, deadline)
                        with lock:
                            state["ok"] += 1
                            if status != 200:
                                state["non200"] += 1
                            if s.session_reused:
                                state["reused"] += 1
                            versions[s.version()] += 1
                            ciphers[s.cipher()[0]] += 1
            except Exception as e:  # counted and reported, never fatal
                with lock:
                    failures[type(e).__name__] += 1

    t0 = time.monotonic()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(a.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(a.max_seconds + 30)
    wall = time.monotonic() - t0
    failed = sum(failures.values())
    result = {
        "connections": state["ok"],
        "attempted": state["next"],
        "failed": failed,
        "non200": state["non200"],
        "reused": state["reused"],
        "tls_versions": dict(versions),
        "ciphers": dict(ciphers),
        "conn_per_s": round(state["ok"] / wall, 1) if wall > 0 else 0,
        "errors": {"failed": failed, "non200": state["non200"], "reused": state["reused"],
                   **{f"exc_{k}": v for k, v in failures.items()}},
        "error_total": failed + state["non200"] + state["reused"],
    }
    print("RESULT " + json.dumps(result))
    return 0 if state["ok"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
