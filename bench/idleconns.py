#!/usr/bin/env python3
"""Resident memory per idle TLS keep-alive connection.

Against a freshly started server (process tree rooted at --pid):
  1. warm-up: a few connections, one request each, closed (so one-time
     initialisation — upstream pool, allocator arenas, first TLS state — is
     not charged to the idle connections);
  2. baseline: sum of VmRSS over the server's processes;
  3. opens --connections TLS connections (HTTP/1.1 ALPN), each sends one
     keep-alive request and reads the whole response, then stays open, idle;
  4. after --settle seconds: RSS again, and how many connections the server
     has not closed; (RSS - baseline) / alive connections = KiB per connection;
  5. closes everything.

Prints one line `RESULT {json}`.
"""

import argparse
import asyncio
import json
import os
import ssl
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import process_tree, rss_kib  # noqa: E402


def make_context():
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


async def one_request(reader, writer, request, timeout):
    writer.write(request)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length, chunked = None, False
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        k = k.strip().lower()
        if k == b"content-length":
            length = int(v.strip())
        elif k == b"transfer-encoding" and v.strip().lower() == b"chunked":
            chunked = True
    if length is not None:
        await asyncio.wait_for(reader.readexactly(length), timeout)
    elif chunked:
        while True:
            size = int((await asyncio.wait_for(reader.readuntil(b"\r\n"), timeout)).split(b";")[0], 16)
            await asyncio.wait_for(reader.readexactly(size + 2), timeout)
            if size == 0:
                break
    return status


async def main_async(a):
    ctx = make_context()
    request = (f"GET {a.path} HTTP/1.1\r\nHost: {a.sni}:{a.port}\r\n"
               "User-Agent: portcullis-bench-idle\r\nAccept: */*\r\n\r\n").encode()
    failures = {}
    statuses = {}

    def fail(e):
        failures[type(e).__name__] = failures.get(type(e).__name__, 0) + 1

    # 1. warm-up
    for _ in range(a.warmup):
        try:
            r, w = await asyncio.wait_for(
                asyncio.open_connection(a.host, a.port, ssl=ctx, server_hostname=a.sni), a.timeout)
            await one_request(r, w, request, a.timeout)
            w.transport.abort()
        except Exception as e:
            fail(e)
    await asyncio.sleep(1.0)

    # 2. baseline
    procs = len(process_tree(a.pid))
    baseline = rss_kib(a.pid)

    # 3. open and hold
    sem = asyncio.Semaphore(a.concurrency)
    conns = []

    async def open_one():
        async with sem:
            try:
                r, w = await asyncio.wait_for(
                    asyncio.open_connection(a.host, a.port, ssl=ctx, server_hostname=a.sni), a.timeout)
            except Exception as e:
                fail(e)
                return
            try:
                status = await one_request(r, w, request, a.timeout)
                statuses[status] = statuses.get(status, 0) + 1
                conns.append((r, w))
            except Exception as e:
                fail(e)
                w.transport.abort()

    t0 = time.monotonic()
    await asyncio.wait_for(asyncio.gather(*(open_one() for _ in range(a.connections))), a.max_seconds)
    open_s = time.monotonic() - t0

    # 4. settle, measure, check how many the server kept
    await asyncio.sleep(a.settle)
    after = rss_kib(a.pid)
    alive = sum(1 for r, w in conns if not r.at_eof() and not w.transport.is_closing())
    await asyncio.sleep(0.5)
    alive_after = sum(1 for r, w in conns if not r.at_eof() and not w.transport.is_closing())

    # 5. close
    for r, w in conns:
        w.transport.abort()
    await asyncio.sleep(0.2)

    opened = len(conns)
    closed_by_server = opened - alive_after
    non200 = sum(v for k, v in statuses.items() if k != 200)
    failed = sum(failures.values())
    return {
        "connections_requested": a.connections,
        "opened": opened,
        "alive": alive,
        "closed_by_server": closed_by_server,
        "server_processes": procs,
        "baseline_kib": baseline,
        "after_kib": after,
        "kib_per_conn": round((after - baseline) / alive, 2) if alive else None,
        "open_seconds": round(open_s, 2),
        "statuses": {str(k): v for k, v in statuses.items()},
        "errors": {"failed": failed, "non200": non200, "closed_by_server": closed_by_server,
                   **{f"exc_{k}": v for k, v in failures.items()}},
        "error_total": failed + non200 + closed_by_server,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--sni", default="localhost")
    ap.add_argument("--path", default="/")
    ap.add_argument("--pid", type=int, required=True, help="the server's (master) process")
    ap.add_argument("-n", "--connections", type=int, default=2000)
    ap.add_argument("-c", "--concurrency", type=int, default=64, help="handshakes in flight")
    ap.add_argument("--warmup", type=int, default=16)
    ap.add_argument("--settle", type=float, default=2.0)
    ap.add_argument("--timeout", type=float, default=15.0)
    ap.add_argument("--max-seconds", type=float, default=300.0)
    a = ap.parse_args()
    result = asyncio.run(main_async(a))
    print("RESULT " + json.dumps(result))
    return 0 if result["alive"] else 1


if __name__ == "__main__":
    sys.exit(main())
