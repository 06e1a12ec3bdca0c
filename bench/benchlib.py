#!/usr/bin/env python3
"""Helpers for bench/run.sh.

    benchlib.py cpu PID              server CPU seconds (schedstat, whole process tree)
    benchlib.py rss PID              server resident memory in KiB (VmRSS, whole process tree)
    benchlib.py upstream URL         the upstream nginx's stub_status counters as JSON
    benchlib.py measure ... -- CMD   run one load command and append one record to a JSONL file
    benchlib.py report ...           medians, ratios to nginx, Markdown table and JSON

Everything is read from /proc and from the tools' own output; nothing here
sends load itself (the clients are handshake.py and idleconns.py).
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
import urllib.request

CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------
# /proc


def _stat_fields(pid):
    with open(f"/proc/{pid}/stat") as f:
        s = f.read()
    # the command name may contain spaces and parentheses: split after the last ')'
    return s[s.rfind(")") + 2 :].split()


def process_tree(root):
    """root and all its descendants that are alive now."""
    children = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            ppid = int(_stat_fields(name)[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(name))
    out, stack, seen = [], [int(root)], set()
    while stack:
        p = stack.pop()
        if p in seen:
            continue
        seen.add(p)
        if os.path.exists(f"/proc/{p}"):
            out.append(p)
        stack.extend(children.get(p, []))
    return out


def cpu_tick_seconds(root):
    """utime+stime (all threads, exited ones too) summed over the process
    tree, in seconds: read in clock ticks (10 ms)."""
    ticks = 0
    for p in process_tree(root):
        try:
            f = _stat_fields(p)
        except OSError:
            continue
        # fields after the name: [0]=state [1]=ppid ... [11]=utime [12]=stime
        ticks += int(f[11]) + int(f[12])
    return ticks / CLK_TCK


SCHEDSTAT = os.path.exists("/proc/self/schedstat")


def cpu_seconds(root):
    """CPU time of the process tree's threads, in seconds: nanoseconds on a
    CPU from /proc/PID/task/*/schedstat, where 10 ms ticks would read a
    run of 2,000 handshakes (about 0.6 s) to within 2%; utime+stime where
    the kernel keeps no schedstat. A thread that exits between two readings
    takes its time with it; every server here keeps its threads and worker
    processes through a run, and cmd_measure checks against the ticks."""
    if not SCHEDSTAT:
        return cpu_tick_seconds(root)
    ns = 0
    for p in process_tree(root):
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{p}/task/{tid}/schedstat") as f:
                    ns += int(f.read().split()[0])
            except (OSError, IndexError, ValueError):
                continue  # exited since the listing
    return ns / 1e9


def rss_kib(root):
    """VmRSS summed over the process tree, in KiB."""
    total = 0
    for p in process_tree(root):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            continue
    return total


def upstream_counters(url):
    """nginx stub_status: accepted connections and requests so far."""
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    m = re.search(r"server accepts handled requests\s+(\d+)\s+(\d+)\s+(\d+)", text)
    if not m:
        raise RuntimeError(f"unexpected stub_status output: {text!r}")
    active = int(re.search(r"Active connections:\s*(\d+)", text).group(1))
    return {"accepts": int(m.group(1)), "requests": int(m.group(3)), "active": active}


# --------------------------------------------------------------------------
# parsing the load generators' output


def _result_line(text):
    for line in text.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    return None


def parse_wrk(text):
    """wrk run with bench/wrk_report.lua, which prints a RESULT line (µs)."""
    r = _result_line(text)
    if r is None:
        raise RuntimeError("wrk printed no RESULT line (wrk_report.lua not loaded?)")
    secs = r["duration_us"] / 1e6
    errors = dict(r["errors"])
    return {
        "requests": r["requests"],
        "rps": r["requests"] / secs if secs > 0 else 0.0,
        "p50_us": r["p50_us"],
        "p90_us": r["p90_us"],
        "p99_us": r["p99_us"],
        "max_us": r["max_us"],
        "errors": errors,
        "error_total": sum(errors.values()),
    }


def parse_h2load(text):
    m = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", text)
    req = re.search(
        r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
        r"(\d+) failed, (\d+) errored, (\d+) timeout",
        text,
    )
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text)
    proto = re.search(r"Application protocol: (\S+)", text)
    if not (m and req and codes):
        raise RuntimeError("could not parse h2load output")
    total, started, done, ok, failed, errored, timeout = map(int, req.groups())
    c2, c3, c4, c5 = map(int, codes.groups())
    errors = {"failed": failed, "errored": errored, "timeout": timeout, "non_2xx": c3 + c4 + c5}
    tls = re.search(r"TLS Protocol: (\S+)", text)
    cipher = re.search(r"Cipher: (\S+)", text)
    return {
        "tls": f"{tls.group(1)} {cipher.group(1)}" if tls and cipher else None,
        "requests": ok,
        "rps": float(m.group(1)),
        "protocol": proto.group(1) if proto else None,
        "errors": errors,
        "error_total": failed + errored + timeout + c3 + c4 + c5,
    }


def parse_client(text):
    r = _result_line(text)
    if r is None:
        raise RuntimeError("client printed no RESULT line")
    return r


# --------------------------------------------------------------------------
# one measurement


def cmd_measure(a):
    env_meta = dict(kv.split("=", 1) for kv in a.meta)
    u0 = upstream_counters(a.status_url) if a.status_url else None
    c0, ticks0 = cpu_seconds(a.pid), cpu_tick_seconds(a.pid)
    t0 = time.monotonic()
    timed_out = False
    with open(a.log, "w") as log:
        log.write("$ " + " ".join(a.command) + "\n")
        log.flush()
        try:
            proc = subprocess.run(a.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  timeout=a.timeout, text=True)
            out, rc = proc.stdout, proc.returncode
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            rc, timed_out = -1, True
        log.write(out)
    wall = time.monotonic() - t0
    c1, ticks1 = cpu_seconds(a.pid), cpu_tick_seconds(a.pid)
    u1 = upstream_counters(a.status_url) if a.status_url else None
    # A thread or worker process that exited mid-run is missing from the
    # schedstat sum but not from the ticks.
    if (ticks1 - ticks0) - (c1 - c0) > 0.03 + 0.05 * (ticks1 - ticks0):
        print(f"benchlib: {a.server} {a.scenario}: {c1 - c0:.3f} s of CPU by schedstat but "
              f"{ticks1 - ticks0:.2f} s by ticks: did a thread exit during the run?", file=sys.stderr)

    rec = {
        "round": a.round,
        "server": a.server,
        "scenario": a.scenario,
        "rc": rc,
        "wall_s": round(wall, 3),
        "cpu_s": round(c1 - c0, 4),
        "cpu_s_ticks": round(ticks1 - ticks0, 2),
        **env_meta,
    }
    if u0 and u1:
        # the "after" query is itself one accepted connection and one request
        rec["upstream_new_conns"] = u1["accepts"] - u0["accepts"] - 1
        rec["upstream_requests"] = u1["requests"] - u0["requests"] - 1
    try:
        if a.kind == "wrk":
            rec.update(parse_wrk(out))
        elif a.kind == "h2load":
            rec.update(parse_h2load(out))
        else:
            rec.update(parse_client(out))
        rec["ok"] = rc == 0 and not timed_out
    except Exception as e:  # recorded, reported, never silently dropped
        rec["ok"] = False
        rec["parse_error"] = str(e)
    if timed_out:
        rec["parse_error"] = f"timed out after {a.timeout}s"

    n = rec.get("requests")
    if a.kind in ("wrk", "h2load") and n:
        rec["cpu_us_per_req"] = round(rec["cpu_s"] * 1e6 / n, 2)
    if a.kind == "handshake" and rec.get("connections"):
        rec["cpu_us_per_conn"] = round(rec["cpu_s"] * 1e6 / rec["connections"], 2)
        rec["tls"] = ", ".join(f"{v} {c}" for v in rec.get("tls_versions", {}) for c in rec.get("ciphers", {}))

    with open(a.raw, "a") as f:
        f.write(json.dumps(rec) + "\n")

    # one line for the console
    bits = [f"round {a.round}", f"{a.server:<10}", f"{a.scenario:<10}"]
    if "rps" in rec:
        bits.append(f"{rec['rps']:>10.0f} req/s")
    if "p99_us" in rec:
        bits.append(f"p50 {rec['p50_us']/1000:.2f} ms p99 {rec['p99_us']/1000:.2f} ms")
    if "cpu_us_per_req" in rec:
        bits.append(f"{rec['cpu_us_per_req']:.1f} µs CPU/req")
    if "cpu_us_per_conn" in rec:
        bits.append(f"{rec['cpu_us_per_conn']:.0f} µs CPU/conn ({rec['connections']} conns)")
    if "kib_per_conn" in rec:
        bits.append(f"{rec['kib_per_conn']:.1f} KiB/conn ({rec.get('alive')} alive)")
    if "upstream_new_conns" in rec:
        bits.append(f"upstream: {rec['upstream_new_conns']} new conns / {rec['upstream_requests']} reqs")
    if rec.get("error_total"):
        bits.append(f"ERRORS {rec['errors']}")
    if not rec["ok"]:
        bits.append(f"FAILED rc={rc} {rec.get('parse_error', '')} (log: {a.log})")
    print("  " + " | ".join(bits), file=sys.stderr)
    return 0


# --------------------------------------------------------------------------
# report

# metric key, scenario, label, unit, higher_is_better
METRICS = [
    ("rps", "ka", "HTTPS/1.1 keep-alive req/s", "req/s", True),
    ("p50_us", "ka", "keep-alive p50", "ms", False),
    ("p99_us", "ka", "keep-alive p99", "ms", False),
    ("cpu_us_per_req", "ka", "keep-alive CPU/req", "µs", False),
    ("rps", "h2", "HTTP/2 req/s", "req/s", True),
    ("cpu_us_per_req", "h2", "HTTP/2 CPU/req", "µs", False),
    ("cpu_us_per_conn", "hs", "CPU per full TLS handshake", "µs", False),
    ("kib_per_conn", "mem", "KiB per idle TLS connection", "KiB", False),
]


NOLOG = "-nolog"

# what logging costs one server: (metric key, scenario, label, unit)
LOG_COST = [
    ("cpu_us_per_req", "ka", "keep-alive CPU/req", "µs"),
    ("cpu_us_per_req", "h2", "HTTP/2 CPU/req", "µs"),
    ("cpu_us_per_conn", "hs", "CPU per full TLS handshake", "µs"),
]


def _fmt(v, unit):
    if v is None:
        return "—"
    if unit == "req/s":
        return f"{v:,.0f}"
    if unit == "ms":
        return f"{v/1000:.2f} ms"
    if unit == "µs":
        return f"{v:.1f} µs" if v < 100 else f"{v:.0f} µs"
    if unit == "KiB":
        return f"{v:.1f} KiB"
    return str(v)


def _median(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def cmd_report(a):
    recs = []
    with open(a.raw) as f:
        for line in f:
            if line.strip():
                recs.append(json.loads(line))
    meta = {}
    if a.meta and os.path.exists(a.meta):
        with open(a.meta) as f:
            meta = json.load(f)
    order = [s for s in a.servers.split() if any(r["server"] == s for r in recs)]
    by = {}
    for r in recs:
        by.setdefault((r["server"], r["scenario"]), []).append(r)

    def values(server, scenario, key):
        return [r.get(key) for r in by.get((server, scenario), []) if r.get("ok") and r.get(key) is not None]

    summary = {}
    for s in order:
        summary[s] = {}
        for key, scen, label, unit, hib in METRICS:
            vals = values(s, scen, key)
            if not vals:
                continue
            summary[s][f"{scen}.{key}"] = {
                "label": label, "unit": unit, "median": _median(vals), "values": vals,
                "spread": (max(vals) - min(vals)) / _median(vals) if _median(vals) else None,
            }
    # ratio to nginx: per round (the servers of one round ran minutes apart,
    # so a change in the machine's load between rounds cancels out), then
    # the median of those; also the plain ratio of the medians
    def per_round(server, scenario, key):
        return {r["round"]: r[key] for r in by.get((server, scenario), [])
                if r.get("ok") and r.get(key) is not None}

    # rows NAME-nolog ran with every server's logging off (bench/run.sh LOGS):
    # they are compared with nginx-nolog, the others with nginx logging
    def baseline(server):
        return "nginx-nolog" if server.endswith(NOLOG) else "nginx"

    for s in order:
        for key, scen, *_ in METRICS:
            m = summary[s].get(f"{scen}.{key}")
            if not m:
                continue
            base = baseline(s)
            b = summary.get(base, {}).get(f"{scen}.{key}", {}).get("median")
            m["ratio_of_medians"] = round(m["median"] / b, 3) if b else None
            mine, theirs = per_round(s, scen, key), per_round(base, scen, key)
            ratios = [mine[r] / theirs[r] for r in mine if theirs.get(r)]
            m["ratio_to_nginx_per_round"] = [round(x, 3) for x in ratios]
            m["ratio_to_nginx"] = round(statistics.median(ratios), 3) if ratios else m["ratio_of_medians"]

    # fairness: upstream connection reuse, errors, per server and scenario
    fairness = {}
    scen_order = {k: i for i, k in enumerate(["mem", "ka", "h2", "hs", "jwt_plain", "jwt_auth"])}
    for (s, scen), rs in sorted(by.items(), key=lambda kv: (kv[0][0], scen_order.get(kv[0][1], 99))):
        new = [r.get("upstream_new_conns") for r in rs]
        reqs = [r.get("upstream_requests") for r in rs]
        # a proxy that does not pool opens about one upstream connection per
        # request; a pooling one opens at most about its concurrency
        churn = any(n is not None and q and n > 50 and n * 10 > q for n, q in zip(new, reqs))
        fairness.setdefault(s, {})[scen] = {
            "upstream_new_conns": new,
            "upstream_requests": reqs,
            "client_requests": [r.get("requests", r.get("connections", r.get("opened"))) for r in rs],
            "upstream_reuse": "NOT REUSED" if churn else "reused",
            "tls": sorted({r["tls"] for r in rs if r.get("tls")}),
            "errors": [r.get("errors") for r in rs],
            "failed_runs": sum(1 for r in rs if not r.get("ok")),
        }

    # portcullis jwt + rate_limit route vs plain route
    jwt = None
    if by.get(("portcullis", "jwt_plain")) and by.get(("portcullis", "jwt_auth")):
        p = _median(values("portcullis", "jwt_plain", "rps"))
        j = _median(values("portcullis", "jwt_auth", "rps"))
        pr, jr = per_round("portcullis", "jwt_plain", "rps"), per_round("portcullis", "jwt_auth", "rps")
        paired = [round(jr[r] / pr[r], 3) for r in jr if pr.get(r)]
        jwt = {
            "plain_rps": p, "jwt_rps": j,
            "ratio": statistics.median(paired) if paired else (round(j / p, 3) if p and j else None),
            "ratio_per_round": paired,
            "plain_cpu_us_per_req": _median(values("portcullis", "jwt_plain", "cpu_us_per_req")),
            "jwt_cpu_us_per_req": _median(values("portcullis", "jwt_auth", "cpu_us_per_req")),
            "plain_p99_us": _median(values("portcullis", "jwt_plain", "p99_us")),
            "jwt_p99_us": _median(values("portcullis", "jwt_auth", "p99_us")),
        }

    # ---- Markdown
    L = []
    L.append(f"# portcullis side-by-side benchmark — {meta.get('date', '')}")
    L.append("")
    L.append(
        f"Machine: {meta.get('cpu', '?')}, {meta.get('cores', '?')} cores; {meta.get('kernel', '')}. "
        f"Rounds: {meta.get('rounds', '?')}, duration {meta.get('duration', '?')} per load run. "
        f"Values are medians over rounds; (×) is the ratio to nginx measured in the same round, "
        f"median over rounds (below 1 is better for latency, CPU and memory)."
    )
    if meta.get("versions"):
        L.append("")
        L.append("Versions: " + "; ".join(f"{k} {v}" for k, v in meta["versions"].items()))
    L.append("")
    cols = [(f"{scen}.{key}", label, unit) for key, scen, label, unit, _ in METRICS]
    cols = [c for c in cols if any(c[0] in summary[s] for s in order)]
    logged = [x for x in order if not x.endswith(NOLOG)]
    silent = [x for x in order if x.endswith(NOLOG)]

    def table(rows):
        L.append("| server | " + " | ".join(c[1] for c in cols) + " |")
        L.append("|---|" + "---:|" * len(cols))
        for s in rows:
            cells = []
            for k, _, unit in cols:
                m = summary[s].get(k)
                if not m:
                    cells.append("—")
                    continue
                r = m.get("ratio_to_nginx")
                cells.append(_fmt(m["median"], unit) + (f" ({r:.2f}×)" if r is not None and s != baseline(s) else ""))
            L.append(f"| {s} | " + " | ".join(cells) + " |")
        L.append("")

    if silent:
        L.append("### Every server logging (what users run)")
        L.append("")
        L.append("portcullis at its defaults (one JSON access line per request on standard output, to a file); "
                 "nginx `access_log` to a file, JSON `log_format`, `buffer=64k flush=1s`; HAProxy `option httplog` "
                 "to standard output, a file; h2o `access-log` to a file, JSON. Ratios to nginx logging.")
        L.append("")
    if logged:
        table(logged)
    if silent:
        L.append("### No server logging (`-nolog`: portcullis `level = \"warn\"`, the peers' logs off)")
        L.append("")
        L.append("Ratios to nginx-nolog.")
        L.append("")
        table(silent)
    L.append("`direct` is wrk over plain HTTP straight to the upstream (the ceiling); its CPU is the upstream's own.")
    L.append("")
    # the logging cost: logs on minus logs off, paired by round (both modes
    # of a server run back to back), median over rounds
    costs = {}
    for s in logged:
        off = s + NOLOG
        if off not in summary:
            continue
        for key, scen, label, unit in LOG_COST:
            on_r, off_r = per_round(s, scen, key), per_round(off, scen, key)
            diffs = [on_r[r] - off_r[r] for r in on_r if r in off_r]
            if diffs:
                costs.setdefault(s, {})[f"{scen}.{key}"] = {
                    "label": label, "unit": unit, "median": statistics.median(diffs),
                    "per_round": [round(d, 2) for d in diffs],
                }
    if costs:
        L.append("### What logging costs each server (logs on − logs off, paired by round)")
        L.append("")
        L.append("| server | " + " | ".join(c[2] for c in LOG_COST) + " |")
        L.append("|---|" + "---:|" * len(LOG_COST))
        for s, c in costs.items():
            cells = []
            for key, scen, _, unit in LOG_COST:
                m = c.get(f"{scen}.{key}")
                cells.append("—" if not m else f"{m['median']:+.1f} µs (rounds: {', '.join(f'{d:+.1f}' for d in m['per_round'])})")
            L.append(f"| {s} | " + " | ".join(cells) + " |")
        L.append("")
    if jwt:
        L.append("### portcullis: `jwt = true` + `rate_limit` route vs a plain route (keep-alive HTTPS/1.1, same token sent to both)")
        L.append("")
        L.append("| route | req/s | CPU/req | p99 |")
        L.append("|---|---:|---:|---:|")
        L.append(f"| plain | {_fmt(jwt['plain_rps'], 'req/s')} | {_fmt(jwt['plain_cpu_us_per_req'], 'µs')} | {_fmt(jwt['plain_p99_us'], 'ms')} |")
        L.append(f"| jwt + rate_limit | {_fmt(jwt['jwt_rps'], 'req/s')} ({jwt['ratio']:.2f}×; per round {', '.join(f'{x:.2f}' for x in jwt['ratio_per_round'])}) | {_fmt(jwt['jwt_cpu_us_per_req'], 'µs')} | {_fmt(jwt['jwt_p99_us'], 'ms')} |")
        L.append("")
    # three upstream servers (bench/run.sh SCENARIOS=multi)
    multi = {}
    for s in order:
        row = {}
        for scen in ("multi_ka", "multi_h2"):
            for key in ("rps", "cpu_us_per_req", "p99_us"):
                vals = values(s, scen, key)
                if vals:
                    row[f"{scen}.{key}"] = _median(vals)
            mine, theirs = per_round(s, scen, "rps"), per_round(baseline(s), scen, "rps")
            ratios = [mine[r] / theirs[r] for r in mine if theirs.get(r)]
            if ratios and s != baseline(s):
                row[f"{scen}.ratio_to_nginx"] = round(statistics.median(ratios), 3)
        if row:
            multi[s] = row
    if multi:
        L.append("### Three upstream servers (round robin over keep-alive pools; the upstream nginx on three ports)")
        L.append("")
        L.append("| server | keep-alive req/s | keep-alive CPU/req | keep-alive p99 | HTTP/2 req/s | HTTP/2 CPU/req |")
        L.append("|---|---:|---:|---:|---:|---:|")
        for s, row in multi.items():
            def cell(scen, key, unit):
                v = row.get(f"{scen}.{key}")
                r = row.get(f"{scen}.ratio_to_nginx") if key == "rps" else None
                return _fmt(v, unit) + (f" ({r:.2f}×)" if r is not None else "")
            L.append(f"| {s} | {cell('multi_ka', 'rps', 'req/s')} | {cell('multi_ka', 'cpu_us_per_req', 'µs')} | "
                     f"{cell('multi_ka', 'p99_us', 'ms')} | {cell('multi_h2', 'rps', 'req/s')} | {cell('multi_h2', 'cpu_us_per_req', 'µs')} |")
        L.append("")
    # the upstream over a Unix socket vs TCP (SCENARIOS=unix)
    unix = None
    unix_row = next((r for r in ("portcullis", "portcullis" + NOLOG) if by.get((r, "unix_ka"))), None)
    if unix_row:
        tcp_r, unix_r = per_round(unix_row, "ka", "rps"), per_round(unix_row, "unix_ka", "rps")
        tcp_c, unix_c = per_round(unix_row, "ka", "cpu_us_per_req"), per_round(unix_row, "unix_ka", "cpu_us_per_req")
        unix = {
            "row": unix_row,
            "tcp_rps": _median(list(tcp_r.values())), "unix_rps": _median(list(unix_r.values())),
            "tcp_cpu_us_per_req": _median(list(tcp_c.values())), "unix_cpu_us_per_req": _median(list(unix_c.values())),
            "rps_ratio_per_round": [round(unix_r[r] / tcp_r[r], 3) for r in unix_r if tcp_r.get(r)],
            "cpu_ratio_per_round": [round(unix_c[r] / tcp_c[r], 3) for r in unix_c if tcp_c.get(r)],
        }
        L.append(f"### {unix_row}: the upstream over a Unix socket vs loopback TCP (keep-alive HTTPS/1.1, the ka run)")
        L.append("")
        L.append("| upstream | req/s | CPU/req |")
        L.append("|---|---:|---:|")
        L.append(f"| TCP | {_fmt(unix['tcp_rps'], 'req/s')} | {_fmt(unix['tcp_cpu_us_per_req'], 'µs')} |")
        rr = unix["rps_ratio_per_round"]
        cr = unix["cpu_ratio_per_round"]
        L.append(f"| Unix socket | {_fmt(unix['unix_rps'], 'req/s')} ({statistics.median(rr):.2f}×; rounds {', '.join(f'{x:.2f}' for x in rr)}) | "
                 f"{_fmt(unix['unix_cpu_us_per_req'], 'µs')} ({statistics.median(cr):.2f}×) |" if rr and cr else
                 f"| Unix socket | {_fmt(unix['unix_rps'], 'req/s')} | {_fmt(unix['unix_cpu_us_per_req'], 'µs')} |")
        L.append("")
    L.append("### Noise: (max − min) / median over rounds")
    L.append("")
    L.append("| server | " + " | ".join(c[1] for c in cols) + " |")
    L.append("|---|" + "---:|" * len(cols))
    for s in order:
        cells = []
        for k, _, _ in cols:
            m = summary[s].get(k)
            cells.append("—" if not m or m["spread"] is None else f"{m['spread']*100:.0f}%")
        L.append(f"| {s} | " + " | ".join(cells) + " |")
    L.append("")
    L.append("### Fairness and errors")
    L.append("")
    L.append("Upstream connections opened / upstream requests (from the upstream nginx's `stub_status`), per round; "
             "errors are wrk socket errors + non-2xx, h2load failed/errored/non-2xx, handshake-client failures, idle connections the server closed.")
    L.append("")
    L.append("| server | scenario | upstream conns opened | upstream requests | client requests (conns for mem) | upstream pool | TLS negotiated | errors | failed runs |")
    L.append("|---|---|---|---|---|---|---|---|---:|")
    for s in order:
        for scen, f in fairness.get(s, {}).items():
            errs = []
            for e in f["errors"]:
                errs.append("0" if not e or not any(e.values()) else ",".join(f"{k}={v}" for k, v in e.items() if v))
            L.append(
                f"| {s} | {scen} | {' / '.join(map(str, f['upstream_new_conns']))} | "
                f"{' / '.join(map(str, f['upstream_requests']))} | {' / '.join(map(str, f['client_requests']))} | "
                f"{f['upstream_reuse']} | {'; '.join(f['tls']) or '—'} | {' / '.join(errs)} | {f['failed_runs']} |"
            )
    checks = meta.get("checks")
    if checks:
        L.append("")
        L.append("### Configuration checks (before the first round)")
        L.append("")
        for s, c in checks.items():
            L.append(f"- {s}: {c}")
    logsum = meta.get("portcullis_log_summary")
    if logsum:
        L.append("")
        L.append("### What portcullis logged during the run, by message (access lines left out)")
        L.append("")
        L.append("| stream | lines | message |")
        L.append("|---|---:|---|")
        for e in logsum:
            L.append(f"| {e['stream']} | {e['count']} | {e['message'][:160].replace('|', '/')} |")
    notes = meta.get("notes")
    if notes:
        L.append("")
        for n in notes:
            L.append(f"- {n}")
    L.append("")
    L.append(f"Reproduce: `{meta.get('command', 'bench/run.sh')}`")
    md = "\n".join(L) + "\n"

    out = {"meta": meta, "summary": summary, "logging_cost": costs, "multi": multi, "unix": unix, "jwt_route": jwt, "fairness": fairness, "raw": recs}
    with open(a.json, "w") as f:
        json.dump(out, f, indent=2)
    with open(a.md, "w") as f:
        f.write(md)
    print(md)
    return 0


def cmd_summarize_log(a):
    """Counts portcullis's stderr/stdout lines by message (JSON or text) into meta.json."""
    out = []
    for stream, path in (("stderr", a.stderr), ("stdout", a.stdout)):
        counts = {}
        if path and os.path.exists(path):
            with open(path, errors="replace") as f:
                for line in f:
                    line = line.strip()
                    if not line or line.startswith("portcullis: https listening"):
                        continue
                    try:
                        j = json.loads(line)
                        msg = f"{j.get('level', '')} {j.get('target', '')}: " + (
                            j.get("message") or j.get("reason") or json.dumps(j)[:120])
                    except ValueError:
                        msg = line[:160]
                    counts[msg] = counts.get(msg, 0) + 1
        for msg, n in sorted(counts.items(), key=lambda kv: -kv[1]):
            out.append({"stream": stream, "count": n, "message": msg})
    with open(a.meta) as f:
        meta = json.load(f)
    meta["portcullis_log_summary"] = out
    with open(a.meta, "w") as f:
        json.dump(meta, f, indent=2)
    for e in out:
        print(f"  portcullis {e['stream']}: {e['count']:>6} x {e['message'][:200]}", file=sys.stderr)
    return 0


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("cpu"); p.add_argument("pid", type=int)
    p = sub.add_parser("rss"); p.add_argument("pid", type=int)
    p = sub.add_parser("upstream"); p.add_argument("url")
    p = sub.add_parser("measure")
    p.add_argument("--raw", required=True)
    p.add_argument("--log", required=True)
    p.add_argument("--round", type=int, required=True)
    p.add_argument("--server", required=True)
    p.add_argument("--scenario", required=True)
    p.add_argument("--kind", choices=["wrk", "h2load", "handshake", "idle"], required=True)
    p.add_argument("--pid", type=int, required=True)
    p.add_argument("--status-url")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--meta", action="append", default=[])
    p.add_argument("command", nargs=argparse.REMAINDER)
    p = sub.add_parser("summarize-log")
    p.add_argument("stderr")
    p.add_argument("stdout")
    p.add_argument("--meta", required=True)
    p = sub.add_parser("report")
    p.add_argument("--raw", required=True)
    p.add_argument("--json", required=True)
    p.add_argument("--md", required=True)
    p.add_argument("--meta")
    p.add_argument("--servers", default="nginx haproxy h2o portcullis direct")
    a = ap.parse_args()
    if a.cmd == "cpu":
        print(f"{cpu_seconds(a.pid):.6f}")  # µs: schedstat counts nanoseconds
    elif a.cmd == "rss":
        print(rss_kib(a.pid))
    elif a.cmd == "upstream":
        print(json.dumps(upstream_counters(a.url)))
    elif a.cmd == "measure":
        if a.command and a.command[0] == "--":
            a.command = a.command[1:]
        return cmd_measure(a)
    elif a.cmd == "summarize-log":
        return cmd_summarize_log(a)
    elif a.cmd == "report":
        return cmd_report(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
