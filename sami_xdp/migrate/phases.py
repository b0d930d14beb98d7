"""The source side of a migration, phase by phase (VM pre-copy style).

preflight -> full copy -> delta rounds -> final delta -> source cleanup.

The source keeps serving the VM throughout: nothing is deleted here until the
destination has acknowledged the final delta *and* the VM's traffic has left
this host for a grace period (cleanup runs in a detached helper process, so
`migrate` may return before the hypervisor cuts over). An abort at any phase
leaves the source untouched and asks the destination to drop what it
imported for this migration.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..loader.pinned import Firewall
from ..policy.acl import delete_vm_rules
from ..policy.sessions import SESSION_MAPS
from .bundle import new_migration_id, parse_bundle
from .control import bundle_digest, nonce_of, sign_control, verify_control
from .dirty import DirtyLog, TrackGroup
from .errors import ControlError, MigrateError, MigrationRefused, TrackSlotsFull, TransportError
from .export import Kind, build_bundle
from .fields import FieldError, want_bool, want_counts
from .keys import HostIdentity
from .peers import Peer, TrustStore
from .select import ExportState, VmState, export_vm_state, involves_any, vms_last_seen_ns
from .transport import (
    MSG_ABORT,
    MSG_ACK,
    MSG_BUNDLE,
    MSG_CUTOVER,
    MSG_ERROR,
    MSG_PREFLIGHT,
    MSG_PREFLIGHT_REPLY,
    MSG_PULL,
    Connection,
)
from .vmset import VmAddrs

WAIT_SLICE_S = 0.02  # a cutover set by a signal handler is seen this soon
RECONNECT_IDLE_S = 20.0  # agents close connections idle for longer (their --idle default: 60)
POOL_PER_PEER = 4  # a destination agent's default --max-pending-per-ip
POOL_CONNECT_TRIES = 3
POOL_RETRY_S = 0.2  # then 0.4


@dataclass
class PhaseReport:
    name: str
    seconds: float
    bytes: int = 0
    exported: dict[str, int] = field(default_factory=dict)
    imported: dict[str, int] = field(default_factory=dict)
    deleted: dict[str, int] = field(default_factory=dict)
    refused: str = ""


@dataclass
class MigrationReport:
    migration_id: str
    vms: list[str]  # the VM's addresses, canonical
    peer: str
    phases: list[PhaseReport] = field(default_factory=list)
    outcome: str = "running"
    cleanup: str = ""
    cutover: str = ""  # --until-cutover: who said the VM had moved

    @property
    def total_bytes(self) -> int:
        return sum(p.bytes for p in self.phases)

    @property
    def total_seconds(self) -> float:
        return sum(p.seconds for p in self.phases)

    @property
    def vm(self) -> str:
        """The VM's addresses on one line."""
        return ",".join(self.vms)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["vm"] = self.vm
        d["total_bytes"] = self.total_bytes
        d["total_seconds"] = round(self.total_seconds, 4)
        return d


@dataclass
class MigrateOptions:
    delta_rounds: int = 1
    interval_s: float = 0.5
    until_cutover: bool = False
    pickup_s: float = 10.0  # informational: the destination agent owns its pickup window
    source_grace_s: float = 30.0
    keep_source: bool = False
    compression: str = "none"
    max_wait_s: float = 3600.0  # longest a cleanup helper waits for the VM to leave
    plaintext: bool = False  # no TLS: only for an agent run with --plaintext (debugging)


def resolve_peer(trust: TrustStore, peer: str) -> Peer:
    """NAME from the peers file, or HOST:PORT of a peer listed there."""
    names = {p.name: p for p in trust.peers()}
    if peer in names:
        return names[peer]
    by_addr = [p for p in trust.peers() if p.address == peer]
    if by_addr:
        return by_addr[0]
    raise MigrateError(
        f"unknown peer {peer!r}: add it with `samixdp peers add NAME --address HOST:PORT "
        "--key PUBKEY` (its key is needed to verify its acknowledgements)"
    )


