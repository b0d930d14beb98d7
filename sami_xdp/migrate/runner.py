"""Outgoing migrations run as threads of one long-lived process (the agent).

Many migrations of one host share what they can: one dirty-log group (one slot,
one round; dirty.py), one scan of the maps for every full copy that starts at
about the same time (the `select` given), one process (no start-up per VM), and
one cleanup thread that waits for every moved VM to go idle here with one scan
a second for all of them, instead of a helper process per VM.

Each migration keeps its record in the state dir as a `migrate` process does
(running.py), marked as run by the agent, so `migrate --final` / `--abort` from
a shell and a destination's cutover request find it; they reach it through
`finish`, `abort` and `cutover` here instead of a signal.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..loader.pinned import Firewall
from .dirty import TrackGroup, reap_stale
from .errors import MigrateError, MigrationRefused, StateDirError
from .export import require_protected
from .keys import HostIdentity
from .peers import Peer, TrustStore
from .phases import (
    MigrateOptions,
    Migration,
    MigrationReport,
    PeerPool,
    delete_vm_state,
)
from .running import (
    RECORDS_DIR,
    VIA_AGENT,
    clean_up_by_helper,
    cutover_note_path,
    find_record,
    leave_cutover_note,
    read_record,
    record_path,
    take_cutover_note,
    write_record,
)
from .select import VmState, vms_last_seen_ns
from .vmset import VmAddrs

CLEANUP_POLL_S = 1.0  # one scan a second serves every VM waiting to go idle here


@dataclass
class Cleanup:
    """A moved VM whose state here goes once it has been idle for `grace_s`."""

    vms: VmAddrs
    grace_s: float
    give_up: float  # time.monotonic() after which the state is kept


class MigrationRunner:
    """The host's outgoing migrations, by migration id."""

    def __init__(self, fw: Firewall, config_dir: Path, state_dir: Path,
                 select: Callable[[VmAddrs], VmState],
                 log: Callable[..., None] | None = None,
                 cleanup_bpffs: Path | None = None) -> None:
        """`cleanup_bpffs`: no agent will stay to clean up (a drain run by the CLI):
        a detached helper per moved VM does, as after a `migrate` process."""
        self.fw, self.config_dir, self.state_dir = fw, config_dir, state_dir
        self.cleanup_bpffs = cleanup_bpffs
        self.select = select
        self.log = log or (lambda _event, **_f: None)
        self.tracker = TrackGroup(fw)
        self.running: dict[str, Migration] = {}
        self.cleanups: list[Cleanup] = []
        self._pool: PeerPool | None = None
        self._lock = threading.Lock()

    # ---- one migration ---------------------------------------------------------------

    def run(self, peer: Peer, vms: VmAddrs, opts: MigrateOptions,
            progress: Callable[[str], None] | None = None,
            started: Callable[[Migration], None] | None = None) -> MigrationReport:
        """Runs one migration in the calling thread, its record kept up to date.
        `progress` gets one line per phase; `started(migration)` once it is
        registered (and may be stopped)."""
        identity = HostIdentity.load(self.config_dir)
        trust = TrustStore.load(self.config_dir)
        require_protected(self.fw, vms)
        mig = Migration(self.fw, identity, trust, peer, vms, opts, progress=progress,
                        tracker=self.tracker, select=self.select, pool=self._pool_for(identity))
        mid = mig.mid.hex()
        with self._lock:
            for other in self.running.values():
                if set(other.vms.ips) & set(vms.ips):
                    raise MigrateError(f"{vms.label} is already migrating to {other.peer.name}")
            _, doc = find_record(self.state_dir, vms)
            if doc and doc.get("status") == "running" and doc.get("via") != VIA_AGENT:
                raise MigrateError(f"{vms.label} is already migrating to {doc.get('peer')} "
                                   f"(a `migrate` process, pid {doc.get('pid')})")
            self.running[mid] = mig
        path = record_path(self.state_dir, vms)
        record: dict[str, Any] = {"pid": os.getpid(), "via": VIA_AGENT, "vm": vms.label,
                                  "vms": list(vms.ips), "peer": peer.name,
                                  "migration_id": mid, "status": "running",
                                  "started": time.time()}
        note = cutover_note_path(path)
        note.unlink(missing_ok=True)
        try:
            write_record(path, record)
            if started is not None:
                started(mig)
            self.log("migration-started", peer=peer.name, vm=vms.label, migration_id=mid)
            report = mig.run()
        except BaseException as exc:
            write_record(path, {**record, "status": "failed", "report": mig.report.as_dict()})
            self.log("migration-failed", peer=peer.name, vm=vms.label, migration_id=mid,
                     reason=str(exc))
            raise
        finally:
            with self._lock:
                self.running.pop(mid, None)
        if opts.until_cutover:
            report.cutover = take_cutover_note(path, "the operator (migrate --final)")
        if opts.keep_source:
            report.cleanup = "source state kept (--keep-source)"
        elif self.cleanup_bpffs is not None:
            report.cleanup = clean_up_by_helper(self.cleanup_bpffs, vms, opts, path)
        else:
            self.clean_later(vms, opts.source_grace_s, opts.max_wait_s)
            report.cleanup = (f"source cleanup: the agent removes the VM's state here once "
                              f"it has been idle for {opts.source_grace_s:g} s")
        write_record(path, {**record, "status": "completed", "report": report.as_dict()})
        self.log("migration-completed", peer=peer.name, vm=vms.label, migration_id=mid,
                 seconds=round(report.total_seconds, 3), bytes=report.total_bytes)
        return report

    def forget_stale(self) -> int:
        """Records of migrations an earlier agent ran and never finished (it was
        stopped or killed): marked failed, so no `--final` waits for them."""
        folder = self.state_dir / RECORDS_DIR
        n = 0
        for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            try:
                doc = read_record(path)
            except StateDirError:
                continue
            if (doc and doc.get("status") == "running" and doc.get("via") == VIA_AGENT
                    and doc.get("migration_id") not in self.running):
                write_record(path, {**doc, "status": "failed",
                                    "reason": "the agent that ran it stopped"})
                n += 1
        return n

    def _pool_for(self, identity: HostIdentity) -> PeerPool:
        """The shared connections, opened with this host's current key (a new key:
        new connections)."""
        with self._lock:
            if self._pool is None or self._pool.identity.host_id != identity.host_id or (
                    self._pool.identity.public_b64 != identity.public_b64):
                if self._pool is not None:
                    self._pool.close()
                self._pool = PeerPool(identity)
            return self._pool

    # ---- what others tell a running migration --------------------------------------

    def find(self, vms: VmAddrs, mid: str | None = None) -> Migration:
        """The running migration of the VM (all of `vms` among its addresses)."""
        with self._lock:
            for key, mig in self.running.items():
                if (mid is None or key == mid) and set(vms.ips) <= set(mig.vms.ips):
                    return mig
        raise MigrateError(f"no running migration of {vms.label} in the agent")

    def finish(self, vms: VmAddrs) -> str:
        mig = self.find(vms)
        mig.finish()
        return mig.mid.hex()

    def abort(self, vms: VmAddrs, why: str = "aborted by the operator") -> str:
        mig = self.find(vms)
        mig.stop(why)
        return mig.mid.hex()

    def stop_all(self, why: str, wait_s: float) -> int:
        """Aborts every running migration and waits up to `wait_s` for them to end
        (each asks its destination to drop what it got); how many did not end."""
        with self._lock:
            migs = list(self.running.values())
        for mig in migs:
            mig.stop(why)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            with self._lock:
                if not self.running:
                    return 0
            time.sleep(0.05)
        with self._lock:
            return len(self.running)

    def cutover(self, vms: VmAddrs, mid: str, peer: str, why: str) -> bool:
        """A destination's cutover request: only the migration `mid`, going to `peer`.
        False: no such migration runs here (a `migrate` process may run it)."""
        try:
            mig = self.find(vms, mid)
        except MigrateError:
            return False
        if mig.peer.name != peer:
            raise MigrationRefused(f"migration {mid[:12]} of {vms.label} goes to "
                                   f"{mig.peer.name}, not {peer}")
        leave_cutover_note(record_path(self.state_dir, mig.vms), why)
        mig.finish()
        return True

    def list_running(self) -> list[dict[str, Any]]:
        with self._lock:
            migs = list(self.running.values())
        return [{"migration_id": m.mid.hex(), "vms": list(m.vms.ips), "peer": m.peer.name,
                 "phases": [p.name for p in m.report.phases]} for m in migs]

    # ---- after the move -------------------------------------------------------------

    def clean_later(self, vms: VmAddrs, grace_s: float, max_wait_s: float) -> None:
        with self._lock:
            self.cleanups.append(Cleanup(vms, grace_s, time.monotonic() + max_wait_s))

    def tick(self) -> None:
        """Housekeeping (the agent's loop, once a second): the moved VMs that went
        idle lose their state here (one scan for all), and the tracking slots of
        killed `migrate` processes are taken back."""
        reap_stale(self.fw)
        with self._lock:
            waiting = list(self.cleanups)
        if not waiting:
            return
        last = vms_last_seen_ns(self.fw, [c.vms for c in waiting])
        now = time.monotonic_ns()
        done = []
        for c, seen in zip(waiting, last, strict=True):
            idle_s = (now - seen) / 1e9 if seen else c.grace_s
            if idle_s >= c.grace_s:
                removed = delete_vm_state(self.fw, c.vms)
                self.log("source-cleanup", vm=c.vms.label, idle_s=round(idle_s, 1),
                         removed=removed)
                done.append(c)
            elif time.monotonic() > c.give_up:
                self.log("source-cleanup-gave-up", vm=c.vms.label,
                         reason=f"still active after {c.grace_s:g} s grace and its max wait")
                done.append(c)
        with self._lock:
            self.cleanups = [c for c in self.cleanups if c not in done]
