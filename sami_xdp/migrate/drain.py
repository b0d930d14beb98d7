"""`samixdp drain`: every protected VM of this host (or those in given prefixes)
moves to one or more peers, a bounded number at a time, each migration on its
own (one VM's failure ends only that VM's migration), with one report.

Which VMs: the firewall knows addresses, not VMs. A VM is each protected address
that is the VM end of a live session, has rules of its own (its /32 or /128) or
triggered a ban, one address per VM, unless a mapping file groups a VM's
addresses (a dual-stack VM) and names its destination:

    # VM addresses (comma separated)    peer
    10.1.1.1,2001:db8:1::10             host-b
    10.1.1.2                            host-c

Which peer: the mapping file's, else one of the `--peer`s, spread evenly, among
those whose scope here holds the VM when any does (the destination's own scope
check refuses a VM it does not take, for that VM alone).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..base.errors import InvalidArgument, SamiError
from ..base.netutil import IPNetwork, addr_array, addrs_to_ips, in_networks
from ..base.rows import unique_rows
from ..loader.pinned import Firewall
from ..policy.acl import host_prefixlen, read_rules
from ..policy.protect import list_protected
from ..policy.sessions import SESSION_MAPS, expired_mask
from .peers import Peer
from .vmset import VmAddrs

MAX_MAP_LINES = 100_000


@dataclass
class DrainItem:
    """One VM of a drain, its destination and, once done, how it went."""

    vms: VmAddrs
    peer: str
    outcome: str = "waiting"  # waiting | running | completed | failed: REASON
    report: dict[str, Any] | None = None
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        rep = self.report or {}
        phases = rep.get("phases", [])
        return {
            "vm": self.vms.label,
            "vms": list(self.vms.ips),
            "peer": self.peer,
            "outcome": self.outcome,
            "seconds": round(self.seconds, 4),
            "sessions": sum(int(p.get("exported", {}).get("sessions", 0)) for p in phases
                            if p.get("name") == "full copy"),
            "bytes": int(rep.get("total_bytes", 0)),
            "phases": {str(p.get("name")): round(float(p.get("seconds", 0.0)) * 1000, 1)
                       for p in phases},
            "migration_id": rep.get("migration_id"),
        }


@dataclass
class DrainReport:
    items: list[DrainItem]
    seconds: float = 0.0
    parallel: int = 1
    via: str = "agent"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> list[DrainItem]:
        return [i for i in self.items if i.outcome != "completed"]

    def as_dict(self) -> dict[str, Any]:
        rows = [i.as_dict() for i in self.items]
        return {
            "vms": rows,
            "completed": sum(1 for i in self.items if i.outcome == "completed"),
            "failed": len(self.failed),
            "sessions": sum(r["sessions"] for r in rows),
            "bytes": sum(r["bytes"] for r in rows),
            "seconds": round(self.seconds, 4),
            "parallel": self.parallel,
            "via": self.via,
            **self.extra,
        }


# ---- which VMs ---------------------------------------------------------------------


def vm_addresses(fw: Firewall, within: Sequence[IPNetwork] = ()) -> list[str]:
    """The protected addresses (inside `within`, when given) that are a VM here: the
    VM end of a live session, a rule's own /32 or /128, or a ban's VM."""
    c = fw.layout.consts
    now = time.monotonic_ns()
    found: list[np.ndarray] = []
    lock = threading.Lock()

    def vm_ends(keys: np.ndarray, values: np.ndarray) -> np.ndarray:
        """Keeps no row: collects each chunk's distinct VM ends (a million sessions
        are a few hundred addresses, never a copy of the table)."""
        live = ~expired_mask(fw, values, now)
        flags = values["flags"]
        ends = np.concatenate([keys["addr_lo"][live & (flags & c["SESS_F_VM_LO"] != 0)],
                               keys["addr_hi"][live & (flags & c["SESS_F_VM_HI"] != 0)]])
        if len(ends):
            ends = unique_rows(ends)
            with lock:
                found.append(ends)
        return np.zeros(len(keys), bool)

    for name in SESSION_MAPS:
        fw.maps[name].scan(vm_ends)
    rules = read_rules(fw)
    found.append(rules["dst_addr"][rules["dst_prefixlen"] == host_prefixlen(fw.layout)])
    _, bans = fw.maps["blacklist"].dump()
    found.append(bans["vm"][bans["expires_ns"] > np.uint64(now)])
    addrs = np.concatenate([a.astype(found[-1].dtype) for a in found])
    if not len(addrs):
        return []
    addrs = unique_rows(addrs)
    keep = in_networks(addrs, list_protected(fw))
    if within:
        keep &= in_networks(addrs, within)
    return sorted(addrs_to_ips(addrs[keep]), key=_ip_order)


def _ip_order(ip: str) -> tuple[int, bytes]:
    raw = addr_array([ip]).tobytes()
    return (0 if ":" not in ip else 1, raw)


def read_mapping(path: Path, text: str) -> list[tuple[VmAddrs, str]]:
    """The mapping file's VMs and their peers (one line each; `#` starts a comment)."""
    out: list[tuple[VmAddrs, str]] = []
    seen: set[str] = set()
    for n, raw in enumerate(text.splitlines(), 1):
        if n > MAX_MAP_LINES:
            raise InvalidArgument(f"{path}: more than {MAX_MAP_LINES} lines")
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise InvalidArgument(f"{path}:{n}: want 'ADDR[,ADDR...] PEER', got {line[:80]!r}")
        try:
            vms = VmAddrs.parse(parts[0].split(","), what=f"{path}:{n}")
        except InvalidArgument as exc:
            raise InvalidArgument(f"{path}:{n}: {exc}") from exc
        again = seen.intersection(vms.ips)
        if again:
            raise InvalidArgument(f"{path}:{n}: {sorted(again)[0]} is named twice")
        seen.update(vms.ips)
        out.append((vms, parts[1]))
    return out