def _ack(
    conn: Connection,
    identity: HostIdentity,
    trust: TrustStore,
    peer: Peer,
    msg_type: int,
    payload: bytes,
) -> dict[str, Any]:
    """Sends one request; returns the peer's signed answer to *it* (a replayed or
    forged answer is refused). A signed refusal raises MigrationRefused."""
    expect = bundle_digest(payload) if msg_type == MSG_BUNDLE else nonce_of(payload)
    reply = conn.request(msg_type, payload)
    try:
        _, body = verify_control(
            bytes(reply.payload), trust, identity.host_id, expect_from=peer.name,
            in_reply_to=expect,
        )
        ok = want_bool(body, "ok")
    except (ControlError, FieldError) as exc:
        raise MigrationRefused(f"cannot trust {peer.name}'s answer: {exc}") from exc
    reason = str(body.get("reason", "refused"))[:1000]
    if reply.type == MSG_ERROR or reply.type not in (MSG_ACK, MSG_PREFLIGHT_REPLY):
        raise MigrationRefused(f"{peer.name} refused: {reason}")
    if not ok:
        body["reason"] = reason
    return body


class PeerPool:
    """Connections to peers shared by concurrent migrations (a drain): at most
    `per_peer` open to one peer, each carrying one request at a time, so a drain's
    parallelism is not bounded by the destination's caps (its agent admits 4
    unauthenticated connections per address and 32 in all by default). Opening
    one is tried again after a short wait: a cap full for a moment is no failure."""

    def __init__(self, identity: HostIdentity, per_peer: int = POOL_PER_PEER) -> None:
        self.identity, self.per_peer = identity, per_peer
        self._idle: dict[tuple[str, str, bool], list[Connection]] = defaultdict(list)
        self._open: dict[tuple[str, str, bool], int] = defaultdict(int)
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def lease(self, peer: Peer, plaintext: bool) -> Iterator[Connection]:
        key = (peer.name, peer.address, plaintext)
        conn: Connection | None = None
        with self._cond:
            while True:
                idle = self._idle[key]
                while idle and idle[-1].idle_s > RECONNECT_IDLE_S:
                    idle.pop().close()  # the peer's agent closes idle connections
                    self._open[key] -= 1
                if idle:
                    conn = idle.pop()
                    break
                if self._open[key] < self.per_peer:
                    self._open[key] += 1
                    break
                self._cond.wait()
        ok = False
        try:
            if conn is None:
                conn = self._open_one(peer, plaintext)
            yield conn
            ok = True
        finally:
            with self._cond:
                if ok and conn is not None:
                    self._idle[key].append(conn)
                else:  # a failed request may leave the stream anywhere: never reused
                    if conn is not None:
                        conn.close()
                    self._open[key] -= 1
                self._cond.notify()

    def _open_one(self, peer: Peer, plaintext: bool) -> Connection:
        for attempt in range(POOL_CONNECT_TRIES):
            try:
                return Connection(peer, self.identity, plaintext=plaintext)
            except TransportError:
                if attempt + 1 == POOL_CONNECT_TRIES:
                    raise
                time.sleep(POOL_RETRY_S * 2**attempt)
        raise AssertionError("unreachable")

    def close(self) -> None:
        with self._cond:
            for key, conns in self._idle.items():
                for c in conns:
                    c.close()
                self._open[key] -= len(conns)
            self._idle.clear()


