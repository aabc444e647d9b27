#!/usr/bin/env python3
"""Summarises docs/scripts/ws-compare.sh's runs.jsonl as a Markdown table:
per implementation, the median (min-max over rounds) of fanout deliveries
per second and per server CPU-second, and of idle KiB per connection
(settled, held); each also as a ratio to `ours` within the same round.
Usage: ws-compare-table.py target/ws-compare/runs.jsonl"""
import json
import statistics
import sys

runs = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
order = []
for run in runs:
    if run["impl"] not in order:
        order.append(run["impl"])


def value(run, measure):
    report = run["report"]
    if report.get("failed") or not report.get("complete", False):
        return None
    if measure == "per_s":
        return report["deliveries"]["delivered"] / report["elapsed_s"]
    if measure == "per_cpu_s":
        return (report.get("server") or {}).get("deliveries_per_cpu_s")
    if measure == "settled":
        return report["idle"]["per_connection_kib"]
    if measure == "held":
        return report["idle"]["per_connection_held_kib"]
    return None


measures = {
    "fanout": [("per_s", "deliveries/s", 1e6, "M"), ("per_cpu_s", "deliveries per server CPU-s", 1e6, "M")],
    "idle": [("settled", "KiB/conn settled", 1, ""), ("held", "KiB/conn held", 1, "")],
}


def fmt(xs, scale, unit):
    if not xs:
        return "-"
    med = statistics.median(xs) / scale
    return f"{med:.2f}{unit} ({min(xs) / scale:.2f}-{max(xs) / scale:.2f})"


for scenario, ms in measures.items():
    chosen = [r for r in runs if r["scenario"] == scenario]
    if not chosen:
        continue
    rounds = sorted({r["round"] for r in chosen})
    print(f"\n{scenario} ({len(rounds)} rounds; median (min-max); ratio to ours: median of per-round ratios)\n")
    head = "| impl | " + " | ".join(f"{label} | ÷ ours" for _, label, _, _ in ms) + " | incomplete |"
    print(head)
    print("|" + "---|" * (2 + 2 * len(ms)))
    for impl in order:
        mine = [r for r in chosen if r["impl"] == impl]
        cells = []
        for key, _, scale, unit in ms:
            xs = [v for v in (value(r, key) for r in mine) if v is not None]
            ratios = []
            for rnd in rounds:
                a = [value(r, key) for r in mine if r["round"] == rnd]
                b = [value(r, key) for r in chosen if r["impl"] == "ours" and r["round"] == rnd]
                if a and b and a[0] and b[0]:
                    ratios.append(a[0] / b[0])
            cells.append(fmt(xs, scale, unit))
            cells.append(f"{statistics.median(ratios):.2f}" if ratios else "-")
        bad = sum(1 for r in mine if value(r, ms[0][0]) is None)
        print(f"| {impl} | " + " | ".join(cells) + f" | {bad} |")
