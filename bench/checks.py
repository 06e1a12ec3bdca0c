#!/usr/bin/env python3
"""The `checks` scenario of bench/run.sh (portcullis only): CSRF and
JSON-schema routes against a plain route, same request, same run.

    checks.py bodies DIR                 request bodies for the scenario, in DIR
    checks.py report --raw ... --md ... --json ...
                                         adds "Route checks vs plain" to the report
                                         that benchlib.py report wrote, then prints it

Bodies (all written into DIR, sizes into DIR/bodies.json):

    body-small.txt     a tiny form body, for /csrf and its baseline
    body-1k.json       1024 bytes, valid against bench-schema.json
    body-64k.json      65536 bytes, valid against bench-schema.json
    body-invalid.json  breaks the schema (configuration check: must get 400)

The schema itself is written by run.sh (section 4), next to the bodies.
"""

import argparse
import json
import os
import re
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import _fmt, _median  # noqa: E402  (same formatting as the main table)

SKU = re.compile(r"^[A-Z]{3}-[0-9]+$")

# (name, baseline scenario, check scenario, req/s ratio target or None)
PAIRS = [
    ("csrf", "plain_post_small", "csrf", 0.97),
    ("schema_1k", "plain_post_1k", "schema_1k", 0.85),
    ("schema_64k", "plain_post_64k", "schema_64k", None),
]
LABELS = {
    "csrf": "`csrf = true` vs plain (tiny form POST, same-origin headers on both)",
    "schema_1k": "`json_schema` vs plain, 1 KiB JSON",
    "schema_64k": "`json_schema` vs plain, 64 KiB JSON",
}


# --------------------------------------------------------------------------
# bodies


def order_body(target):
    """A compact JSON object of exactly `target` bytes: {"items": [...], "note": "..."}.
    Items fill it; the note pads the last few bytes."""
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    head, mid, tail = '{"items":[', '],"note":"', '"}'
    items, size, i = [], len(head) + len(mid) + len(tail), 0
    while True:
        sku = f"{letters[i % 26]}{letters[(i // 26) % 26]}{letters[(i * 7) % 26]}-{10000 + i}"
        item = json.dumps({"sku": sku, "qty": i % 9 + 1}, separators=(",", ":"))
        extra = len(item) + (1 if items else 0)
        if size + extra > target:
            break
        items.append(item)
        size += extra
        i += 1
    note = "n" * (target - size)
    text = head + ",".join(items) + mid + note + tail
    assert len(text.encode()) == target, (len(text), target)
    return text


def valid_order(doc):
    """The rules of run.sh's bench-schema.json, checked here too, so that a
    400 from portcullis on these bodies is portcullis's problem, not ours."""
    if not isinstance(doc, dict) or set(doc) - {"items", "note"} or "items" not in doc:
        return False
    if not isinstance(doc.get("note", ""), str):
        return False
    items = doc["items"]
    if not isinstance(items, list) or not items:
        return False
    for it in items:
        if not isinstance(it, dict) or set(it) != {"sku", "qty"}:
            return False
        if not isinstance(it["sku"], str) or not SKU.match(it["sku"]):
            return False
        if not isinstance(it["qty"], int) or isinstance(it["qty"], bool) or it["qty"] < 1:
            return False
    return True


def cmd_bodies(a):
    os.makedirs(a.dir, exist_ok=True)
    sizes = {}
    for name, target in (("1k", 1024), ("64k", 65536)):
        text = order_body(target)
        doc = json.loads(text)
        if not valid_order(doc):
            raise SystemExit(f"checks.py: generated body-{name}.json does not follow the schema")
        n = len(text.encode())
        if abs(n - target) > target * 0.05:
            raise SystemExit(f"checks.py: body-{name}.json is {n} bytes, not {target} ±5%")
        with open(os.path.join(a.dir, f"body-{name}.json"), "w") as f:
            f.write(text)
        sizes[name] = {"bytes": n, "items": len(doc["items"])}
    small = "comment=bench"
    with open(os.path.join(a.dir, "body-small.txt"), "w") as f:
        f.write(small)
    sizes["small"] = {"bytes": len(small), "content_type": "application/x-www-form-urlencoded"}
    # a lower-case sku and qty 0: two violations, well-formed JSON
    invalid = '{"items":[{"sku":"abc-1","qty":0}],"note":"bench"}'
    assert not valid_order(json.loads(invalid))
    with open(os.path.join(a.dir, "body-invalid.json"), "w") as f:
        f.write(invalid)
    sizes["invalid"] = {"bytes": len(invalid)}
    with open(os.path.join(a.dir, "bodies.json"), "w") as f:
        json.dump(sizes, f, indent=2)
    print(" ".join(f"{k}={v['bytes']}B" for k, v in sizes.items()))
    return 0


# --------------------------------------------------------------------------
# report