class Migration:
    """One migration of one VM (all its addresses, one bundle a round) from this host
    to `peer`."""

    def __init__(
        self,
        fw: Firewall,
        identity: HostIdentity,
        trust: TrustStore,
        peer: Peer,
        vms: VmAddrs,
        opts: MigrateOptions,
        progress: Callable[[str], None] | None = None,
        tracker: TrackGroup | None = None,
        select: Callable[[VmAddrs], VmState] | None = None,
        pool: PeerPool | None = None,
    ) -> None:
        """`tracker`: the dirty-log group to join (the agent's, shared by its
        migrations; default a group of this one). `select`: reads the full copy
        (the agent's shared scan; default one scan for this VM). `pool`: shared
        connections to the peer (default one connection of its own)."""
        self.fw, self.identity, self.trust, self.peer = fw, identity, trust, peer
        self.vms, self.opts = vms, opts
        self.mid = new_migration_id()
        self.seq = 0
        self.state = ExportState()
        self.report = MigrationReport(self.mid.hex(), list(vms.ips), peer.name)
        self.progress = progress or (lambda _msg: None)
        self.conn: Connection | None = None
        self.cutover = False
        self.dirty: DirtyLog | None = None
        self.tracker = tracker
        self.pool = pool
        self.select = select or (lambda v: export_vm_state(fw, v))
        self.stopped = ""  # why the migration was told to stop (an abort), if it was
        self._wake = threading.Event()  # a cutover or an abort ends a wait at once

    # ---- what other threads tell a running migration --------------------------------

    def finish(self) -> None:
        """The final delta now (`--final`, the destination saw the VM arrive)."""
        self.cutover = True
        self._wake.set()

    def stop(self, why: str) -> None:
        """Abort at the next phase boundary (a round in flight finishes first)."""
        self.stopped = why
        self._wake.set()

    def _wait(self, seconds: float) -> None:
        """Sleeps between rounds; a cutover ends it early, an abort raises. In slices:
        a signal handler (the CLI's SIGUSR1) only sets `cutover`."""
        deadline = time.monotonic() + seconds
        while not (self.cutover or self.stopped) and time.monotonic() < deadline:
            self._wake.wait(min(WAIT_SLICE_S, max(0.0, deadline - time.monotonic())))
        self._check()

    def _check(self) -> None:
        if self.stopped:
            raise MigrationRefused(self.stopped)

    # ---- phases ------------------------------------------------------------------

    @contextlib.contextmanager
    def _connection(self) -> Iterator[Connection]:
        if self.pool is not None:
            with self.pool.lease(self.peer, self.opts.plaintext) as conn:
                yield conn
            return
        if self.conn is not None and self.conn.idle_s > RECONNECT_IDLE_S:
            self.conn.close()
            self.conn = None
        if self.conn is None:
            self.conn = Connection(self.peer, self.identity, plaintext=self.opts.plaintext)
        yield self.conn

    def preflight(self, sessions: int) -> None:
        """Asks the peer whether it takes the VM (`sessions` of them: the full copy's
        count, so the tables are read once for both)."""
        t0 = time.perf_counter()
        self.progress(f"preflight: contacting {self.peer.name} at {self.peer.address}")
        payload = sign_control(
            self.identity,
            {
                "type": "preflight",
                "to": self.peer.name,
                "vms": list(self.vms.ips),
                "migration_id": self.mid.hex(),
                "layout_version": self.fw.const("SAMIXDP_LAYOUT_VERSION"),
                "sessions": sessions,
                # the destination watches for the VM's arrival and asks for the final
                "cutover": self.opts.until_cutover,
            },
        )
        with self._connection() as conn:
            body = _ack(conn, self.identity, self.trust, self.peer, MSG_PREFLIGHT, payload)
        phase = PhaseReport("preflight", time.perf_counter() - t0)
        self.report.phases.append(phase)
        if not body.get("ok"):
            phase.refused = str(body.get("reason"))
            raise MigrationRefused(f"preflight refused by {self.peer.name}: {body.get('reason')}")

    def send_round(
        self, kind: Kind, selected: VmState | None = None, selected_s: float = 0.0
    ) -> PhaseReport:
        """One round; `selected`: the full copy's state read already (`selected_s`
        seconds, counted in this phase)."""
        self.seq += 1
        t0 = time.perf_counter() - selected_s
        data = build_bundle(
            self.fw,
            self.vms,
            self.peer.name,
            self.seq,
            self.mid,
            kind=kind,
            since_state=self.state,
            identity=self.identity,
            compression=self.opts.compression,
            dirty=self.dirty,
            selected=selected,
        )
        exported = parse_bundle(data).counts()
        with self._connection() as conn:
            body = _ack(conn, self.identity, self.trust, self.peer, MSG_BUNDLE, data)
        name = (
            "full copy"
            if kind == "full"
            else ("final delta" if kind == "final" else f"delta {self.seq - 1}")
        )
        phase = PhaseReport(name, time.perf_counter() - t0, bytes=len(data), exported=exported)
        self.report.phases.append(phase)
        if not body.get("ok"):
            phase.refused = str(body.get("reason"))
            raise MigrationRefused(f"{self.peer.name} refused round {self.seq}: {phase.refused}")
        try:
            phase.imported = want_counts(body, "counts")
            phase.deleted = want_counts(body, "deleted")
        except FieldError as exc:
            raise MigrationRefused(f"cannot read {self.peer.name}'s answer: {exc}") from exc
        self.progress(
            f"{name}: {sum(exported.values())} records, {len(data)} bytes, "
            f"{phase.seconds * 1000:.1f} ms"
        )
        return phase

    def run(self) -> MigrationReport:
        try:
            # the dirty log starts before the full copy is read: nothing falls between
            tracker = self.tracker or TrackGroup(self.fw)
            try:
                self.dirty = tracker.join(self.vms)
            except TrackSlotsFull as exc:  # deltas by scanning, as before the dirty log
                self.progress(f"no dirty log for this migration ({exc}): its delta rounds "
                              "read the tables instead (run migrations through the agent)")
            t0 = time.perf_counter()
            first = self.select(self.vms)
            selected_s = time.perf_counter() - t0
            self._check()
            self.preflight(len(first.sess_keys))
            self._check()
            self.send_round("full", first, selected_s)
            if self.opts.until_cutover:
                self.progress("syncing deltas until cutover (the destination sees the VM "
                              "arrive, or `migrate --final`)")
                while not self.cutover:
                    self._wait(self.opts.interval_s)
                    if not self.cutover:
                        self.send_round("delta")
            else:
                for _ in range(self.opts.delta_rounds):
                    self._wait(self.opts.interval_s)
                    self.send_round("delta")
            self._check()
            self.send_round("final")
        except (MigrateError, TransportError) as exc:
            self.report.outcome = f"failed: {exc}"
            self._try_abort()
            raise
        finally:
            if self.dirty is not None:
                self.dirty.stop()
                self.dirty = None
            if self.conn is not None:
                self.conn.close()
                self.conn = None
        self.report.outcome = "completed"
        return self.report

    def _try_abort(self) -> None:
        if self.seq == 0:
            return
        try:
            send_abort(self.identity, self.trust, self.peer, self.mid.hex(), self.opts.plaintext)
        except (MigrateError, TransportError):
            pass  # best effort: the destination's pickup window and expiry bound the damage


