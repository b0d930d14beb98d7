#!/usr/bin/env python3
"""What one scrape of the metrics endpoint costs, by table size.

A firewall in a private bpffs under /run with the default Limits (1M sessions,
256k unassured); its `sessions` map filled with N live sessions (N = 10k, 100k,
1M, as bench/migrate_speed.py fills them: 90% TCP established, 10% UDP assured),
`unassured` with N/10 SYN_SENT entries (at most its capacity), 1000 ACL rules
(the per-rule series cap) and MAX_RECORDS (1000) records of finished outgoing
migrations in the state dir (the read cap). Timed, median of 5: each part of one
collection in process (ops/metrics.FirewallCollector), and a whole scrape over
HTTP from 127.0.0.1 (collection + text exposition + transfer), with the size of
the answer; the peak of Python/NumPy allocations during one collection
(tracemalloc); and what a scrape costs while the text of the last collection
is served again (a client scraping in a loop). One more case: 40k ACL rules (a
host of 10k VMs with 4 rules each), where per-rule series are left out and only
the rule table is read.

    sudo .venv/bin/python bench/metrics_cost.py            # 10k, 100k, 1M
    sudo .venv/bin/python bench/metrics_cost.py --quick    # 10k, 100k

Prints a table and writes bench/results/metrics_cost.json; nothing is asserted.
Removes its pins and mount."""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
import time
import tracemalloc
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lib_env import cpu_model, git  # noqa: E402
from migrate_speed import bpffs_mount, fill  # noqa: E402

from sami_xdp.base.netutil import addr_array, ipv4_addr_array  # noqa: E402
from sami_xdp.loader.compile import Limits  # noqa: E402
from sami_xdp.loader.pinned import Firewall  # noqa: E402
from sami_xdp.migrate.phases import MigrationReport, PhaseReport  # noqa: E402
from sami_xdp.migrate.running import RECORDS_DIR  # noqa: E402
from sami_xdp.ops.metrics import (  # noqa: E402
    MAX_RECORDS,
    MAX_RULE_SERIES,
    FirewallCollector,
    serve_metrics,
)
from sami_xdp.policy import acl, protect  # noqa: E402
from sami_xdp.policy.config import create_firewall  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
VM = "10.1.1.1"
REPEAT = 5


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def med_s(fn: Callable[[], object], repeat: int = REPEAT) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def fill_unassured(fw: Firewall, n: int, rng: np.random.Generator) -> None:
    """n half-open outbound TCP sessions (SYN_SENT) of the VM in `unassured`."""
    m = fw.maps["unassured"]
    n = min(n, m.info.max_entries)
    if n == 0:
        return
    k = np.zeros(n, m.key_dtype)
    v = np.zeros(n, m.value_dtype)
    k["addr_lo"] = addr_array([VM])[0]
    k["addr_hi"] = ipv4_addr_array(np.uint32(0xCB000000) + np.arange(n, dtype=np.uint32))
    k["port_lo"] = rng.integers(1024, 65535, n).astype(np.uint16).byteswap()
    k["port_hi"] = np.uint16(443).byteswap()
    k["proto"] = 6
    v["state"] = fw.const("ST_SYN_SENT")
    v["last_seen_ns"] = time.monotonic_ns()
    m.update_many(k, v)


def write_records(state: Path, n: int) -> None:
    folder = state / RECORDS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        phases = [PhaseReport("preflight", 0.002), PhaseReport("full copy", 0.4, 60_000_000),
                  PhaseReport("delta 1", 0.05, 200_000), PhaseReport("final delta", 0.03, 5_000)]
        rep = MigrationReport(f"{i:032x}", [f"10.1.{i // 250}.{i % 250 + 1}"], "hostb", phases,
                              "completed")
        doc = {"pid": 2, "vm": rep.vm, "vms": rep.vms, "peer": "hostb",
               "migration_id": rep.migration_id, "status": "completed", "started": time.time(),
               "report": rep.as_dict()}
        (folder / f"{rep.vm}.json").write_text(json.dumps(doc))