def cmd_report(a):
    recs = []
    with open(a.raw) as f:
        for line in f:
            if line.strip():
                recs.append(json.loads(line))
    by = {}
    for r in recs:
        if r.get("server") == "portcullis":
            by.setdefault(r["scenario"], []).append(r)

    def values(scen, key):
        return [r[key] for r in by.get(scen, []) if r.get("ok") and r.get(key) is not None]

    def per_round(scen, key):
        return {r["round"]: r[key] for r in by.get(scen, []) if r.get("ok") and r.get(key) is not None}

    def paired(check, plain, key):
        c, p = per_round(check, key), per_round(plain, key)
        return [round(c[r] / p[r], 3) for r in sorted(c) if p.get(r)]

    def errors(scen):
        """wrk's non-2xx/3xx answers (errors.status: status > 399) and socket errors, summed over runs."""
        status = sock = failed = 0
        for r in by.get(scen, []):
            e = r.get("errors") or {}
            status += e.get("status", 0)
            sock += sum(v for k, v in e.items() if k != "status")
            failed += 0 if r.get("ok") else 1
        return {"non_2xx": status, "socket_errors": sock, "failed_runs": failed}

    bodies = {}
    if a.bodies and os.path.exists(a.bodies):
        with open(a.bodies) as f:
            bodies = json.load(f)

    checks = {}
    for name, plain, check, target in PAIRS:
        if not (by.get(plain) and by.get(check)):
            continue
        rps_r = paired(check, plain, "rps")
        cpu_r = paired(check, plain, "cpu_us_per_req")
        p_rps, c_rps = _median(values(plain, "rps")), _median(values(check, "rps"))
        p_cpu, c_cpu = _median(values(plain, "cpu_us_per_req")), _median(values(check, "cpu_us_per_req"))
        ratio = round(statistics.median(rps_r), 3) if rps_r else None
        pe, ce = errors(plain), errors(check)
        valid = not any(pe.values()) and not any(ce.values())
        checks[name] = {
            "plain_scenario": plain,
            "check_scenario": check,
            "plain_rps": p_rps,
            "check_rps": c_rps,
            "ratio": ratio,
            "ratio_per_round": rps_r,
            "ratio_of_medians": round(c_rps / p_rps, 3) if p_rps and c_rps else None,
            "plain_cpu_us_per_req": p_cpu,
            "check_cpu_us_per_req": c_cpu,
            "cpu_ratio": round(statistics.median(cpu_r), 3) if cpu_r else None,
            "cpu_ratio_per_round": cpu_r,
            "plain_p99_us": _median(values(plain, "p99_us")),
            "check_p99_us": _median(values(check, "p99_us")),
            "target_ratio": target,
            "target_met": (ratio >= target) if (target is not None and ratio is not None) else None,
            "plain_errors": pe,
            "check_errors": ce,
            "valid": valid,
        }

    with open(a.md) as f:
        md = f.read()
    if checks:
        L = ["### Route checks vs plain (portcullis)", ""]
        L.append(
            "Keep-alive HTTPS/1.1 POSTs (wrk as in `ka`, `bench/wrk_post.lua`); each check route against "
            "`/plain` (no policy) with the same request, the order alternating by round. Ratio = check / plain, "
            "per round, median over rounds (req/s: above 1 is better; CPU/req: below 1 is better)."
        )
        if bodies:
            L.append(
                "Bodies: " + ", ".join(f"{k} {v['bytes']} B" + (f" ({v['items']} items)" if "items" in v else "")
                                       for k, v in bodies.items() if k != "invalid") + "."
            )
        L.append("")
        L.append("| comparison | plain req/s | check req/s | req/s ratio (per round) | target | plain CPU/req | check CPU/req | CPU/req ratio (per round) | non-2xx / socket errors (plain; check) |")
        L.append("|---|---:|---:|---|---|---:|---:|---|---|")
        for name, c in checks.items():
            def ratio_cell(x, rounds):
                if x is None:
                    return "—"
                return f"{x:.3f}× ({', '.join(f'{v:.2f}' for v in rounds)})"
            if c["target_ratio"] is None:
                tgt = "none (reported)"
            else:
                tgt = f"≥ {c['target_ratio']:.2f}×: " + ("—" if c["target_met"] is None else ("met" if c["target_met"] else "**NOT met**"))
            pe, ce = c["plain_errors"], c["check_errors"]
            err = f"{pe['non_2xx']}/{pe['socket_errors']}; {ce['non_2xx']}/{ce['socket_errors']}"
            if not c["valid"]:
                err += " **INVALID: errors or failed runs, the numbers do not measure the check**"
            L.append(
                f"| {LABELS[name]} | {_fmt(c['plain_rps'], 'req/s')} | {_fmt(c['check_rps'], 'req/s')} | "
                f"{ratio_cell(c['ratio'], c['ratio_per_round'])} | {tgt} | "
                f"{_fmt(c['plain_cpu_us_per_req'], 'µs')} | {_fmt(c['check_cpu_us_per_req'], 'µs')} | "
                f"{ratio_cell(c['cpu_ratio'], c['cpu_ratio_per_round'])} | {err} |"
            )
        L.append("")
        section = "\n".join(L) + "\n"
        marker = "### Noise:"
        md = md.replace(marker, section + marker, 1) if marker in md else md + "\n" + section
        with open(a.md, "w") as f:
            f.write(md)
    with open(a.json) as f:
        out = json.load(f)
    out["route_checks"] = checks or None
    if bodies:
        out["route_check_bodies"] = bodies
    with open(a.json, "w") as f:
        json.dump(out, f, indent=2)
    print(md)
    return 0


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("bodies")
    p.add_argument("dir")
    p = sub.add_parser("report")
    p.add_argument("--raw", required=True)
    p.add_argument("--md", required=True)
    p.add_argument("--json", required=True)
    p.add_argument("--bodies")
    a = ap.parse_args()
    return cmd_bodies(a) if a.cmd == "bodies" else cmd_report(a)


if __name__ == "__main__":
    sys.exit(main())