def send_abort(
    identity: HostIdentity, trust: TrustStore, peer: Peer, mid: str, plaintext: bool = False
) -> dict[str, Any]:
    payload = sign_control(identity, {"type": "abort", "to": peer.name, "migration_id": mid})
    with Connection(peer, identity, plaintext=plaintext) as conn:
        return _ack(conn, identity, trust, peer, MSG_ABORT, payload)


def send_cutover(
    identity: HostIdentity, trust: TrustStore, peer: Peer, mid: str, vms: VmAddrs,
    seen: dict[str, Any], plaintext: bool = False,
) -> dict[str, Any]:
    """The destination's word to the source's agent: the VM arrived here, finish."""
    payload = sign_control(identity, {"type": "cutover", "to": peer.name, "migration_id": mid,
                                      "vms": list(vms.ips), "seen": seen})
    with Connection(peer, identity, plaintext=plaintext) as conn:
        return _ack(conn, identity, trust, peer, MSG_CUTOVER, payload)


def send_pull(identity: HostIdentity, trust: TrustStore, peer: Peer, vms: VmAddrs,
              plaintext: bool = False) -> dict[str, Any]:
    """Asks `peer` to start migrating the VM here (--until-cutover): the VM's
    hypervisor is moving it to this host."""
    payload = sign_control(identity, {"type": "pull", "to": peer.name, "vms": list(vms.ips)})
    with Connection(peer, identity, plaintext=plaintext) as conn:
        return _ack(conn, identity, trust, peer, MSG_PULL, payload)


