"""Prints the benchmark summary (Markdown) from bench/results/*.json.

Every figure comes from the JSON the benchmarks wrote; nothing is typed in by
hand. `make bench` runs it last; README.md quotes its output.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "missed")


def rows_p1(d: dict[str, Any]) -> list[list[str]]:
    res = d["results"]
    out = []
    for name, r in res.items():
        out.append([f"P1 {name}", f"{r['ns_per_packet']:.1f} ns/pkt "
                    f"({r.get('ratio_to_reference', 0):.2f}x reference)", "", ""])
    for name, r in res.items():
        if name.startswith("est-hit"):
            ratio = r.get("ratio_to_reference")
            out.append([f"P1 target, {name}", f"{ratio:.2f}x reference", "<= 1.3x",
                        verdict(ratio is not None and ratio <= 1.3)])
    return out


def rows_veth(d: dict[str, Any]) -> list[list[str]]:
    out = []
    ratios = d.get("ratios", {})
    for key, target, label in (
        ("P2 ours(native)/nftables", 3.0, "P2 drop new, native: ours / nftables"),
        ("P2 ours(generic)/nftables", 3.0, "P2 drop new, generic: ours / nftables"),
        ("P3 ours(native)/nftables", 1.4, "P3 established, native: ours / nftables"),
        ("P3 ours(generic)/nftables", 1.4, "P3 established, generic: ours / nftables"),
    ):
        r = ratios.get(key)
        if not r:
            continue
        med = r["median_paired_ratio"]
        out.append([label, f"{med:.2f}x (rounds {r['paired_min']:.2f}-{r['paired_max']:.2f})",
                    f">= {target}x", verdict(med >= target)])
    for name, r in d.get("results", {}).items():
        mpps = r.get("median_mpps") if isinstance(r, dict) else None
        if mpps is not None:
            out.append([f"rate {name}", f"{mpps:.2f} Mpps", "", ""])
    return out


def rows_flood(d: dict[str, Any]) -> list[list[str]]:
    out = []
    summary = d["summary"]
    theirs = summary["nftables"]["ratio"]
    for name, r in summary.items():
        value = (f"{r['ratio']:.2f} ({r['no_flood_gbit_s']:.1f} -> {r['flood_gbit_s']:.1f} "
                 f"Gbit/s, {r['flood_kpps']} kpps of SYNs)")
        if name == "nftables":
            out.append([f"flood goodput ratio, {name}", value, "", ""])
        else:
            out.append([f"flood goodput ratio, {name}", value, ">= nftables",
                        verdict(r["ratio"] >= theirs)])
    return out


def rows_migrate(d: dict[str, Any]) -> list[list[str]]:
    out = []
    for row in d.get("summary_rows", []):
        out.append([str(x) for x in row])
    return out


def rows_survival(d: dict[str, Any]) -> list[list[str]]:
    out = []
    for r in d["runs"]:
        extra = ""
        if r.get("migration"):
            m = r["migration"]
            extra = f", migration {m['total_seconds'] * 1000:.0f} ms / {m['total_bytes']} B"
        drops = sum(r["b_drops"].values())
        out.append([f"P6 {r['name']}, {r['conns']} connections",
                    f"{r['alive']}/{r['conns']} alive, max stall {r['max_stall_ms']:.0f} ms, "
                    f"p99 {r['p99_stall_ms']:.0f} ms, {drops} pkts dropped at B{extra}",
                    "all alive" if r["name"] == "migrated" else "breaks",
                    verdict(r["broken"] == 0 if r["name"] == "migrated" else r["broken"] > 0)])
    return out


def main() -> int:
    rows: list[list[str]] = []
    meta = None
    for name, fn in (("prog_cost", rows_p1), ("veth_rates", rows_veth),
                     ("flood_goodput", rows_flood), ("migrate_speed", rows_migrate)):
        d = load(name)
        if d is None:
            rows.append([name, "not run", "", ""])
            continue
        meta = meta or d
        rows.extend(fn(d))
    surv = load("survival_1000") or load("survival_200")
    if surv:
        rows.extend(rows_survival(surv))
    acl = load("acl_cost")
    if acl:
        for k, v in acl["results"].items():
            rows.append([f"ACL {k.replace('_', ' ')} ({v['rules_loaded']} rules loaded)",
                         f"{v['ns_per_packet']:.1f} ns/pkt", "", ""])
    if meta:
        print(f"Measured {meta.get('date', '?')}, kernel {meta.get('kernel', '?')}, "
              f"{meta.get('cpu', '?')} ({meta.get('cpus', '?')} CPUs)\n")
    print("| figure | value | target | |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
