"""Prints the benchmark summary (Markdown) from bench/results/*.json.

Every figure comes from the JSON the benchmarks wrote; nothing is typed in by
hand. `make bench` runs it last; README.md quotes its output. IPv6 figures sit
beside the IPv4 ones: in the same row where both families measured a case (with
the IPv6/IPv4 ratio), in rows of their own for targets.
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
    if d.get("format", 1) >= 2:
        return rows_p1_families(d)
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


def rows_p1_families(d: dict[str, Any]) -> list[list[str]]:
    """prog_cost.py format 2: results per family, one row per case with both."""
    v4, v6 = d["results"].get("ipv4", {}), d["results"].get("ipv6", {})
    ratio = d.get("v6_over_v4", {})
    out = []

    def cell(r: dict[str, Any]) -> str:
        return f"{r['ns_per_packet']:.1f} ns/pkt ({r.get('ratio_to_reference', 0):.2f}x reference)"

    for name in list(v4) + [k for k in v6 if k not in v4]:
        parts = []
        if name in v4:
            parts.append(("IPv4 " if name in v6 else "") + cell(v4[name]))
        if name in v6:
            parts.append("IPv6 " + cell(v6[name]))
        if name in ratio:
            parts.append(f"IPv6/IPv4 {ratio[name]:.2f}")
        out.append([f"P1 {name}", "; ".join(parts), "", ""])
    tr = d.get("tracking") or {}
    for name, r in tr.items():
        if "ns_per_packet" in r:
            out.append([f"P1 dirty log: est-hit (IPv4, 100k), {name}",
                        f"{r['ns_per_packet']:.1f} ns/pkt ({r['over_untracked_ns']:+.1f} ns)",
                        "~0 (zero cost for others)" if name == "another VM migrating" else "",
                        ""])
    if "log append" in tr:
        la = tr["log append"]
        out.append(["P1 dirty log: a session's first packet in a round (the append)",
                     f"{la['append_ns']:+.1f} ns", "<= 10 ns", verdict(la["append_ns"] <= 10)])
    for fam, res in (("IPv4", v4), ("IPv6", v6)):
        for name, r in res.items():
            if name.startswith("est-hit") and "extension" not in name:
                x = r.get("ratio_to_reference")
                out.append([f"P1 target, {name}, {fam}", f"{x:.2f}x reference", "<= 1.3x",
                            verdict(x is not None and x <= 1.3)])
    return out


def rows_veth(d: dict[str, Any]) -> list[list[str]]:
    out = []
    ratios = d.get("ratios", {})
    for fam, tag in (("", ""), (" IPv6", ", IPv6")):
        for key, target, label in (
            (f"P2{fam} ours(native)/nftables", 3.0, f"P2 drop new, native{tag}: ours / nftables"),
            (f"P2{fam} ours(generic)/nftables", 3.0,
             f"P2 drop new, generic{tag}: ours / nftables"),
            (f"P3{fam} ours(native)/nftables", 1.4,
             f"P3 established, native{tag}: ours / nftables"),
            (f"P3{fam} ours(generic)/nftables", 1.4,
             f"P3 established, generic{tag}: ours / nftables"),
        ):
            r = ratios.get(key)
            if not r:
                continue
            med, lo, hi = r["median_paired_ratio"], r["paired_min"], r["paired_max"]
            # rounds on both sides of the target: not a firm verdict on this machine
            edge = " (borderline)" if lo < target <= hi else ""
            out.append([label, f"{med:.2f}x (rounds {lo:.2f}-{hi:.2f})",
                        f">= {target}x", verdict(med >= target) + edge])
    # one row per case: the IPv4 rate, and the IPv6 twin's beside it
    results = d.get("results", {})
    for name, r in results.items():
        mpps = r.get("median_mpps") if isinstance(r, dict) else None
        if mpps is None or r.get("family", "ipv4") != "ipv4":
            continue
        value = f"{mpps:.2f} Mpps"
        twin = results.get(f"{name}, IPv6")
        if twin:
            rel = ratios.get(f"{name.replace('/', ' ', 1).replace(' (', '(')} IPv6/IPv4")
            value = f"IPv4 {value}; IPv6 {twin['median_mpps']:.2f} Mpps"
            if rel and rel.get("ratio_of_medians") is not None:
                value += f" ({rel['ratio_of_medians']:.2f}x IPv4)"
        out.append([f"rate {name}", value, "", ""])
    for name, r in results.items():  # IPv6 cases without an IPv4 twin
        if r.get("family") == "ipv6" and name[: -len(", IPv6")] not in results:
            out.append([f"rate {name}", f"{r['median_mpps']:.2f} Mpps", "", ""])
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


def rows_goodput(d: dict[str, Any]) -> list[list[str]]:
    """goodput.py: one row per configuration, case (direction x streams): the median
    Gbit/s and the median per-round ratio to no filter; a configuration that could not
    be attached is one n/a row; the target: auto's worst case >= 0.9x no filter."""
    out = []
    summary = d.get("summary", {})
    for name, e in summary.items():
        who = {"none": "no filter", "nftables": "nftables"}.get(name, f"ours {name}")
        if name == "auto" and e.get("attached_mode"):
            who += f" ({e['attached_mode']})"
        if "error" in e:
            out.append([f"goodput {who}", "n/a", "", ""])
            continue
        for case, c in e.get("cases", {}).items():
            if c.get("gbit_s") is None:
                out.append([f"goodput {who}, {case}", "n/a", "", ""])
                continue
            value = f"{c['gbit_s']:.2f} Gbit/s"
            if name != "none" and c.get("ratio_to_none") is not None:
                value += f" ({c['ratio_to_none']:.2f}x no filter)"
            out.append([f"goodput {who}, {case}", value, "", ""])
    tg = d.get("target", {})
    if tg:
        x = tg.get("threshold", 0.9)
        if tg.get("met") is None:
            value = f"n/a ({tg.get('why', 'not measured')})"
        else:
            value = f"{tg['worst_ratio']:.2f}x no filter ({tg['worst_case']}"
            nft = tg.get("nftables_ratio_same_case")
            value += f"; nftables {nft:.2f}x)" if nft is not None else ")"
        mode = f" ({tg['attached_mode']})" if tg.get("attached_mode") else ""
        out.append([f"goodput target, ours auto{mode}, worst case", value, f">= {x}x no filter",
                    verdict(tg.get("met"))])
    return out


