#!/usr/bin/env python3
"""P4 migration speed vs conntrack-tools, P5 bundle size, and map memory, in one run.

P4 (ours): one VM holding N sessions (N = 10k, 100k, 1M) on host A, with N
more sessions of 8 other VMs in the same maps; host B holds N sessions of 8
VMs of its own. Each size runs twice, the mixes side by side (`--ipv6-share`):
all sessions IPv4 (the VM is 10.1.1.1), and half of them IPv6 (the VM is
dual-stack, 10.1.1.1 and 2001:db8:1::10, one bundle holding both addresses;
the other VMs' sessions are half IPv6 too). An IPv6 client sits in a /64 of its
own with a random interface identifier, as real clients do. A and B are two
firewalls in a private bpffs under /run. B runs a real `samixdp agent` process
on 127.0.0.1; A drives the real
`Migration` class (sami_xdp/migrate/phases.py): preflight, then the full copy
round, timed end to end: select + serialise + sign on A -> TCP -> the agent
verifies and imports on B -> its signed acknowledgement checked on A. The
per-phase split comes from the bundle builder's timings on A and the agent's
timings carried in its ack; "transfer" is the rest of the round (TCP both
ways, framing, the ack's signing and checking), "other" what the phases do
not cover. After each round the migration is aborted through the agent, so B
is back to its own sessions. Map capacities: the default Limits (1M
sessions) unless 2N entries do not fit, then the next power of two (2^21 for
N = 1M). Compression none (the `samixdp migrate` default). Medians of 5
rounds. One more in-process round under cProfile at the largest N
goes to the JSON ("profile"), and a check that the parallel filtered map scan
returns exactly what a plain dump + filter does ("scan_check").

P4 (conntrack-tools 1.4.7): the same numbers of entries in the kernel's
conntrack table, in two network namespaces: the source holds the VM's N
entries (TCP ESTABLISHED/ASSURED, half opened by the VM, half towards it) plus
N of another VM, the destination N of a third. Timed: `conntrack -L -o save
-s VM` and `-d VM` into files on the source (side by side), then `conntrack
-R` of both files on the destination (side by side): conntrack's export and
import. The files are on tmpfs, so this side has no transfer cost at all.
conntrack's hash table is one for all namespaces, so the export rounds run
while the destination is still empty and the import rounds after the source
was flushed (on two real hosts neither side sees the other's entries); end to
end = median export + median import. For 1M, the table gets 2N buckets like
ours (with the default 262144, inserts fail with ENOSPC on long chains) and
nf_conntrack_max room for 2N; both are restored afterwards. A size is skipped
(and extrapolated linearly, labelled so) if the previous one took > 60 s.

P5: bundle bytes per session at each N and mix for compression none / zlib /
zlib+shuffle (bundle.build_bundle in process; 60 B records of either family +
256 B of header and signature + 16 B per VM address per bundle when
uncompressed), all-IPv4 and half-IPv6 next to each other.

Memory: `bpftool map show pinned PATH -j` (memlock) of every pinned map of a
firewall created with the default Limits, cross-checked with the map fd's
/proc/self/fdinfo memlock, and the total. Hash/LRU/array maps are
preallocated; the two LPM tries allocate per prefix and are filled to
max_entries first, so every figure is at capacity.

Figures are printed and written to bench/results/migrate_speed.{json,png};
nothing is asserted about speed. Needs root. Removes its pins, mounts,
namespaces and agent, and restores the sysctls (SIGTERM too).

    sudo .venv/bin/python bench/migrate_speed.py            # 10k, 100k, 1M, both mixes
    sudo .venv/bin/python bench/migrate_speed.py --quick    # 10k, 100k
    sudo .venv/bin/python bench/migrate_speed.py --ipv6-share 0.5   # half-IPv6 only
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import datetime
import json
import os
import platform
import pstats
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sami_xdp.base.netutil import addr_array, ipv4_addr_array
from sami_xdp.loader import batch
from sami_xdp.loader.compile import MAP_NAMES, PROG_PIN, Limits
from sami_xdp.loader.pinned import Firewall, unpin_all
from sami_xdp.migrate import (
    ExportState,
    HostIdentity,
    TrustStore,
    VmAddrs,
    build_bundle,
    new_migration_id,
)
from sami_xdp.migrate import phases as phases_mod
from sami_xdp.migrate.bundle import HEADER_SIZE, SIG_LEN
from sami_xdp.migrate.importer import abort_import, receive_bundle
from sami_xdp.migrate.replay import ReplayCache
from sami_xdp.migrate.select import involves_any, vm_sessions
from sami_xdp.migrate.verify import verify_bundle
from sami_xdp.migrate.vmset import addr_lt
from sami_xdp.policy import protect
from sami_xdp.policy.config import create_firewall

ROOT = Path(__file__).resolve().parent.parent

VM, VM6 = "10.1.1.1", "2001:db8:1::10"  # the migrating VM (dual-stack when a mix has IPv6)
PROTECT = ("10.1.0.0/16", "2001:db8::/32")
OTHERS_A = [f"10.1.2.{i}" for i in range(1, 9)]  # other VMs behind A
OTHERS_B = [f"10.1.3.{i}" for i in range(1, 9)]  # VMs behind B
OTHERS_A6 = [f"2001:db8:2::{i}" for i in range(1, 9)]  # ... their IPv6 addresses
OTHERS_B6 = [f"2001:db8:3::{i}" for i in range(1, 9)]
DEFAULT_SIZES = (10_000, 100_000, 1_000_000)
DEFAULT_SHARES = (0.0, 0.5)  # the share of the VM's sessions that are IPv6, per run
COMPRESSIONS = ("none", "zlib", "zlib+shuffle")
CT_BOUND_S = 60.0  # conntrack at a size is skipped if the previous size took longer
TARGET_1M_S = 1.5
TARGET_RATIO = 3.0
TARGET_BPS = 32.0
RESULTS = ROOT / "bench" / "results"
PHASES = ("select", "serialise", "sign", "transfer", "verify", "load")
BUNDLE_FIXED = HEADER_SIZE + SIG_LEN  # header + Ed25519 signature, whatever the record count
ADDR_BYTES = 16  # + one address table entry per VM address


def mix_name(share: float) -> str:
    """How results name a mix: "ipv4" (all IPv4) or e.g. "ipv6-50" (half IPv6)."""
    return "ipv4" if share == 0 else f"ipv6-{round(share * 100)}"


def mix_label(share: float) -> str:
    return "all IPv4" if share == 0 else ("half IPv6" if share == 0.5 else f"{share:.0%} IPv6")


def vm_of(share: float) -> VmAddrs:
    """The migrating VM: its IPv4 address alone, or dual-stack when sessions are IPv6."""
    return VmAddrs.parse([VM] if share == 0 else [VM, VM6])


def fixed_bytes(vms: VmAddrs) -> int:
    return BUNDLE_FIXED + ADDR_BYTES * len(vms)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def med(xs: list[float]) -> float:
    return float(statistics.median(xs))


# ---- environment -------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break

    def git(*a: str) -> str:
        r = subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, text=True)
        return r.stdout.strip()

    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "kernel": platform.release(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "head": git("rev-parse", "--short", "HEAD"),
        "dirty": bool(
            git(
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                "sami_xdp",
                "bpf",
                "bench/migrate_speed.py",
            )
        ),
        "conntrack": subprocess.run(
            ["conntrack", "--version"], capture_output=True, text=True
        ).stdout.strip(),
        "load_avg_start": os.getloadavg(),
    }


# ---- a private bpffs ----------------------------------------------------------------------


@contextlib.contextmanager
def bpffs_mount() -> Iterator[Path]:
    mnt = Path(f"/run/samixdp-bench-mig-{uuid.uuid4().hex[:6]}")
    mnt.mkdir(parents=True)
    subprocess.run(["mount", "-t", "bpf", "bpf", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        for d in mnt.iterdir():
            if d.is_dir():
                unpin_all(d)
        subprocess.run(["umount", str(mnt)], check=False)
        shutil.rmtree(mnt, ignore_errors=True)


def capacity_for(n: int) -> int:
    """Default Limits unless the 2n entries of a host do not fit."""
    default = Limits().max_sessions
    need = 2 * n
    return default if need <= default else 1 << (need - 1).bit_length()


# ---- sessions ----------------------------------------------------------------------------


def peers_of(vm: str, n: int, rng: np.random.Generator, salt: int) -> np.ndarray:
    """n distinct external peers of `vm`'s family: IPv4 ones in 198.0.0.0/8 and up,
    IPv6 ones each in a /64 of its own with a random interface identifier."""
    index = rng.permutation(n).astype(np.uint32)
    if ":" not in vm:
        return ipv4_addr_array(np.uint32(0xC6000000 + salt * 0x100000) + index)
    raw = np.zeros((n, 16), dtype=np.uint8)
    raw[:, :4] = np.frombuffer(bytes.fromhex("20010db8"), np.uint8)  # 2001:db8::/32
    raw[:, 4:8] = (np.uint32(0xC6000000 + salt * 0x100000) + index).astype(">u4").view(
        np.uint8).reshape(-1, 4)
    raw[:, 8:] = rng.integers(0, 256, (n, 8), dtype=np.uint8)
    return raw.view(addr_array([vm]).dtype).reshape(-1)


def fill(fw: Firewall, vm: str, n: int, rng: np.random.Generator, salt: int) -> None:
    """n live sessions with `vm` (either family) at one end and distinct external
    peers: 90% TCP established, 10% UDP assured (all of them in the assured `sessions`
    map); half opened by the VM, half towards it."""
    if n == 0:
        return
    now = time.monotonic_ns()
    m = fw.maps["sessions"]
    k = np.zeros(n, m.key_dtype)
    v = np.zeros(n, m.value_dtype)
    peer = peers_of(vm, n, rng, salt)
    vm_addr = addr_array([vm])
    lo = addr_lt(peer, np.repeat(vm_addr, n))  # the peer is the key's lo side
    k["addr_lo"], k["addr_hi"] = vm_addr[0], vm_addr[0]
    k["addr_lo"][lo] = peer[lo]
    k["addr_hi"][~lo] = peer[~lo]
    vm_port = np.uint16(443).byteswap()
    peer_port = rng.integers(1024, 65535, n).astype(np.uint16).byteswap()
    k["port_lo"] = np.where(lo, peer_port, vm_port)
    k["port_hi"] = np.where(lo, vm_port, peer_port)
    udp = rng.random(n) < 0.1
    k["proto"] = np.where(udp, 17, 6)
    v["state"] = np.where(udp, fw.const("ST_UDP_ASSURED"), fw.const("ST_ESTABLISHED"))
    inbound = rng.random(n) < 0.5  # opened by the peer
    peer_side = np.where(lo, fw.const("SIDE_LO"), fw.const("SIDE_HI"))
    vm_side = np.where(lo, fw.const("SIDE_HI"), fw.const("SIDE_LO"))
    v["initiator"] = np.where(inbound, peer_side, vm_side)
    flags = np.where(inbound, fw.const("SESS_F_INBOUND"), 0)
    flags |= np.where(lo, fw.const("SESS_F_VM_HI"), fw.const("SESS_F_VM_LO"))
    v["flags"] = flags
    v["created_ns"] = now - rng.integers(10**9, 3600 * 10**9, n).astype(np.uint64)
    v["last_seen_ns"] = now - rng.integers(0, 60 * 10**9, n).astype(np.uint64)
    pk = (2 ** rng.uniform(0, 24, (n, 2))).astype(np.uint64)
    v["packets"] = pk
    v["bytes"] = pk * rng.integers(60, 1500, (n, 2)).astype(np.uint64)
    v["ifindex"] = 3
    m.update_many(k, v)


def split_share(n: int, share: float) -> tuple[int, int]:
    """(IPv4, IPv6) sessions of n at this IPv6 share."""
    n6 = round(n * share)
    return n - n6, n6


def fill_vm(fw: Firewall, n: int, share: float, rng: np.random.Generator, salt: int) -> None:
    """The migrating VM's n sessions, `share` of them on its IPv6 address."""
    n4, n6 = split_share(n, share)
    fill(fw, VM, n4, rng, salt)
    fill(fw, VM6, n6, rng, salt + 1)