# ---- the source's cleanup ------------------------------------------------------------


def vm_last_seen_ns(fw: Firewall, vms: VmAddrs) -> int:
    return vms_last_seen_ns(fw, [vms])[0]


def delete_vm_state(fw: Firewall, vms: VmAddrs) -> dict[str, int]:
    """Removes the VM's sessions, SYN counters, the bans it triggered, its rules and
    its pickup windows (of every one of its addresses)."""
    removed: dict[str, int] = {}
    for name in SESSION_MAPS:
        mine = fw.maps[name].scan(involves_any(vms.addrs)).keys
        removed[name] = fw.maps[name].delete_many(mine) if len(mine) else 0
    keys, _ = fw.maps["syn_counters"].dump()
    mine = keys[vms.contains(keys["dst"])]
    removed["syn_counters"] = fw.maps["syn_counters"].delete_many(mine) if len(mine) else 0
    keys, values = fw.maps["blacklist"].dump()
    mine = keys[vms.contains(values["vm"])]
    removed["blacklist"] = fw.maps["blacklist"].delete_many(mine) if len(mine) else 0
    removed["acl_rules"] = sum(delete_vm_rules(fw, ip) for ip in vms.ips)
    pickup = fw.maps["pickup"]
    for i in range(len(vms)):
        key = np.zeros(1, dtype=pickup.key_dtype)
        key[0] = vms.addrs[i]
        pickup.delete(key)
    return removed


def wait_and_cleanup(
    fw: Firewall,
    vms: VmAddrs,
    grace_s: float,
    max_wait_s: float,
    progress: Callable[[str], None] | None = None,
) -> dict[str, int] | None:
    """Deletes the VM's state once no packet of any of its addresses was seen for
    `grace_s`.

    Returns None (and deletes nothing) if that did not happen within max_wait_s."""
    say = progress or (lambda _m: None)
    grace_ns = int(grace_s * 1e9)
    give_up = time.monotonic() + max_wait_s
    while time.monotonic() < give_up:
        last = vm_last_seen_ns(fw, vms)
        idle = time.monotonic_ns() - last if last else grace_ns
        if idle >= grace_ns:
            removed = delete_vm_state(fw, vms)
            say(f"source cleanup: VM {vms.label} idle {idle / 1e9:.1f} s here, removed {removed}")
            return removed
        time.sleep(min(1.0, (grace_ns - idle) / 1e9 + 0.05))
    say(f"source cleanup: VM {vms.label} still active here after {max_wait_s:.0f} s; state kept")
    return None


def spawn_cleanup(
    bpffs: Path, vms: VmAddrs, grace_s: float, max_wait_s: float, log: Path
) -> int:
    """Detached helper process, so `migrate` can return before the cutover."""
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "sami_xdp",
        "--bpffs",
        str(bpffs),
        "migrate-cleanup",
        *[arg for ip in vms.ips for arg in ("--vm", ip)],
        "--grace",
        str(grace_s),
        "--max-wait",
        str(max_wait_s),
    ]
    with open(log, "ab") as fh:
        proc = subprocess.Popen(
            cmd,
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    return proc.pid