def rows_migrate(d: dict[str, Any]) -> list[list[str]]:
    """migrate_speed.py's own rows; a mix with IPv6 also gets its time over the
    all-IPv4 one at the same size (the two ran in the same run)."""
    rel: dict[str, float] = {}
    mixes = d.get("ours_mixes", {})
    for mix, by_n in mixes.items():
        if mix == "ipv4":
            continue
        for n, o in by_n.items():
            base = mixes.get("ipv4", {}).get(n)
            if base and base.get("end_to_end_s"):
                share = o.get("ipv6_share", 0)
                label = "half IPv6" if share == 0.5 else f"{share:.0%} IPv6"
                rel[f"P4 full copy of one VM, {int(n):,} sessions ({label}), through the agent"] = (
                    o["end_to_end_s"] / base["end_to_end_s"])
    out = []
    for row in d.get("summary_rows", []):
        row = [str(x) for x in row]
        if row[0] in rel:
            row[1] += f" ({rel[row[0]]:.2f}x the all-IPv4 time)"
        out.append(row)
    return out


def rows_phases(d: dict[str, Any]) -> list[list[str]]:
    """migrate_phases.py: per size and churn, the phases through the agent; the CLI's
    wall time; the three targets at the largest size."""
    out = []
    for r in d["runs"]:
        n = r["sessions"]
        for churn, c in r["churn"].items():
            p = c["phases_s"]
            ms = {k: v * 1e3 for k, v in p.items()}
            out.append([f"P4 phases, {n:,} sessions (+{n:,} others each side), {churn} changed",
                        f"preflight {ms['preflight']:.1f} ms, full {ms['full copy']:.0f} ms, "
                        f"delta {ms['delta 1']:.1f} ms, final {ms['final delta']:.1f} ms "
                        f"({c['records']['final']} records)", "", ""])
        out.append([f"samixdp migrate (the CLI), {n:,} sessions",
                     f"{r['cli']['wall_s']:.2f} s wall", "", ""])
    t = d["targets"]
    n = f"{t['at_sessions']:,}"
    out.append([f"final delta target, {n} sessions, 1% changed",
                f"{t['final_delta_1pct_s'] * 1e3:.1f} ms", "<= 50 ms",
                verdict(t["final_delta_ok"])])
    out.append([f"preflight target, {n} sessions", f"{t['preflight_s'] * 1e3:.1f} ms", "<= 50 ms",
                verdict(t["preflight_ok"])])
    out.append([f"samixdp migrate wall time target, {n} sessions", f"{t['cli_wall_s']:.2f} s",
                "<= 1.5 s", verdict(t["cli_wall_ok"])])
    return out