def load_rules(fw: Firewall, n: int) -> None:
    vms = [f"10.1.{i // 250}.{i % 250 + 1}" for i in range(max(1, n // 4))]
    acl.load_rules(fw, [acl.make_rule(fw, vm=vms[i // 4], proto="tcp", dport=str(22 + i % 4))
                        for i in range(n)])


def measure(fw: Firewall, state: Path) -> dict[str, Any]:
    col = FirewallCollector(fw, state, None)
    parts: dict[str, Callable[[], object]] = {
        "verdicts": lambda: list(col._verdicts()),
        "maps": lambda: list(col._maps()),
        "sessions": lambda: list(col._sessions()),
        "acl": lambda: list(col._acl_hits()),
        "migrations": lambda: list(col._migrations()),
    }
    out: dict[str, Any] = {f"{name}_ms": round(med_s(fn) * 1000, 2) for name, fn in parts.items()}
    out["collect_ms"] = round(med_s(col._collect) * 1000, 2)
    tracemalloc.start()
    col._collect()
    out["collect_peak_mib"] = round(tracemalloc.get_traced_memory()[1] / 2**20, 1)
    tracemalloc.stop()
    srv = serve_metrics("127.0.0.1:0", fw.path, state, min_interval_s=0)
    try:
        body: list[bytes] = []

        def scrape() -> None:
            with urllib.request.urlopen(f"http://{srv.address}/metrics", timeout=60) as r:
                body[:] = [r.read()]

        out["scrape_ms"] = round(med_s(scrape) * 1000, 2)
        out["scrape_bytes"] = len(body[0])
        out["series"] = sum(1 for line in body[0].splitlines() if not line.startswith(b"#"))
    finally:
        srv.close()
    srv = serve_metrics("127.0.0.1:0", fw.path, state, min_interval_s=3600)
    try:  # what a request costs once the text is there (a client scraping in a loop)
        scrape()
        out["cached_scrape_ms"] = round(med_s(lambda: [scrape() for _ in range(100)]) * 10, 2)
    finally:
        srv.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="10k and 100k sessions only")
    args = ap.parse_args()
    sizes = (10_000, 100_000) if args.quick else (10_000, 100_000, 1_000_000)
    results: dict[str, Any] = {}
    rng = np.random.default_rng(7)
    with bpffs_mount() as mnt, tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp)
        write_records(state, MAX_RECORDS)
        fw = create_firewall(mnt / "fw", Limits())
        try:
            protect.add_protected(fw, "10.1.0.0/16")
            load_rules(fw, MAX_RULE_SERIES)
            done = 0
            for n in sizes:
                fill(fw, VM, n - done, rng, salt=len(results))
                fill_unassured(fw, n // 10, rng)
                done = n
                log(f"{n} sessions ...")
                results[f"{n}_sessions"] = {"sessions": fw.maps["sessions"].count(),
                                            "unassured": fw.maps["unassured"].count(),
                                            "acl_rules": MAX_RULE_SERIES, **measure(fw, state)}
            log("40k ACL rules ...")
            load_rules(fw, 40_000)
            results[f"{done}_sessions_40k_rules"] = {
                "sessions": fw.maps["sessions"].count(), "acl_rules": 40_000,
                **measure(fw, state)}
        finally:
            fw.close()
    doc = {"date": datetime.date.today().isoformat(), "cpu": cpu_model(),
           "commit": git("rev-parse", "--short", "HEAD"), "records": MAX_RECORDS,
           "repeat": REPEAT, "results": results}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "metrics_cost.json").write_text(json.dumps(doc, indent=2) + "\n")
    cols = ("sessions_ms", "acl_ms", "migrations_ms", "maps_ms", "verdicts_ms", "collect_ms",
            "scrape_ms", "cached_scrape_ms", "scrape_bytes", "collect_peak_mib")
    print(f"{'case':28}" + "".join(f"{c:>17}" for c in cols))
    for case, r in results.items():
        print(f"{case:28}" + "".join(f"{r[c]:>17}" for c in cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