def fill_spread(fw: Firewall, vms: list[str], n: int, rng: np.random.Generator, salt: int) -> None:
    for i, vm in enumerate(vms):
        fill(fw, vm, n // len(vms) + (1 if i < n % len(vms) else 0), rng, salt + i)


def fill_others(fw: Firewall, v4: list[str], v6: list[str], n: int, share: float,
                rng: np.random.Generator, salt: int) -> None:
    """n sessions of other VMs, in the same family mix as the migrating VM's."""
    n4, n6 = split_share(n, share)
    fill_spread(fw, v4, n4, rng, salt)
    fill_spread(fw, v6, n6, rng, salt + len(v4) + 1)


def vm_count(fw: Firewall, vms: VmAddrs) -> int:
    return len(vm_sessions(fw, vms)[0])


def scan_check(fw: Firewall, vms: VmAddrs) -> dict[str, Any]:
    """The filtered (parallel) scan returns exactly what a plain dump + filter does."""
    m = fw.maps["sessions"]
    k, _ = m.dump()
    want = k[vms.contains(k["addr_lo"]) | vms.contains(k["addr_hi"])]
    got = m.scan(involves_any(vms.addrs))
    g = np.ascontiguousarray(got.keys).view(f"V{k.dtype.itemsize}")
    w = np.ascontiguousarray(want).view(f"V{k.dtype.itemsize}")
    same = len(g) == len(w) == len(np.unique(g)) and bool(np.isin(g, w).all())
    return {
        "workers": batch.scan_workers(m.info.type, m.info.max_entries),
        "same_as_dump": same,
        "scanned": got.scanned,
        "dumped": len(k),
    }


# ---- the agent process ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class AgentProc:
    """`samixdp agent` for host B, its log in a file; `extra`: more agent options."""

    def __init__(self, bpffs: Path, cfg: Path, state: Path, port: int, logf: Path,
                 extra: Sequence[str] = ()) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.logf = logf
        self.fh = open(logf, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sami_xdp",
                "--bpffs",
                str(bpffs),
                "--config-dir",
                str(cfg),
                "--state-dir",
                str(state),
                "agent",
                "--listen",
                f"127.0.0.1:{port}",
                "--pickup",
                "10",
                *extra,
            ],
            stdout=self.fh,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(ROOT),
        )
        end = time.monotonic() + 30
        while time.monotonic() < end:
            if b'"listening"' in logf.read_bytes():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"agent did not start: {logf.read_text(errors='replace')[-2000:]}")

    def stop(self) -> None:
        """A clean stop (SIGTERM: a background job's children ignore SIGINT), else a
        kill, even when interrupted while waiting."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=10)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.fh.close()


class Capture:
    """Records the builder's timings and the agent's ack inside Migration.send_round."""

    def __init__(self) -> None:
        self.build: dict[str, float] = {}
        self.ack: dict[str, Any] = {}
        self._build = phases_mod.build_bundle
        self._ack = phases_mod._ack

    def __enter__(self) -> Capture:
        def build(*a: Any, **kw: Any) -> bytes:
            kw["timings"] = self.build
            return self._build(*a, **kw)

        def ack(*a: Any, **kw: Any) -> dict[str, Any]:
            self.ack = self._ack(*a, **kw)
            return self.ack

        phases_mod.build_bundle = build  # type: ignore[assignment]
        phases_mod._ack = ack  # type: ignore[assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        phases_mod.build_bundle = self._build  # type: ignore[assignment]
        phases_mod._ack = self._ack  # type: ignore[assignment]


# ---- P4 ours + P5 at one size ---------------------------------------------------------------


def phase_split(build: dict[str, float], agent: dict[str, float], round_s: float) -> dict:
    export = build["total_s"]
    recv = agent["receive_total_s"]
    split = {
        "select": build["dump_s"] + build["select_s"] + build.get("delta_s", 0.0),
        "serialise": build["to_wire_s"] + build["serialise_s"] + build["compress_s"],
        "sign": build["sign_s"],
        "transfer": max(round_s - export - recv, 0.0),
        "verify": agent["verify_s"],
        "load": agent["plan_s"] + agent["undo_log_s"] + agent["write_s"],
        # details
        "select.read_maps": build["dump_s"],
        "select.filter": build["select_s"],
        "load.plan": agent["plan_s"],
        "load.undo_log": agent["undo_log_s"],
        "load.write": agent["write_s"],
        "end_to_end": round_s,
    }
    # the rest: the builder's delta/ACL steps, the agent's undo bookkeeping, the CLI-side
    # parse of the bundle's counts
    split["other"] = max(round_s - sum(split[p] for p in PHASES), 0.0)
    return split


def run_ours(n: int, repeat: int, profile: bool, tmp: Path, share: float = 0.0
             ) -> dict[str, Any]:
    cap = capacity_for(n)
    vms = vm_of(share)
    n4, n6 = split_share(n, share)
    out: dict[str, Any] = {
        "sessions": n,
        "mix": mix_name(share),
        "ipv6_share": share,
        "vm": list(vms.ips),
        "sessions_ipv4": n4,
        "sessions_ipv6": n6,
        "others_on_source": n,
        "others_on_destination": n,
        "max_sessions": cap,
    }
    with bpffs_mount() as mnt:
        t = time.perf_counter()
        fa = create_firewall(mnt / "a", Limits(max_sessions=cap))
        fb = create_firewall(mnt / "b", Limits(max_sessions=cap))
        out["setup_compile_s"] = time.perf_counter() - t
        try:
            for fw in (fa, fb):
                for prefix in PROTECT:
                    protect.add_protected(fw, prefix)
            rng = np.random.default_rng(n)
            t = time.perf_counter()
            fill_vm(fa, n, share, rng, 0)
            fill_others(fa, OTHERS_A, OTHERS_A6, n, share, rng, 2)
            fill_others(fb, OTHERS_B, OTHERS_B6, n, share, rng, 2)
            out["setup_fill_s"] = time.perf_counter() - t
            out["scan_check"] = scan_check(fa, vms)

            cfg_a, cfg_b, st_a, st_b = (
                tmp / f"{n}-{mix_name(share)}-{x}" for x in ("cfg-a", "cfg-b", "st-a", "st-b")
            )
            ida = HostIdentity.init(cfg_a, "host-a")
            idb = HostIdentity.init(cfg_b, "host-b")
            port = free_port()
            trust_a = TrustStore.load(cfg_a)
            trust_a.add("host-b", f"127.0.0.1:{port}", idb.public_b64)
            trust_a.save()
            trust_b = TrustStore.load(cfg_b)
            trust_b.add("host-a", "127.0.0.1:1", ida.public_b64, vms=",".join(PROTECT))
            trust_b.save()
            peer = trust_a.get("host-b")

            agent = AgentProc(mnt / "b", cfg_b, st_b, port,
                              tmp / f"{n}-{mix_name(share)}-agent.log")
            rounds: list[dict[str, float]] = []
            preflight: list[float] = []
            try:
                for i in range(repeat):
                    mig = phases_mod.Migration(
                        fa, ida, trust_a, peer, vms, phases_mod.MigrateOptions(compression="none")
                    )
                    t = time.perf_counter()
                    mig.preflight(n)
                    preflight.append(time.perf_counter() - t)
                    with Capture() as cap_:
                        phase = mig.send_round("full")
                    if mig.conn is not None:
                        mig.conn.close()
                        mig.conn = None
                    if phase.imported.get("sessions") != n:
                        raise RuntimeError(f"agent imported {phase.imported}, expected {n}")
                    if i == 0 and vm_count(fb, vms) != n:
                        raise RuntimeError("B does not hold the VM's sessions after the round")
                    split = phase_split(cap_.build, cap_.ack["timings"], phase.seconds)
                    split["bytes"] = phase.bytes
                    rounds.append(split)
                    log(f"  ours {n} ({mix_label(share)}): round {i + 1}/{repeat} "
                        f"{phase.seconds:.3f} s")
                    ack = phases_mod.send_abort(ida, trust_a, peer, mig.mid.hex())
                    if not ack.get("ok"):
                        raise RuntimeError(f"abort refused: {ack}")
                if vm_count(fb, vms) != 0:
                    raise RuntimeError("B still holds the VM's sessions after the abort")
            finally:
                agent.stop()
            out["repeat"] = repeat
            out["rounds"] = rounds
            out["phases_s"] = {k: med([r[k] for r in rounds]) for k in rounds[0]}
            out["preflight_s"] = med(preflight)
            out["end_to_end_s"] = out["phases_s"]["end_to_end"]
            out["bundle_bytes"] = int(rounds[0]["bytes"])

            # P5: bytes per session by compression (in process), with build/verify times
            sizes: dict[str, Any] = {}
            trust_v = TrustStore.load(cfg_b)
            for comp in COMPRESSIONS:
                tm: dict[str, float] = {}
                data = build_bundle(
                    fa,
                    vms,
                    "host-b",
                    1,
                    new_migration_id(),
                    "full",
                    ExportState(),
                    identity=ida,
                    compression=comp,
                    timings=tm,
                )
                t = time.perf_counter()
                vb = verify_bundle(data, trust_v, "host-b")
                verify_s = time.perf_counter() - t
                sizes[comp] = {
                    "bytes": len(data),
                    "bytes_per_session": len(data) / n,
                    "fixed_bytes": fixed_bytes(vms),
                    "serialise_compress_s": tm["to_wire_s"] + tm["serialise_s"] + tm["compress_s"],
                    "verify_decompress_s": verify_s,
                }
                del vb, data
            out["bundle_size"] = sizes

            if profile:
                out["profile"] = profile_round(fa, fb, ida, trust_v,
                                               tmp / f"{n}-{mix_name(share)}-prof", vms)
        finally:
            fa.close()
            fb.close()
    return out


def profile_round(
    fa: Firewall, fb: Firewall, ida: HostIdentity, trust_b: TrustStore, state: Path,
    vms: VmAddrs,
) -> dict[str, Any]:
    """One in-process export + verify + import under cProfile: where the time goes."""
    replay = ReplayCache(state)
    mid = new_migration_id()
    pr = cProfile.Profile()
    tm: dict[str, float] = {}
    t = time.perf_counter()
    pr.enable()
    data = build_bundle(fa, vms, "host-b", 1, mid, "full", ExportState(), identity=ida,
                        timings=tm)
    res = receive_bundle(fb, data, trust_b, replay, "host-b", state_dir=state)
    pr.disable()
    total = time.perf_counter() - t
    abort_import(fb, mid, state, replay=replay)
    replay.close()
    st = pstats.Stats(pr)
    rows = []
    for (file, line, fn), (_cc, nc, tt, ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
        rows.append(
            {
                "function": f"{Path(file).name}:{line}({fn})",
                "calls": nc,
                "self_s": round(tt, 4),
                "cumulative_s": round(ct, 4),
            }
        )
    rows.sort(key=lambda r: -r["self_s"])
    return {
        "in_process_total_s": total,
        "export_timings_s": tm,
        "import_timings_s": res.timings,
        "top_self_time": rows[:15],
    }


# ---- memory ---------------------------------------------------------------------------------


def fdinfo_memlock(fd: int) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
            if line.startswith("memlock:"):
                return int(line.split()[1])
    return None


def fill_lpm(fw: Firewall, name: str) -> int:
    """LPM tries allocate a node per prefix: fill one with max_entries distinct
    full-length prefixes so its memlock is the at-capacity figure."""
    m = fw.maps[name]
    key = np.zeros(1, m.key_dtype)
    raw = key.view(np.uint8)
    value = np.zeros(1, m.value_dtype)
    bits = (m.info.key_size - 4) * 8
    n = 0
    for i in range(m.info.max_entries):
        raw[:] = 0
        raw[:4] = np.frombuffer(np.uint32(bits).tobytes(), np.uint8)
        raw[-4:] = np.frombuffer(np.uint32(i).byteswap().tobytes(), np.uint8)
        try:
            m.update(key, value)
        except OSError:
            break
        n += 1
    return n


def run_memory() -> dict[str, Any]:
    limits = Limits()
    maps: dict[str, Any] = {}
    with bpffs_mount() as mnt:
        fw = create_firewall(mnt / "mem", limits)
        try:
            filled = {
                name: fill_lpm(fw, name)
                for name in MAP_NAMES
                if fw.maps[name].info.type_name == "lpm_trie"
            }
            for name in MAP_NAMES:
                r = subprocess.run(
                    ["bpftool", "map", "show", "pinned", str(mnt / "mem" / name), "-j"],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                info = json.loads(r.stdout)
                m = fw.maps[name]
                maps[name] = {
                    "type": info.get("type"),
                    "max_entries": info.get("max_entries"),
                    "key_size": info.get("bytes_key"),
                    "value_size": info.get("bytes_value"),
                    "memlock": int(info.get("bytes_memlock", 0)),
                    "fdinfo_memlock": fdinfo_memlock(m.fd),
                    "bytes_per_entry": int(info.get("bytes_memlock", 0))
                    / max(int(info.get("max_entries", 1)), 1),
                }
                if name in filled:
                    maps[name]["filled_to"] = filled[name]
            prog = subprocess.run(
                ["bpftool", "prog", "show", "pinned", str(mnt / "mem" / PROG_PIN), "-j"],
                capture_output=True,
                text=True,
            )
            prog_info = json.loads(prog.stdout) if prog.returncode == 0 else {}
        finally:
            fw.close()
    total = sum(m["memlock"] for m in maps.values())
    return {
        "limits": {
            "max_sessions": limits.max_sessions,
            "max_unassured": limits.max_unassured,
            "max_syn_counters": limits.max_syn_counters,
            "max_blacklist": limits.max_blacklist,
        },
        "maps": maps,
        "total_memlock": total,
        "program_memlock": prog_info.get("bytes_memlock"),
        "note": "hash/LRU/array maps are preallocated: memlock is the same empty or full; "
        "the LPM tries (protected, acl_sets) allocate per prefix and were filled to "
        "max_entries first",
        "fdinfo_agrees": all(m["fdinfo_memlock"] in (None, m["memlock"]) for m in maps.values()),
    }


# ---- conntrack-tools --------------------------------------------------------------------------


def ip_str(a: int) -> str:
    return f"{a >> 24}.{(a >> 16) & 255}.{(a >> 8) & 255}.{a & 255}"


def ct_lines(vm: str, n: int, salt: int) -> list[str]:
    """`conntrack -o save` lines: n established TCP entries of `vm`, half opened by it."""
    rng = np.random.default_rng(salt)
    peers = (0xC6000000 + salt * 0x100000 + rng.permutation(n)).tolist()
    ports = rng.integers(1024, 65535, n).tolist()
    out_ = rng.random(n) < 0.5
    lines = []
    tail = (
        "-p tcp --sport {a} --dport {b} --reply-port-src {b} --reply-port-dst {a} "
        "--state ESTABLISHED\n"
    )
    head = "-A -t 3600 -u SEEN_REPLY,ASSURED "
    for p, sp, o in zip(peers, ports, out_.tolist(), strict=True):
        pe = ip_str(p)
        if o:  # VM -> peer:443
            lines.append(f"{head}-s {vm} -d {pe} -r {pe} -q {vm} " + tail.format(a=sp, b=443))
        else:  # peer -> VM:443
            lines.append(f"{head}-s {pe} -d {vm} -r {vm} -q {pe} " + tail.format(a=sp, b=443))
    return lines


def write_ct_file(path: Path, parts: list[tuple[str, int, int]]) -> None:
    with open(path, "w") as fh:
        for vm, n, salt in parts:
            fh.writelines(ct_lines(vm, n, salt))


def sh_ns(ns: str, script: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", ns, "sh", "-c", script], capture_output=True, text=True, check=check
    )


def ct_count(ns: str) -> int:
    return int(sh_ns(ns, "conntrack -C").stdout.strip() or 0)


def ct_remove_vm(ns: str, keep: int, reload: Path) -> None:
    """Deletes the VM's entries again (untimed). `conntrack -D` deletes while it
    dumps and may miss entries, so it is repeated; as a last resort the table is
    flushed and the other entries reloaded."""
    for _ in range(5):
        sh_ns(
            ns,
            f"conntrack -D -s {VM} >/dev/null 2>&1; conntrack -D -d {VM} >/dev/null 2>&1",
            check=False,
        )
        if ct_count(ns) == keep:
            return
    sh_ns(ns, f"conntrack -F >/dev/null 2>&1; conntrack -R {reload} >/dev/null 2>&1")
    if ct_count(ns) != keep:
        raise RuntimeError(f"conntrack cleanup: {ct_count(ns)} entries left, want {keep}")


class ConntrackKnobs:
    """Raises nf_conntrack_max and the global hash size for the run; restores them."""

    MAX = Path("/proc/sys/net/netfilter/nf_conntrack_max")
    HASH = Path("/sys/module/nf_conntrack/parameters/hashsize")

    def __init__(self) -> None:
        self.orig_max = int(self.MAX.read_text())
        self.orig_hash = int(self.HASH.read_text())
        self.changed: dict[str, int] = {}

    def ensure(self, per_ns: int, buckets: int) -> None:
        want_max = max(self.orig_max, 1 << (int(per_ns * 1.1) - 1).bit_length())
        want_hash = max(self.orig_hash, 1 << (buckets - 1).bit_length())
        if int(self.MAX.read_text()) < want_max:
            self.MAX.write_text(str(want_max))
            self.changed["nf_conntrack_max"] = want_max
        if int(self.HASH.read_text()) < want_hash:
            self.HASH.write_text(str(want_hash))
            self.changed["hashsize"] = want_hash

    def restore(self) -> None:
        with contextlib.suppress(OSError):
            if int(self.HASH.read_text()) != self.orig_hash:
                self.HASH.write_text(str(self.orig_hash))
        with contextlib.suppress(OSError):
            if int(self.MAX.read_text()) != self.orig_max:
                self.MAX.write_text(str(self.orig_max))


def run_conntrack(n: int, repeat: int, knobs: ConntrackKnobs) -> dict[str, Any]:
    """Export rounds on the source while the destination is empty, then import
    rounds on the destination after the source was flushed: conntrack's hash
    table is shared by all namespaces, and on two real hosts neither side would
    walk or hash the other's entries."""
    tag = uuid.uuid4().hex[:6]
    src, dst = f"sxct-s-{tag}", f"sxct-d-{tag}"
    d = Path(tempfile.mkdtemp(prefix="sxct-", dir="/dev/shm"))
    out: dict[str, Any] = {"sessions": n, "others_on_source": n, "others_on_destination": n}
    try:
        knobs.ensure(per_ns=2 * n, buckets=2 * n)
        out["knobs_raised"] = dict(knobs.changed)
        out["hash_buckets"] = int(knobs.HASH.read_text())
        for ns in (src, dst):
            subprocess.run(["ip", "netns", "add", ns], check=True)
        t = time.perf_counter()
        write_ct_file(d / "vm.txt", [(VM, n, 1)])
        write_ct_file(d / "oth-a.txt", [("10.1.2.1", n, 2)])
        write_ct_file(d / "oth-b.txt", [("10.1.3.1", n, 3)])
        out["setup_generate_s"] = time.perf_counter() - t
        t = time.perf_counter()
        sh_ns(
            src,
            f"conntrack -R {d}/vm.txt >/dev/null 2>&1 & "
            f"conntrack -R {d}/oth-a.txt >/dev/null 2>&1; wait",
        )
        out["setup_load_source_s"] = time.perf_counter() - t
        if ct_count(src) != 2 * n:
            raise RuntimeError(f"conntrack setup: the source holds {ct_count(src)} entries")
        exp_s = []
        for i in range(repeat):
            t0 = time.perf_counter()
            sh_ns(
                src,
                f"conntrack -L -o save -s {VM} > {d}/x1.txt 2>/dev/null & "
                f"conntrack -L -o save -d {VM} > {d}/x2.txt 2>/dev/null; wait",
            )
            exp_s.append(time.perf_counter() - t0)
            lines = sum(1 for f in ("x1.txt", "x2.txt") for _ in open(d / f))
            if lines != n:
                raise RuntimeError(f"conntrack -L listed {lines} entries of the VM, not {n}")
            log(f"  conntrack {n}: export {i + 1}/{repeat} {exp_s[-1]:.2f} s")
        sh_ns(src, "conntrack -F >/dev/null 2>&1", check=False)
        t = time.perf_counter()
        sh_ns(dst, f"conntrack -R {d}/oth-b.txt >/dev/null 2>&1")
        out["setup_load_destination_s"] = time.perf_counter() - t
        if ct_count(dst) != n:
            raise RuntimeError(f"conntrack setup: the destination holds {ct_count(dst)} entries")
        imp_s = []
        for i in range(repeat):
            t0 = time.perf_counter()
            r = sh_ns(
                dst,
                f"conntrack -R {d}/x1.txt >/dev/null 2>{d}/e1 & "
                f"conntrack -R {d}/x2.txt >/dev/null 2>{d}/e2; wait; cat {d}/e1 {d}/e2",
                check=False,
            )
            imp_s.append(time.perf_counter() - t0)
            got = ct_count(dst) - n
            if got != n:
                raise RuntimeError(f"conntrack -R loaded {got} entries, not {n}: {r.stdout}")
            log(f"  conntrack {n}: import {i + 1}/{repeat} {imp_s[-1]:.2f} s")
            ct_remove_vm(dst, n, d / "oth-b.txt")
        out.update(
            repeat=repeat,
            export_s=med(exp_s),
            import_s=med(imp_s),
            end_to_end_s=med(exp_s) + med(imp_s),
            export_rounds_s=exp_s,
            import_rounds_s=imp_s,
            file_bytes=(d / "x1.txt").stat().st_size + (d / "x2.txt").stat().st_size,
            measured=True,
        )
    finally:
        for ns in (src, dst):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(d, ignore_errors=True)
    return out