def rows_drain(d: dict[str, Any]) -> list[list[str]]:
    """drain.py: per configuration the drain's wall time (CLI start to exit) and its
    ratio to one VM of 200k; the old way; the target (50 x 4k within 2x)."""
    out = []
    for c in d["configs"]:
        out.append([f"host drain through the agents, {c['label']} sessions "
                    f"(--parallel {c['parallel']})",
                    f"{c['wall_s']:.2f} s wall ({c['ratio_to_1x200k']:.2f}x 1 × 200k)", "", ""])
    o = d.get("old_way")
    if o:
        out.append([f"host drain the old way, {o['label']}",
                    f"{o['wall_s']:.2f} s wall, {o['completed']}/{o['processes']} completed",
                    "", ""])
    t = d["target"]
    out.append([f"host drain target, {t['what']}", f"{t['ratio']:.2f}x",
                f"<= {t['limit']:g}x", verdict(t["met"])])
    if not d.get("all_landed", True):
        out.append(["host drain landing check", "some VMs' sessions did not land exactly",
                    "every VM exact", verdict(False)])
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
    global RESULTS
    if len(sys.argv) > 1:  # another results directory (default bench/results)
        RESULTS = Path(sys.argv[1])
    rows: list[list[str]] = []
    meta = None
    when: dict[str, tuple[str, str]] = {}  # result file -> (date, kernel)

    def seen(name: str, d: dict[str, Any]) -> None:
        env = d.get("environment", {}) if isinstance(d.get("environment"), dict) else {}
        when[name] = (str(d.get("date") or env.get("date") or "?")[:16],
                      str(d.get("kernel") or env.get("kernel") or "?"))

    for name, fn in (("prog_cost", rows_p1), ("veth_rates", rows_veth), ("goodput", rows_goodput),
                     ("flood_goodput", rows_flood), ("migrate_speed", rows_migrate),
                     ("migrate_phases", rows_phases), ("drain", rows_drain)):
        d = load(name)
        if d is None:
            rows.append([name, "not run", "", ""])
            continue
        meta = meta or d
        seen(name, d)
        rows.extend(fn(d))
    surv = load("survival_1000") or load("survival_200")
    if surv:
        seen("survival", surv)
        rows.extend(rows_survival(surv))
    acl = load("acl_cost")
    if acl:
        seen("acl_cost", acl)
        for k, v in acl["results"].items():
            rows.append([f"ACL {k.replace('_', ' ')} ({v['rules_loaded']} rules loaded)",
                         f"{v['ns_per_packet']:.1f} ns/pkt", "", ""])
    if meta:
        print(f"Measured {meta.get('date', '?')}, kernel {meta.get('kernel', '?')}, "
              f"{meta.get('cpu', '?')} ({meta.get('cpus', '?')} CPUs)")
        # the files may come from different runs: say when each was written
        print("(" + "; ".join(f"{k} {d} on {kern}" for k, (d, kern) in when.items()) + ")\n")
    print("| figure | value | target | |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
