#!/usr/bin/env python3
"""Migration speed and bundle size: export+sign and verify+import of one VM.

Creates two firewalls (host A and host B) in a private bpffs under /run,
fills A with N sessions of the VM plus N sessions of other VMs (so selection
has to filter), and B with N other sessions (so the import has to snapshot
around them), then times, per repeat:

  export+sign    build_bundle on A (dump, select, serialise, sign)
  verify+import  receive_bundle on B (signature, checks, replay cache,
                 capacity/snapshot, undo record, batch load)

and prints medians, bundle bytes and bytes/session. Figures are printed,
never asserted. Needs root (bcc, bpffs). Cleans up its pins and mount.

    sudo .venv/bin/python bench/migrate_speed.py --sessions 100000
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sami_xdp import protect  # noqa: E402
from sami_xdp.loader.compile import Limits  # noqa: E402
from sami_xdp.loader.pinned import Firewall, unpin_all  # noqa: E402
from sami_xdp.migrate import (  # noqa: E402
    ExportState,
    HostIdentity,
    ReplayCache,
    TrustStore,
    abort_import,
    build_bundle,
    new_migration_id,
    receive_bundle,
)
from sami_xdp.netutil import ip_to_be32  # noqa: E402

VM = "10.1.1.1"


def fill(fw: Firewall, vm: str, n: int, rng: np.random.Generator, salt: int) -> None:
    """n live sessions with `vm` at one end and random external peers."""
    if n == 0:
        return
    now = time.monotonic_ns()
    m = fw.maps["sessions"]
    k = np.zeros(n, m.key_dtype)
    v = np.zeros(n, m.value_dtype)
    peer = np.uint32(0xC6000000 + salt * 0x10000) + rng.permutation(n).astype(np.uint32)
    peer_be = peer.byteswap()  # host order -> the map's network-order field
    vmb = np.uint32(ip_to_be32(vm))
    vm_host = np.uint32(vmb).byteswap()
    lo = peer < vm_host
    k["addr_lo"] = np.where(lo, peer_be, vmb)
    k["addr_hi"] = np.where(lo, vmb, peer_be)
    vm_port = np.uint16(443).byteswap()
    peer_port = rng.integers(1024, 65535, n).astype(np.uint16).byteswap()
    k["port_lo"] = np.where(lo, peer_port, vm_port)
    k["port_hi"] = np.where(lo, vm_port, peer_port)
    k["proto"] = 6
    v["state"] = 3
    v["initiator"] = rng.integers(0, 2, n)
    v["flags"] = 4
    v["created_ns"] = now - rng.integers(10**9, 3600 * 10**9, n).astype(np.uint64)
    v["last_seen_ns"] = now - rng.integers(0, 60 * 10**9, n).astype(np.uint64)
    pk = (2 ** rng.uniform(0, 24, (n, 2))).astype(np.uint64)
    v["packets"] = pk
    v["bytes"] = pk * rng.integers(60, 1500, (n, 2)).astype(np.uint64)
    v["ifindex"] = 3
    m.update_many(k, v)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sessions", type=int, default=100_000, help="sessions of the VM")
    ap.add_argument("--others", type=int, default=None, help="other VMs' sessions (default N)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--compression", default="none,zlib+shuffle")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    n = args.sessions
    others = n if args.others is None else args.others

    run = uuid.uuid4().hex[:6]
    mnt = Path(f"/run/samixdp-bench-{run}")
    mnt.mkdir(parents=True)
    subprocess.run(["mount", "-t", "bpf", "bpf", str(mnt)], check=True)
    tmp = Path(tempfile.mkdtemp(prefix="samixdp-bench-"))
    fws: list[Firewall] = []
    runs: dict[str, dict[str, Any]] = {}
    results: dict[str, Any] = {"sessions": n, "others": others, "runs": runs}
    try:
        cap = 1 << max(17, int(np.ceil(np.log2((n + others) * 1.25))))
        limits = Limits(max_sessions=cap)
        t = time.perf_counter()
        fa = Firewall.create(mnt / "a", limits)
        fb = Firewall.create(mnt / "b", limits)
        fws += [fa, fb]
        compile_s = time.perf_counter() - t
        for fw in fws:
            protect.add_protected(fw, "10.1.0.0/16")
        rng = np.random.default_rng(7)
        fill(fa, VM, n, rng, 0)
        fill(fa, "10.1.2.2", others, rng, 1)
        fill(fb, "10.1.3.3", others, rng, 2)

        ida = HostIdentity.init(tmp / "a", "host-a")
        HostIdentity.init(tmp / "b", "host-b")
        trust_b = TrustStore.load(tmp / "b")
        trust_b.add("host-a", "127.0.0.1:7070", ida.public_b64)
        replay = ReplayCache(tmp / "b-state")

        for comp in args.compression.split(","):
            exp_t, imp_t, sizes, phases = [], [], [], []
            for _ in range(args.repeat):
                mid = new_migration_id()
                tm: dict[str, float] = {}
                t0 = time.perf_counter()
                data = build_bundle(
                    fa,
                    VM,
                    "host-b",
                    1,
                    mid,
                    "full",
                    ExportState(),
                    identity=ida,
                    compression=comp,
                    timings=tm,
                )
                t1 = time.perf_counter()
                res = receive_bundle(fb, data, trust_b, replay, "host-b")
                t2 = time.perf_counter()
                assert res.counts["sessions"] == n, res.counts
                exp_t.append(t1 - t0)
                imp_t.append(t2 - t1)
                sizes.append(len(data))
                phases.append(
                    {
                        **{f"export.{k}": v for k, v in tm.items()},
                        **{f"import.{k}": v for k, v in res.timings.items()},
                    }
                )
                abort_import(fb, mid, tmp / "b-state")  # B back to its own sessions only
            med_phase = {k: statistics.median(p[k] for p in phases) for k in phases[0]}
            runs[comp] = {
                "export_sign_s": statistics.median(exp_t),
                "verify_import_s": statistics.median(imp_t),
                "end_to_end_s": statistics.median(a + b for a, b in zip(exp_t, imp_t, strict=True)),
                "bytes": int(statistics.median(sizes)),
                "bytes_per_session": statistics.median(sizes) / max(n, 1),
                "phases_s": med_phase,
            }
        replay.close()
        results["compile_s"] = compile_s
    finally:
        for fw in fws:
            fw.close()
        for name in ("a", "b"):
            unpin_all(mnt / name)
        subprocess.run(["umount", str(mnt)], check=False)
        shutil.rmtree(mnt, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)

    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(
        f"VM sessions {n}, other VMs' sessions {others} on each host, median of {args.repeat} runs"
    )
    print(
        f"{'compression':<14}{'export+sign':>12}{'verify+import':>15}{'total':>9}"
        f"{'bytes':>12}{'B/session':>11}"
    )
    for comp, r in runs.items():
        print(
            f"{comp:<14}{r['export_sign_s']:>11.3f}s{r['verify_import_s']:>14.3f}s"
            f"{r['end_to_end_s']:>8.3f}s{r['bytes']:>12}{r['bytes_per_session']:>11.2f}"
        )
    for comp, r in runs.items():
        detail = ", ".join(f"{k} {v * 1000:.0f}" for k, v in r["phases_s"].items())
        print(f"  {comp} phases (ms): {detail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