# ---- report ----------------------------------------------------------------------------------


def summarise(res: dict[str, Any]) -> None:
    for key, o in res["ours"].items():
        ct = res["conntrack"].get(key)
        if ct and o["mix"] == "ipv4":  # conntrack's entries are IPv4: compare like with like
            o["conntrack_s"] = ct["end_to_end_s"]
            o["conntrack_measured"] = ct["measured"]
            o["ours_over_conntrack"] = o["end_to_end_s"] / ct["end_to_end_s"]
            o["speedup_vs_conntrack"] = ct["end_to_end_s"] / o["end_to_end_s"]
    largest = max(res["ours"].values(), key=lambda o: o["sessions"])
    n = largest["sessions"]
    t: dict[str, Any] = {}

    def target(name: str, value: float, goal: float, met: bool, **extra: Any) -> None:
        t[name] = {"value": value, "target": goal, "met": met, **extra}

    for mix, by_n in res["ours_mixes"].items():
        big = max(by_n.values(), key=lambda o: o["sessions"])
        if big["sessions"] >= 1_000_000:
            v = big["end_to_end_s"]
            suffix = "" if mix == "ipv4" else f"_{mix}"
            target(f"p4_1M_end_to_end_s{suffix}", v, TARGET_1M_S, v <= TARGET_1M_S)
    if "speedup_vs_conntrack" in largest:  # the wording: at 1M, >= 3x conntrack
        v = largest["speedup_vs_conntrack"]
        target(
            f"p4_speedup_vs_conntrack_at_{n}",
            v,
            TARGET_RATIO,
            v >= TARGET_RATIO,
            conntrack_measured=largest["conntrack_measured"],
        )
    sp = {
        o["sessions"]: o["speedup_vs_conntrack"]
        for o in res["ours"].values()
        if "speedup_vs_conntrack" in o
    }
    if sp:
        worst = min(sp, key=lambda k: sp[k])
        target(
            "p4_speedup_vs_conntrack_every_size",
            sp[worst],
            TARGET_RATIO,
            sp[worst] >= TARGET_RATIO,
            worst_at=worst,
        )
    for mix, by_n in res["ours_mixes"].items():
        big = max(by_n.values(), key=lambda o: o["sessions"])
        for comp in COMPRESSIONS:
            b = big["bundle_size"][comp]
            v = b["bytes_per_session"]
            suffix = "" if mix == "ipv4" else f"_{mix}"
            target(
                f"p5_bytes_per_session_{comp}_at_{big['sessions']}{suffix}",
                v,
                TARGET_BPS,
                v <= TARGET_BPS,
                per_record=(b["bytes"] - b["fixed_bytes"]) / big["sessions"],
                fixed_bytes=b["fixed_bytes"],
            )
    res["targets"] = t
    res["summary_rows"] = summary_rows(res)