def plan(found: Iterable[str], peers: Sequence[Peer],
         mapping: Sequence[tuple[VmAddrs, Peer]] = ()) -> list[DrainItem]:
    """The drain's VMs with their destinations: the mapping's, then each remaining
    address to the least loaded of `peers` whose scope holds it (any, if none does)."""
    items = [DrainItem(vms, peer.name) for vms, peer in mapping]
    mapped = {ip for vms, _ in mapping for ip in vms.ips}
    load = {p.name: 0 for p in peers}
    for item in items:
        if item.peer in load:
            load[item.peer] += 1
    for ip in found:
        if ip in mapped:
            continue
        if not peers:
            raise InvalidArgument(f"{ip} is not in the mapping file: name a --peer for the rest")
        vms = VmAddrs.parse([ip])
        holding = [p for p in peers if p.covers_all(vms.addrs).all()] or list(peers)
        best = min(holding, key=lambda p: load[p.name])
        load[best.name] += 1
        items.append(DrainItem(vms, best.name))
    return items


# ---- running it ----------------------------------------------------------------------


def run_drain(
    items: list[DrainItem],
    parallel: int,
    migrate_one: Callable[[DrainItem], dict[str, Any]],
    on_change: Callable[[list[DrainItem]], None] | None = None,
    on_interrupt: Callable[[], None] | None = None,
) -> DrainReport:
    """Runs `migrate_one(item)` (returns the migration's report; raises on failure)
    for every item, `parallel` at once; `on_change(items)` after every start and
    end (a progress bar). Ctrl-C: `on_interrupt()` (aborts what runs), the VMs not
    started yet are not started, and KeyboardInterrupt goes on."""
    lock = threading.Lock()
    changed = on_change or (lambda _items: None)
    stop = threading.Event()

    def one(item: DrainItem) -> None:
        if stop.is_set():
            return
        t0 = time.perf_counter()
        with lock:
            item.outcome = "running"
            changed(items)
        try:
            item.report = migrate_one(item)
            outcome = "completed"
        except (SamiError, OSError) as exc:
            outcome = f"failed: {exc}"
        except Exception as exc:  # noqa: BLE001 - one VM's bug ends that VM only
            outcome = f"failed: internal error ({type(exc).__name__}: {exc})"
        item.seconds = time.perf_counter() - t0
        with lock:
            item.outcome = outcome
            changed(items)

    t0 = time.perf_counter()
    pool = ThreadPoolExecutor(max_workers=max(1, min(parallel, len(items) or 1)))
    try:
        for fut in [pool.submit(one, item) for item in items]:
            fut.result()
    except KeyboardInterrupt:
        stop.set()
        if on_interrupt is not None:
            on_interrupt()
        pool.shutdown(wait=True, cancel_futures=True)
        for item in items:
            if item.outcome in ("waiting", "running"):
                item.outcome = "failed: the drain was interrupted"
        raise
    pool.shutdown()
    return DrainReport(items, time.perf_counter() - t0, parallel)
