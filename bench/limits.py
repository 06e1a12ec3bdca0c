#!/usr/bin/env python3
"""The `limits` scenario of bench/run.sh (portcullis only): a rate-limited
route counted on Redis against the same route counted in-process and a
plain route, same run, Redis on loopback; then the Redis-limited route with
Redis frozen (SIGSTOP: it accepts and never answers).

    limits.py report --raw ... --md ... --json ...
                    adds "Rate limits: Redis vs in-process" to the report
                    that benchlib.py report wrote, then prints it

Targets (issue 20): Redis-limited req/s >= 0.7x the in-process limiter's,
p99 within +1 ms of it; frozen Redis, once the circuit is open, p99 no worse
than the in-process limiter's (+1 ms, the noise of a p99 on this machine).
"""

import argparse
import json
import statistics
import sys
import os

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import _fmt, _median  # noqa: E402  (same formatting as the main table)

SCENARIOS = ["limits_plain", "limits_local", "limits_redis", "limits_frozen"]
LABELS = {
    "limits_plain": "plain route (no `rate_limit`)",
    "limits_local": "`rate_limit`, in-process (no `[redis]`)",
    "limits_redis": "`rate_limit` on Redis (`[redis]`, loopback)",
    "limits_frozen": "`rate_limit` on Redis, Redis frozen (circuit open: in-process)",
}


def cmd_report(a):
    recs = []
    with open(a.raw) as f:
        for line in f:
            if line.strip():
                recs.append(json.loads(line))
    by = {}
    for r in recs:
        if r.get("server") == "portcullis" and r.get("scenario") in SCENARIOS:
            by.setdefault(r["scenario"], []).append(r)

    def values(scen, key):
        return [r[key] for r in by.get(scen, []) if r.get("ok") and r.get(key) is not None]

    def per_round(scen, key):
        return {r["round"]: r[key] for r in by.get(scen, []) if r.get("ok") and r.get(key) is not None}

    def paired_ratio(scen, base, key):
        s, b = per_round(scen, key), per_round(base, key)
        return [round(s[r] / b[r], 3) for r in sorted(s) if b.get(r)]

    def paired_diff_ms(scen, base, key):
        s, b = per_round(scen, key), per_round(base, key)
        return [round((s[r] - b[r]) / 1000, 2) for r in sorted(s) if r in b]

    def errors(scen):
        status = sock = failed = 0
        for r in by.get(scen, []):
            e = r.get("errors") or {}
            status += e.get("status", 0)
            sock += sum(v for k, v in e.items() if k != "status")
            failed += 0 if r.get("ok") else 1
        return {"non_2xx": status, "socket_errors": sock, "failed_runs": failed}

    limits = {}
    if by.get("limits_local") and by.get("limits_redis"):
        for scen in SCENARIOS:
            if not by.get(scen):
                continue
            rps_r = paired_ratio(scen, "limits_local", "rps")
            p99_d = paired_diff_ms(scen, "limits_local", "p99_us")
            limits[scen] = {
                "rps": _median(values(scen, "rps")),
                "p50_us": _median(values(scen, "p50_us")),
                "p99_us": _median(values(scen, "p99_us")),
                "max_us": max(values(scen, "max_us"), default=None),
                "cpu_us_per_req": _median(values(scen, "cpu_us_per_req")),
                "rps_ratio_to_local": round(statistics.median(rps_r), 3) if rps_r else None,
                "rps_ratio_to_local_per_round": rps_r,
                "p99_minus_local_ms": round(statistics.median(p99_d), 2) if p99_d else None,
                "p99_minus_local_ms_per_round": p99_d,
                "errors": errors(scen),
            }
        redis, frozen = limits.get("limits_redis", {}), limits.get("limits_frozen", {})
        targets = {
            "redis_rps_ratio>=0.7": (redis.get("rps_ratio_to_local") or 0) >= 0.7,
            "redis_p99<=local+1ms": (redis.get("p99_minus_local_ms") is not None
                                      and redis["p99_minus_local_ms"] <= 1.0),
        }
        if frozen:
            targets["frozen_p99<=local+1ms"] = (frozen.get("p99_minus_local_ms") is not None
                                                 and frozen["p99_minus_local_ms"] <= 1.0)
        limits["targets"] = targets

    with open(a.md) as f:
        md = f.read()
    if limits:
        L = ["### Rate limits: Redis vs in-process (portcullis)", ""]
        L.append(
            "Keep-alive HTTPS/1.1 GETs (wrk as in `ka`) on a route whose `rate_limit` never refuses "
            "(every request counted, then forwarded), key `ip`. Redis 1 process on loopback, "
            "`timeout = \"25ms\"`, `on_error = \"local\"`. Ratios and p99 differences are to the "
            "in-process limiter of the same round, median over rounds. \"max\" is the largest single "
            "latency over all rounds: with Redis frozen, the requests in flight when it froze wait out "
            "the timeout before the circuit opens."
        )
        L.append("")
        L.append("| route | req/s | req/s vs in-process (per round) | p50 | p99 | p99 − in-process (per round) | max | CPU/req | non-2xx / socket errors |")
        L.append("|---|---:|---|---:|---:|---|---:|---:|---|")
        for scen in SCENARIOS:
            c = limits.get(scen)
            if not c:
                continue
            ratio = "—" if c["rps_ratio_to_local"] is None else (
                f"{c['rps_ratio_to_local']:.3f}× ({', '.join(f'{v:.2f}' for v in c['rps_ratio_to_local_per_round'])})")
            diff = "—" if c["p99_minus_local_ms"] is None else (
                f"{c['p99_minus_local_ms']:+.2f} ms ({', '.join(f'{v:+.2f}' for v in c['p99_minus_local_ms_per_round'])})")
            e = c["errors"]
            err = f"{e['non_2xx']} / {e['socket_errors']}" + (f", {e['failed_runs']} failed runs" if e["failed_runs"] else "")
            L.append(
                f"| {LABELS[scen]} | {_fmt(c['rps'], 'req/s')} | {ratio} | {_fmt(c['p50_us'], 'ms')} | "
                f"{_fmt(c['p99_us'], 'ms')} | {diff} | {_fmt(c['max_us'], 'ms')} | {_fmt(c['cpu_us_per_req'], 'µs')} | {err} |"
            )
        L.append("")
        L.append("Targets: " + "; ".join(f"{k}: {'met' if v else '**NOT met**'}" for k, v in limits["targets"].items()))
        L.append("")
        section = "\n".join(L) + "\n"
        marker = "### Noise:"
        md = md.replace(marker, section + marker, 1) if marker in md else md + "\n" + section
        with open(a.md, "w") as f:
            f.write(md)
    with open(a.json) as f:
        out = json.load(f)
    out["rate_limits"] = limits or None
    with open(a.json, "w") as f:
        json.dump(out, f, indent=2)
    print(md)
    return 0


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("report")
    p.add_argument("--raw", required=True)
    p.add_argument("--md", required=True)
    p.add_argument("--json", required=True)
    a = ap.parse_args()
    return cmd_report(a)


if __name__ == "__main__":
    sys.exit(main())