def _mix_text(o: dict[str, Any]) -> str:
    return "" if o["mix"] == "ipv4" else f" ({mix_label(o['ipv6_share'])})"


def summary_rows(res: dict[str, Any]) -> list[list[str]]:
    """[figure, value, target, verdict] rows for bench/summary.py."""

    def verdict(ok: bool) -> str:
        return "met" if ok else "missed"

    rows = []
    for by_n in res["ours_mixes"].values():
        for o in by_n.values():
            n = o["sessions"]
            value = f"{o['end_to_end_s'] * 1000:.0f} ms"
            target, ok = "", None
            if "speedup_vs_conntrack" in o:
                est = "" if o["conntrack_measured"] else " (extrapolated)"
                value += (
                    f"; conntrack-tools {o['conntrack_s'] * 1000:.0f} ms{est}: "
                    f"{o['speedup_vs_conntrack']:.2f}x faster"
                )
                target, ok = (
                    f">= {TARGET_RATIO:g}x conntrack",
                    o["speedup_vs_conntrack"] >= TARGET_RATIO,
                )
            if n == 1_000_000:
                target = f"<= {TARGET_1M_S} s" + (f", {target}" if target else "")
                ok = o["end_to_end_s"] <= TARGET_1M_S and ok is not False
            rows.append(
                [
                    f"P4 full copy of one VM, {n:,} sessions{_mix_text(o)}, through the agent",
                    value,
                    target,
                    verdict(ok) if ok is not None else "",
                ]
            )
    largest = max(res["ours"].values(), key=lambda o: o["sessions"])
    ph = largest["phases_s"]
    rows.append(
        [
            f"P4 phases at {largest['sessions']:,}{_mix_text(largest)} (ms)",
            ", ".join(f"{p} {ph[p] * 1000:.0f}" for p in (*PHASES, "other")),
            "",
            "",
        ]
    )
    for by_n in res["ours_mixes"].values():
        big = max(by_n.values(), key=lambda o: o["sessions"])
        for comp in COMPRESSIONS:
            size = big["bundle_size"][comp]
            b = size["bytes_per_session"]
            rows.append(
                [
                    f"P5 bundle bytes/session, {comp}, {big['sessions']:,} sessions"
                    f"{_mix_text(big)}",
                    f"{b:.4f} (with {size['fixed_bytes']} B of header, addresses and "
                    "signature per bundle)",
                    f"<= {TARGET_BPS:g}",
                    verdict(b <= TARGET_BPS),
                ]
            )
    mem = res["memory"]
    s = mem["maps"]["sessions"]
    rows.append(
        [
            "Map memory at default capacities (bpftool memlock)",
            f"{mem['total_memlock'] / 2**20:.1f} MiB; sessions {s['memlock'] / 2**20:.0f} MiB "
            f"for {s['max_entries']:,} ({s['bytes_per_entry']:.0f} B/slot)",
            "",
            "",
        ]
    )
    return rows


def print_table(res: dict[str, Any]) -> None:
    env = res["environment"]
    print(
        f"\nsami-xdp migration benchmark, {env['date']}, kernel {env['kernel']}, "
        f"{env['cpus']} x {env['cpu']}, commit {env['head']}{' (dirty)' if env['dirty'] else ''}"
    )
    print(
        "P4: one VM's N sessions (+N other VMs' sessions on each host), full copy round "
        "through the agent on loopback; medians (ms)"
    )
    hdr = f"{'N':>9} {'mix':>10} " + "".join(f"{p:>10}" for p in (*PHASES, "other"))
    hdr += f"{'ours e2e':>10}{'conntrack':>11}{'speedup':>9}"
    print(hdr)
    everything = [o for by_n in res["ours_mixes"].values() for o in by_n.values()]
    for o in sorted(everything, key=lambda o: (o["sessions"], o["ipv6_share"])):
        ph = o["phases_s"]
        row = f"{o['sessions']:>9} {mix_label(o['ipv6_share']):>10} "
        row += "".join(f"{ph[p] * 1000:>10.1f}" for p in (*PHASES, "other"))
        row += f"{o['end_to_end_s'] * 1000:>10.1f}"
        if "conntrack_s" in o:
            mark = "" if o["conntrack_measured"] else "*"
            row += f"{o['conntrack_s'] * 1000:>10.0f}{mark:1}{o['speedup_vs_conntrack']:>8.2f}x"
        print(row)
    if any(not c["measured"] for c in res["conntrack"].values()):
        print("  * conntrack extrapolated linearly from the largest measured size (not measured)")
    print(
        "  details (ms): "
        + "; ".join(
            f"{o['sessions']}{_mix_text(o)}: read maps "
            f"{o['phases_s']['select.read_maps'] * 1000:.0f}, "
            f"plan {o['phases_s']['load.plan'] * 1000:.0f}, "
            f"write {o['phases_s']['load.write'] * 1000:.0f}, "
            f"preflight {o['preflight_s'] * 1000:.0f}"
            for o in everything
        )
    )
    for c in res["conntrack"].values():
        if c["measured"]:
            print(
                f"  conntrack {c['sessions']}: export (-L -s/-d) {c['export_s'] * 1000:.0f} ms, "
                f"import (-R) {c['import_s'] * 1000:.0f} ms, {c['hash_buckets']} hash buckets"
            )
    mixes = list(res["ours_mixes"])
    shares = {m: next(iter(res["ours_mixes"][m].values()))["ipv6_share"] for m in mixes}
    print("\nP5: bundle bytes per session (" + ", ".join(
        f"{mix_label(shares[m])}" for m in mixes) + " side by side)")
    print(f"{'N':>9}" + "".join(f"{f'{c} {mix_label(shares[m])}':>24}"
                                 for c in COMPRESSIONS for m in mixes))
    sizes = sorted({int(k) for by_n in res["ours_mixes"].values() for k in by_n})
    for n in sizes:
        cells = []
        for c in COMPRESSIONS:
            for m in mixes:
                o = res["ours_mixes"][m].get(str(n))
                cells.append(f"{o['bundle_size'][c]['bytes_per_session']:>24.2f}" if o
                             else f"{'-':>24}")
        print(f"{n:>9}" + "".join(cells))
    mem = res["memory"]
    print(
        "\nMemory (bpftool memlock), default Limits "
        f"(max_sessions {mem['limits']['max_sessions']}):"
    )
    for name, m in mem["maps"].items():
        print(
            f"  {name:<13}{m['type'] or '?':<14}{m['max_entries']:>9} x "
            f"{m['key_size']}+{m['value_size']} B"
            f"{m['memlock'] / 2**20:>10.2f} MiB{m['bytes_per_entry']:>8.1f} B/entry"
        )
    print(f"  {'total':<13}{'':<14}{'':>17}{mem['total_memlock'] / 2**20:>10.2f} MiB")
    print("\nTargets:")
    for k, v in res["targets"].items():
        note = ""
        if "per_record" in v:
            note = f" ({v['per_record']:.2f} B/record + {v['fixed_bytes']} B per bundle)"
        elif "worst_at" in v:
            note = f" (lowest, at {v['worst_at']} sessions)"
        verdict = "met" if v["met"] else "MISSED"
        print(f"  {k}: {v['value']:.4f}{note}, target {v['target']}: {verdict}")


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 2, figsize=(13, 9))
    ours = list(res["ours"].values())
    ns = [o["sessions"] for o in ours]
    a = ax[0][0]
    a.loglog(ns, [o["end_to_end_s"] for o in ours], "o-",
             label=f"sami-xdp, {mix_label(ours[0]['ipv6_share'])} (through the agent)")
    for by_n in res["ours_mixes"].values():
        if by_n is res["ours"]:
            continue
        other = list(by_n.values())
        a.loglog([o["sessions"] for o in other], [o["end_to_end_s"] for o in other], "^-",
                 label=f"sami-xdp, {mix_label(other[0]['ipv6_share'])}")
    ct = sorted(res["conntrack"].values(), key=lambda c: c["sessions"])
    meas = [c for c in ct if c["measured"]]
    extra = [c for c in ct if not c["measured"]]
    if meas:
        a.loglog(
            [c["sessions"] for c in meas],
            [c["end_to_end_s"] for c in meas],
            "s-",
            label="conntrack-tools (-L -s/-d, -R)",
        )
    if extra:
        pts = meas[-1:] + extra
        a.loglog(
            [c["sessions"] for c in pts],
            [c["end_to_end_s"] for c in pts],
            "s--",
            color="C1",
            alpha=0.5,
            label="conntrack-tools, extrapolated",
        )
    a.axhline(TARGET_1M_S, color="grey", ls=":", lw=1)
    a.annotate("1.5 s target (1M)", (ns[0], TARGET_1M_S), va="bottom", fontsize=8)
    a.set_xlabel("sessions of the migrating VM")
    a.set_ylabel("seconds (median)")
    a.set_title("P4: full copy of one VM's state, end to end")
    a.legend(fontsize=8)
    a.grid(True, which="both", alpha=0.3)

    a = ax[0][1]
    x = np.arange(len(ours))
    bottom = np.zeros(len(ours))
    parts = (*PHASES, "other")
    total = np.array([sum(o["phases_s"][p] for p in parts) for o in ours])  # ~ the median round
    for p in parts:
        vals = np.array([o["phases_s"][p] for o in ours]) / total * 100
        a.bar(x, vals, bottom=bottom, label=p)
        bottom += vals
    a.set_xticks(
        x, [f"{n:,}\n{o['end_to_end_s'] * 1000:.0f} ms" for n, o in zip(ns, ours, strict=True)]
    )
    a.set_ylabel("% of the round")
    a.set_title("P4: where a round's time goes (sami-xdp)")
    a.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1, 1))

    a = ax[1][0]
    mixes = list(res["ours_mixes"].values())
    w = 0.8 / (len(COMPRESSIONS) * len(mixes))
    bar = 0
    for i, comp in enumerate(COMPRESSIONS):
        for j, by_n in enumerate(mixes):
            vals = [by_n[str(n)]["bundle_size"][comp]["bytes_per_session"]
                    if str(n) in by_n else 0.0 for n in ns]
            share = next(iter(by_n.values()))["ipv6_share"]
            a.bar(x - 0.4 + (bar + 0.5) * w, vals, w, color=f"C{i}",
                  hatch="//" if j else None, label=f"{comp}, {mix_label(share)}")
            bar += 1
    a.axhline(TARGET_BPS, color="grey", ls=":", lw=1)
    a.set_xticks(x, [f"{n:,}" for n in ns])
    a.set_ylabel("bundle bytes / session")
    a.set_title("P5: bundle size (target <= 32 B/session), all IPv4 vs half IPv6")
    a.legend(fontsize=7)

    a = ax[1][1]
    mem = res["memory"]["maps"]
    names = sorted(mem, key=lambda k: mem[k]["memlock"])
    a.barh(names, [mem[k]["memlock"] / 2**20 for k in names])
    a.set_xscale("log")
    a.set_xlabel("MiB (bpftool memlock, log scale)")
    a.set_title(
        f"Map memory at default capacities: total {res['memory']['total_memlock'] / 2**20:.1f} MiB"
    )
    env = res["environment"]
    fig.suptitle(
        f"sami-xdp migration, {env['date'][:10]}, kernel {env['kernel']}, "
        f"{env['cpus']} x {env['cpu']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- main ------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="10k and 100k only")
    ap.add_argument("--sizes", default=None, help="comma separated session counts")
    ap.add_argument("--repeat", type=int, default=None, help="rounds per size (ours)")
    ap.add_argument("--ct-repeat", type=int, default=None, help="rounds per size (conntrack)")
    ap.add_argument("--no-conntrack", action="store_true")
    ap.add_argument("--no-profile", action="store_true", help="skip the cProfile round")
    ap.add_argument(
        "--ipv6-share",
        default=",".join(f"{x:g}" for x in DEFAULT_SHARES),
        help="the share of the VM's sessions that are IPv6, one run per value, comma "
        "separated (default 0,0.5: all IPv4 and half IPv6 side by side)",
    )
    ap.add_argument("--json-out", type=Path, default=RESULTS / "migrate_speed.json")
    ap.add_argument("--png-out", type=Path, default=RESULTS / "migrate_speed.png")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (bpffs, bcc, network namespaces)", file=sys.stderr)
        return 1
    sizes = (
        [int(s) for s in args.sizes.split(",")]
        if args.sizes
        else ([10_000, 100_000] if args.quick else list(DEFAULT_SIZES))
    )
    try:
        shares = sorted({float(x) for x in args.ipv6_share.split(",")})
    except ValueError:
        ap.error("--ipv6-share: comma separated numbers within [0, 1]")
    if not shares or not all(0 <= x <= 1 for x in shares):
        ap.error("--ipv6-share: comma separated numbers within [0, 1]")
    t_start = time.perf_counter()
    res: dict[str, Any] = {
        "environment": environment(),
        "sizes": sizes,
        "ipv6_shares": shares,
        "ours_mixes": {mix_name(x): {} for x in shares},
        "conntrack": {},
    }
    # `ours`: the all-IPv4 runs (compared with conntrack's IPv4 entries), else the first mix
    res["ours"] = res["ours_mixes"][mix_name(shares[0])]
    res["method"] = {
        "ours": "real `samixdp agent` process on 127.0.0.1 for host B, Migration.preflight + "
        "Migration.send_round('full') on host A in this process; compression none; median of "
        "repeats; each repeat aborted through the agent afterwards; per IPv6 share, the VM "
        "dual-stack (one bundle for both addresses) when the share is above 0",
        "conntrack": "two namespaces; timed: `conntrack -L -o save -s VM` and `-d VM` side by "
        "side on the source into tmpfs files, then two `conntrack -R` side by side on the "
        "destination; entries are TCP ESTABLISHED/ASSURED with 3600 s timeouts",
        "capacity": "default Limits (1M sessions) unless 2N does not fit, then the next power of 2",
    }
    tmp = Path(tempfile.mkdtemp(prefix="samixdp-bench-mig-"))
    knobs = ConntrackKnobs()

    def on_term(_sig: int, _frame: object) -> None:
        raise KeyboardInterrupt  # unwind: pins, mounts, namespaces and sysctls are restored

    signal.signal(signal.SIGTERM, on_term)
    try:
        log("memory: default Limits")
        res["memory"] = run_memory()
        for n in sizes:
            repeat = args.repeat or 5
            for share in shares:
                log(f"ours: {n} sessions ({mix_label(share)}), {repeat} rounds")
                profile = not args.no_profile and n == max(sizes) and share == shares[0]
                res["ours_mixes"][mix_name(share)][str(n)] = run_ours(
                    n, repeat, profile, tmp, share)
        if not args.no_conntrack:
            last: dict[str, Any] | None = None
            for n in sizes:
                if last is not None and last["end_to_end_s"] > CT_BOUND_S:
                    rate = last["end_to_end_s"] / last["sessions"]
                    res["conntrack"][str(n)] = {
                        "sessions": n,
                        "end_to_end_s": rate * n,
                        "measured": False,
                        "note": f"extrapolated linearly from {last['sessions']} entries "
                        f"({last['end_to_end_s']:.1f} s > {CT_BOUND_S:.0f} s bound)",
                    }
                    continue
                repeat = args.ct_repeat or 3
                log(f"conntrack: {n} entries, {repeat} rounds")
                last = res["conntrack"][str(n)] = run_conntrack(n, repeat, knobs)
    finally:
        knobs.restore()
        shutil.rmtree(tmp, ignore_errors=True)
    res["environment"]["load_avg_end"] = os.getloadavg()
    for k in ("date", "kernel", "cpu", "cpus"):  # top level, like the other results
        res[k] = res["environment"][k]
    res["wall_s"] = time.perf_counter() - t_start
    summarise(res)
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(res, indent=2, default=float) + "\n")
    plot(res, args.png_out)
    print_table(res)
    print(f"\nwrote {args.json_out} and {args.png_out} in {res['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
