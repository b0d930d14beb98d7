"""`samixdp agent`: receives migration bundles from trusted peers.

A connection is admitted only under the caps (connections in all, and not yet
authenticated ones per source address), and must authenticate before anything
larger than a frame header is read: a mutual TLS handshake bound to the host
keys (tlsid.py), or in `--plaintext` mode a small signed hello. Every frame then
has an overall deadline, its size is accepted before its payload is read, and a
bundle's body is read only after its header fits this host's maps and the
announced length, and every one of the VM's addresses (the table after the
header) lies in the sender's scope. Bundles are verified outside the import lock
(a few at a time, `max_bundles`), imports are serialised. Every request gets an
answer signed by this host: the counts imported, or a refusal naming the reason
(the field, for a bad control message); a bug in a handler becomes a logged
"internal error" refusal, never a dead thread.

At start the agent recovers what a crash of an earlier agent or CLI import left
behind (recovery.py).

Cutover (cutover.py): for a migration whose source asked for it in the
preflight (`migrate --until-cutover`), the agent arms the VM's arrival watch
once the full copy is loaded, and a watcher thread asks the source's agent for
the final delta when the datapath saw the VM here. As a source, the agent
passes a destination's `cutover` request to the running migration of that VM,
if that migration goes to the asking peer.

Outgoing migrations (runner.py): the agent also runs this host's migrations,
each a thread, handed to it on the local socket by `samixdp migrate` and
`samixdp drain` (localserver.py) or started by a destination's pull. They share
one dirty-log group and one map scan per batch of full copies (sharedscan.py),
and a housekeeping thread cleans up after every moved VM with one scan a second.
"""

from __future__ import annotations

import json
import os
import socket
import socketserver
import ssl
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..base.errors import SamiError
from ..base.netutil import in_networks
from ..loader.pinned import Firewall
from ..policy.protect import list_protected
from ..policy.sessions import SESSION_MAPS
from . import cutover
from .agentstats import AgentCounters, claimed_kind
from .bundle import HEADER_SIZE, bundle_size, parse_header, parse_vms, vms_size
from .control import bundle_digest, nonce_of, sign_control, verify_control
from .errors import BundleRefused, MigrateError, TransportError
from .export import require_protected
from .fields import FieldError, want_int, want_mid, want_str, want_vms
from .importer import DEFAULT_PICKUP_S, abort_import, import_vm_state
from .keys import HostIdentity
from .localserver import LocalServer
from .peers import Peer, TrustStore, scope_text
from .phases import MigrateOptions, send_cutover, vm_last_seen_ns
from .plan import record_limits
from .recovery import recover
from .replay import ReplayCache
from .runner import MigrationRunner
from .running import find_record, request_cutover
from .sharedscan import SharedScan
from .tlsid import peer_key, server_context
from .transport import (
    CONTROL_MAX_MESSAGE,
    DEFAULT_MAX_MESSAGE,
    DEFAULT_TIMEOUT_S,
    HELLO_MAX_MESSAGE,
    MSG_ABORT,
    MSG_ACK,
    MSG_BUNDLE,
    MSG_CUTOVER,
    MSG_ERROR,
    MSG_HELLO,
    MSG_PREFLIGHT,
    MSG_PREFLIGHT_REPLY,
    MSG_PULL,
    Deadline,
    parse_address,
    recv_frame,
    recv_header,
    recv_into,
    send_frame,
)
from .verify import check_scope, verify_bundle
from .vmset import VmAddrs

WATCH_POLL_S = 0.02  # how often armed arrival watches are read (a few lookups)
CUTOVER_RETRY_S = 1.0  # between attempts to reach a source that did not answer
HOUSEKEEPING_S = 1.0  # moved VMs' cleanup, killed migrations' tracking slots
STOP_WAIT_S = 10.0  # for running migrations to abort when the agent stops


@dataclass
class AgentConfig:
    bpffs: Path
    config_dir: Path
    state_dir: Path
    listen: str
    pickup_s: float = DEFAULT_PICKUP_S
    max_message: int = DEFAULT_MAX_MESSAGE
    timeout_s: float = DEFAULT_TIMEOUT_S  # one frame (header and payload), whole
    idle_s: float = 60.0  # between two frames of a connection
    handshake_s: float = 10.0  # TLS handshake (or plaintext hello), whole
    max_conns: int = 32
    max_pending_per_ip: int = 4  # connections not authenticated yet, per address
    max_bundles: int = 2  # bundles read, verified or imported at once
    plaintext: bool = False


def _log(event: str, **fields: Any) -> None:
    line = {"ts": round(time.time(), 3), "event": event, **fields}
    print(json.dumps(line, default=str), flush=True)


class Admission:
    """Caps connections: in all, and per source address while not authenticated."""

    def __init__(self, max_conns: int, max_pending_per_ip: int) -> None:
        self.max_conns, self.max_pending = max_conns, max_pending_per_ip
        self._lock = threading.Lock()
        self.active = 0
        self._pending: dict[str, int] = {}

    def admit(self, ip: str) -> bool:
        with self._lock:
            if self.active >= self.max_conns or self._pending.get(ip, 0) >= self.max_pending:
                return False
            self.active += 1
            self._pending[ip] = self._pending.get(ip, 0) + 1
            return True

    def authenticated(self, ip: str) -> None:
        with self._lock:
            left = self._pending.get(ip, 0) - 1
            if left > 0:
                self._pending[ip] = left
            else:
                self._pending.pop(ip, None)

    def leave(self) -> None:
        with self._lock:
            self.active -= 1


@dataclass
class Watch:
    """An incoming migration whose source waits for the VM's arrival here."""

    mid: str
    peer: str
    vms: VmAddrs
    armed: bool = False
    asking: bool = False  # a cutover request is on its way to the source


class Refusal(Exception):  # noqa: N818 - control flow inside the agent, never escapes it
    """Answer with a signed refusal; `close` when the stream cannot go on (an
    unread payload) or the peer misbehaved."""

    def __init__(self, reason: str, close: bool = False, field: str | None = None,
                 kind: str = "refused") -> None:
        super().__init__(reason)
        self.close, self.field, self.kind = close, field, kind


class Agent:
    """State shared by the connection threads."""

    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.identity = HostIdentity.load(cfg.config_dir)
        self.fw = Firewall.open(cfg.bpffs)
        self.import_lock = threading.Lock()
        self.bundle_slots = threading.BoundedSemaphore(cfg.max_bundles)
        self.admission = Admission(cfg.max_conns, cfg.max_pending_per_ip)
        self.counters = AgentCounters()  # read by the metrics endpoint (ops/metrics.py)
        self.trust()  # a bad peers file stops the agent now, not at its first peer
        self.limits = record_limits(self.fw)
        self.max_bundle = min(cfg.max_message, self.limits.max_bundle_bytes())
        self._tls_ctx: tuple[tuple[bytes, ...], ssl.SSLContext] | None = None
        self._tls_lock = threading.Lock()
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        done = recover(self.fw, cfg.state_dir, wait=True)
        if done:
            _log("recovered", what=done.describe())
        self.watches: dict[str, Watch] = {}
        self.watch_lock = threading.Lock()
        if cutover.clear(self.fw):  # armed by an earlier agent: nobody waits on them now
            _log("cutover-watches-cleared")
        # outgoing migrations (`samixdp migrate` and `drain` through the local socket,
        # pulls): threads sharing one dirty-log group and one scan per batch
        self.scan = SharedScan(self.fw)
        self.runner = MigrationRunner(self.fw, cfg.config_dir, cfg.state_dir,
                                      select=self.scan.select, log=_log)
        if self.runner.forget_stale():
            _log("stale-migrations-failed", reason="the agent that ran them stopped")

    @property
    def me(self) -> str:
        return self.identity.host_id

    def trust(self) -> TrustStore:
        """Re-read on every connection and request: `peers ...` takes effect at once."""
        return TrustStore.load(self.cfg.config_dir)

    def tls_context(self, trust: TrustStore) -> ssl.SSLContext:
        keys = tuple(sorted(p.public_raw for p in trust.peers()))
        with self._tls_lock:
            if self._tls_ctx is None or self._tls_ctx[0] != keys:
                self._tls_ctx = (keys, server_context(self.identity, keys))
            return self._tls_ctx[1]

    # ---- one connection -------------------------------------------------------------

    def serve_connection(self, sock: socket.socket, addr: str) -> None:
        ip = addr.rsplit(":", 1)[0]
        authenticated = False
        peer: Peer | None = None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # replies go out at once
        try:
            try:
                sock, peer = self.authenticate(sock, addr)
            finally:
                self.admission.authenticated(ip)
                authenticated = True
            self.counters.authenticated(peer.name)
            _log("connected", peer=peer.name, address=addr)
            self.frames(sock, peer, addr)
        except (TransportError, OSError, ssl.SSLError, SamiError) as exc:
            reason = str(exc) if isinstance(exc, SamiError) else f"{type(exc).__name__}: {exc}"
            if "closed the connection" not in reason:
                _log("connection-closed", address=addr, reason=reason)
        finally:
            if not authenticated:
                self.admission.authenticated(ip)
            if peer is None:
                self.counters.connection("unauthenticated")
            self.admission.leave()
            try:
                sock.close()
            except OSError:
                pass

    def authenticate(self, sock: socket.socket, addr: str) -> tuple[socket.socket, Peer]:
        """The peer behind the connection, before anything but the handshake (or the
        small hello) is read; then a signed welcome tells the peer it was accepted."""
        deadline = Deadline(self.cfg.handshake_s)
        trust = self.trust()
        reply_to = None
        if self.cfg.plaintext:
            peer, reply_to = self._hello(sock, trust, deadline)
        else:
            sock, peer = self._tls(sock, trust, deadline)
        welcome = sign_control(self.identity, {"type": "welcome", "to": peer.name}, reply_to)
        send_frame(sock, MSG_HELLO, welcome, deadline)
        return sock, peer

    def _tls(
        self, sock: socket.socket, trust: TrustStore, deadline: Deadline
    ) -> tuple[ssl.SSLSocket, Peer]:
        tls = self.tls_context(trust).wrap_socket(
            sock, server_side=True, do_handshake_on_connect=False
        )
        tls.settimeout(deadline.remaining("the TLS handshake"))
        try:
            tls.do_handshake()
        except TimeoutError as exc:
            raise TransportError("TLS handshake timed out") from exc
        except ssl.SSLError as exc:
            raise TransportError(f"TLS handshake refused: {exc.reason or exc}") from exc
        peer = trust.by_public_key(peer_key(tls))
        if peer is None:  # the anchors let only these keys through; belt and braces
            raise TransportError("TLS peer key is not in the peers file")
        return tls, peer

    def _hello(
        self, sock: socket.socket, trust: TrustStore, deadline: Deadline
    ) -> tuple[Peer, str | None]:
        frame = recv_frame(sock, HELLO_MAX_MESSAGE, deadline)
        if frame.type != MSG_HELLO:
            raise TransportError("plaintext mode: the first message must be a signed hello")
        data = bytes(frame.payload)
        with ReplayCache(self.cfg.state_dir) as replay:
            peer, body = verify_control(data, trust, self.me, replay=replay)
        if body.get("type") != "hello":
            raise TransportError("plaintext mode: the first message must be a signed hello")
        return peer, nonce_of(data)

    def frames(self, sock: socket.socket, peer: Peer, addr: str) -> None:
        while True:
            first = bytearray(1)
            recv_into(sock, memoryview(first), Deadline(self.cfg.idle_s), "a message")
            deadline = Deadline(self.cfg.timeout_s)  # the whole frame, from its first byte
            try:
                msg_type, length = recv_header(sock, deadline, first=bytes(first))
                reply = self.request(sock, peer, msg_type, length, deadline)
            except Refusal as exc:
                reply = (MSG_ERROR, self.refusal(peer, str(exc), exc.field, exc.kind), exc.close)
                self.counters.refusal(exc.kind)
                _log("refused", peer=peer.name, reason=str(exc))
            except (TransportError, OSError):
                raise
            except Exception as exc:  # noqa: BLE001 - the connection's edge: a bug answers too
                _log("internal-error", peer=peer.name, error=f"{type(exc).__name__}: {exc}")
                self.counters.refusal("internal-error")
                reply = (MSG_ERROR, self.refusal(peer, f"internal error ({type(exc).__name__})"),
                         True)
            msg, payload, close = reply
            send_frame(sock, msg, payload, Deadline(self.cfg.timeout_s))
            if close:
                return

    def refusal(self, peer: Peer, reason: str, field: str | None = None,
                kind: str = "refused", reply_to: str | None = None) -> bytes:
        body: dict[str, Any] = {"type": "refusal", "to": peer.name, "ok": False,
                                "reason": reason[:1000], "error": kind}
        if field is not None:
            body["field"] = field
        return sign_control(self.identity, body, reply_to)

    # ---- requests ---------------------------------------------------------------------

    def request(self, sock: socket.socket, peer: Peer, msg_type: int, length: int,
                deadline: Deadline) -> tuple[int, bytes, bool]:
        if msg_type == MSG_BUNDLE:
            return self.bundle_frame(sock, peer, length, deadline)
        if msg_type not in (MSG_PREFLIGHT, MSG_ABORT, MSG_CUTOVER, MSG_PULL):
            raise Refusal(f"unexpected message type {msg_type}", close=True)
        if length > CONTROL_MAX_MESSAGE:
            raise Refusal(f"control message of {length} bytes exceeds the limit of "
                          f"{CONTROL_MAX_MESSAGE}", close=True)
        data = bytearray(length)
        recv_into(sock, memoryview(data), deadline, "the rest of the message")
        raw = bytes(data)
        try:
            with ReplayCache(self.cfg.state_dir) as replay:
                sender, body = verify_control(raw, self.trust(), self.me, expect_from=peer.name,
                                              replay=replay)
            if msg_type == MSG_PREFLIGHT:
                return MSG_PREFLIGHT_REPLY, self.preflight(sender, body, nonce_of(raw)), False
            if msg_type == MSG_CUTOVER:
                return MSG_ACK, self.cutover(sender, body, nonce_of(raw)), False
            if msg_type == MSG_PULL:
                return MSG_ACK, self.pull(sender, body, nonce_of(raw)), False
            return MSG_ACK, self.abort(sender, body, nonce_of(raw)), False
        except FieldError as exc:
            self.counters.refusal("bad-field")
            return MSG_ERROR, self.refusal(peer, str(exc), exc.field, "bad-field",
                                           nonce_of(raw)), False
        except SamiError as exc:
            self.counters.refusal(getattr(exc, "reason", type(exc).__name__))
            _log("refused", peer=peer.name, reason=str(exc))
            return MSG_ERROR, self.refusal(peer, str(exc), None, type(exc).__name__,
                                           nonce_of(raw)), False

    def preflight(self, peer: Peer, body: dict[str, Any], nonce: str | None) -> bytes:
        if body.get("type") != "preflight":
            raise FieldError("type", "a preflight frame must hold a preflight message")
        vms = want_vms(body, "vms")
        mid = want_mid(body)
        want_layout = want_int(body, "layout_version")
        need = want_int(body, "sessions")
        watch = body.get("cutover", False)
        if not isinstance(watch, bool):
            raise FieldError("cutover", "must be true or false")
        reasons = []
        in_scope, protected = peer.covers_all(vms.addrs), in_networks(
            vms.addrs, list_protected(self.fw))
        for ip, ok_scope, ok_here in zip(vms.ips, in_scope, protected, strict=True):
            if not ok_scope:
                reasons.append(f"{ip} is outside the scope of {peer.name} here "
                               f"(vms: {scope_text(peer.vms)})")
            if not ok_here:
                reasons.append(f"{ip} is not in a protected prefix of {self.me}")
        layout = self.fw.const("SAMIXDP_LAYOUT_VERSION")
        if want_layout != layout:
            reasons.append(f"layout version {want_layout} differs from {self.me}'s {layout}")
        # the kernel's element counts: O(1), however full the tables are
        free = {name: self.fw.maps[name].info.max_entries - self.fw.maps[name].count()
                for name in SESSION_MAPS}
        if need > free["sessions"] + free["unassured"]:
            reasons.append(f"{self.me} has room for {free['sessions']} sessions, {need} needed")
        ok = not reasons
        if ok and watch:
            with self.watch_lock:
                self.watches[mid.hex()] = Watch(mid.hex(), peer.name, vms)
        self.counters.preflight(ok)
        _log("preflight", peer=peer.name, vm=vms.label, ok=ok, reasons=reasons)
        return sign_control(
            self.identity,
            {
                "type": "preflight-reply",
                "to": peer.name,
                "ok": ok,
                "reason": "; ".join(reasons),
                "layout_version": layout,
                "free": free,
                "migration_id": mid.hex(),
            },
            nonce,
        )

    def abort(self, peer: Peer, body: dict[str, Any], nonce: str | None) -> bytes:
        if body.get("type") != "abort":
            raise FieldError("type", "an abort frame must hold an abort message")
        mid = want_mid(body)
        with self.import_lock:
            removed = abort_import(self.fw, mid, self.cfg.state_dir, source=peer.name)
        self.end_watch(mid.hex(), peer.name, "aborted")
        self.counters.abort()
        _log("aborted", peer=peer.name, migration_id=mid.hex(), removed=removed)
        return sign_control(
            self.identity,
            {"type": "abort-ack", "to": peer.name, "ok": True, "migration_id": mid.hex(),
             "removed": removed},
            nonce,
        )

    def bundle_frame(self, sock: socket.socket, peer: Peer, length: int,
                     deadline: Deadline) -> tuple[int, bytes, bool]:
        """Reads a bundle only once its sender, size and header are acceptable."""
        if not peer.vms:
            raise Refusal(f"peer {peer.name} may send state for no VM here (vms: none)",
                          close=True, kind="out-of-scope")
        if length > self.max_bundle:
            raise Refusal(f"message of {length} bytes exceeds the limit of {self.max_bundle}",
                          close=True, kind="too-large")
        if not self.bundle_slots.acquire(timeout=deadline.remaining("a free bundle slot")):
            raise Refusal("too many bundles in progress; retry", close=True, kind="busy")
        try:
            data = bytearray(length)
            view = memoryview(data)
            head = min(length, HEADER_SIZE)
            recv_into(sock, view[:head], deadline, "the bundle header")
            try:  # unauthenticated yet, but it comes from an authenticated peer
                h = parse_header(view[:head])
                if bundle_size(h) != length:
                    raise BundleRefused(f"bundle announces {bundle_size(h)} bytes in a "
                                        f"message of {length}")
                self.limits.check(h)
                table = head + vms_size(h)  # within `length`: bundle_size counts it
                recv_into(sock, view[head:table], deadline, "the bundle's VM addresses")
                check_scope(peer, parse_vms(h, view[head:table]))
            except BundleRefused as exc:
                raise Refusal(str(exc), close=True, kind=exc.reason) from exc
            recv_into(sock, view[table:], deadline, "the bundle")
            return MSG_ACK, self.bundle(data, peer), False
        finally:
            self.bundle_slots.release()

    def bundle(self, data: bytearray, peer: Peer) -> bytes:
        digest = bundle_digest(data)
        t0 = time.perf_counter()
        try:
            with ReplayCache(self.cfg.state_dir) as replay:  # sqlite: one per thread
                vb = verify_bundle(data, self.trust(), self.me, replay, limits=self.limits)
                if vb.peer.name != peer.name:
                    raise BundleRefused(f"bundle signed by {vb.peer.name} arrived on "
                                        f"{peer.name}'s connection")
                t1 = time.perf_counter()
                with self.import_lock:
                    res = import_vm_state(self.fw, vb, self.cfg.state_dir, replay=replay,
                                          pickup_s=self.cfg.pickup_s)
        except SamiError as exc:
            _log("refused", peer=peer.name, bytes=len(data), reason=str(exc))
            kind = getattr(exc, "reason", type(exc).__name__)
            self.counters.refusal(kind)
            self.counters.bundle(claimed_kind(data), "refused", len(data))
            return sign_control(
                self.identity,
                {"type": "ack", "to": peer.name, "ok": False, "reason": str(exc)[:1000],
                 "error": type(exc).__name__, "refusal": kind},
                digest,
            )
        self.after_import(res.migration_id, res.kind, peer.name)
        res.timings = {"verify_s": t1 - t0, **res.timings,
                       "receive_total_s": time.perf_counter() - t0}
        self.counters.bundle(res.kind, "imported", len(data), res.timings)
        _log("imported", source=res.source, vm=res.vm, seq=res.seq, kind=res.kind,
             counts=res.counts, deleted=res.deleted, bytes=len(data),
             seconds=round(time.perf_counter() - t0, 4))
        body = {
            "type": "ack",
            "to": res.source,
            "ok": True,
            "migration_id": res.migration_id,
            "seq": res.seq,
            "kind": res.kind,
            "counts": res.counts,
            "deleted": res.deleted,
            "skipped": res.skipped,
            "warnings": res.warnings,
            "timings": {k: round(v, 6) for k, v in res.timings.items()},
            "pickup_until_ns": res.pickup_until_ns,
        }
        return sign_control(self.identity, body, digest)


    # ---- cutover ------------------------------------------------------------------------

    def after_import(self, mid: str, kind: str, peer: str) -> None:
        """Arms the watch once the VM's full copy is here; a final round ends it.
        `kind`: the bundle's ("full", "delta", "delta+final"...)."""
        if kind.endswith("final"):
            self.end_watch(mid, peer, "final")
            return
        with self.watch_lock:
            w = self.watches.get(mid)
            if w is None or w.peer != peer or w.armed:
                return
            cutover.arm(self.fw, w.vms, self.cfg.pickup_s)
            w.armed = True
        _log("cutover-armed", peer=peer, vm=w.vms.label, migration_id=mid)

    def end_watch(self, mid: str, peer: str, why: str) -> None:
        with self.watch_lock:
            w = self.watches.get(mid)
            if w is None or w.peer != peer:
                return
            del self.watches[mid]
            if w.armed:
                seen = cutover.disarm(self.fw, w.vms)
                if why != "final":  # a window the datapath opened for a migration now gone
                    for a in seen:
                        self.fw.maps["pickup"].delete(cutover.key_of(self.fw, a.vm))

    def housekeeping(self, stop: threading.Event) -> None:
        """Once a second: moved VMs' cleanup, killed migrations' tracking slots."""
        while not stop.wait(HOUSEKEEPING_S):
            try:
                self.runner.tick()
            except Exception as exc:  # noqa: BLE001 - logged; the next tick tries again
                _log("housekeeping-failed", reason=f"{type(exc).__name__}: {exc}")

    def watch_arrivals(self, stop: threading.Event) -> None:
        """Polls the armed watches; the first sighting of a VM sends for its final."""
        while not stop.wait(WATCH_POLL_S):
            with self.watch_lock:
                armed = [w for w in self.watches.values() if w.armed and not w.asking]
            for w in armed:
                seen = cutover.arrivals(self.fw, w.vms)
                if seen:
                    w.asking = True
                    threading.Thread(target=self.ask_final, args=(w, seen[0], stop),
                                     daemon=True).start()

    def ask_final(self, w: Watch, seen: cutover.Arrival, stop: threading.Event) -> None:
        why = f"{self.me} saw {seen.vm} arrive ({seen.how} on ifindex {seen.ifindex})"
        _log("cutover-seen", peer=w.peer, vm=w.vms.label, migration_id=w.mid, how=seen.how,
             ifindex=seen.ifindex)
        while not stop.is_set():
            with self.watch_lock:
                if w.mid not in self.watches:
                    return  # the final came (or an abort) by another way
            try:
                peer = self.trust().get(w.peer)
                send_cutover(self.identity, self.trust(), peer, w.mid, w.vms,
                             {"how": seen.how, "ifindex": seen.ifindex, "text": why},
                             plaintext=self.cfg.plaintext)
                _log("cutover-requested", peer=w.peer, vm=w.vms.label, migration_id=w.mid)
                return
            except (SamiError, OSError) as exc:
                _log("cutover-request-failed", peer=w.peer, migration_id=w.mid, reason=str(exc))
            stop.wait(CUTOVER_RETRY_S)

    def cutover(self, peer: Peer, body: dict[str, Any], nonce: str | None) -> bytes:
        """As the source: a destination saw the VM arrive; our `migrate` finishes."""
        if body.get("type") != "cutover":
            raise FieldError("type", "a cutover frame must hold a cutover message")
        mid = want_mid(body)
        vms = want_vms(body, "vms")
        seen = body.get("seen")
        text = want_str(seen, "text") if isinstance(seen, dict) else "the destination"
        if not self.runner.cutover(vms, mid.hex(), peer.name, text):  # not ours: a process's
            request_cutover(self.cfg.state_dir, vms, mid.hex(), peer.name, text)
        _log("cutover", peer=peer.name, vm=vms.label, migration_id=mid.hex(), why=text)
        return sign_control(
            self.identity,
            {"type": "cutover-ack", "to": peer.name, "ok": True, "migration_id": mid.hex()},
            nonce,
        )


    def pull(self, peer: Peer, body: dict[str, Any], nonce: str | None) -> bytes:
        """As the source: `peer` says the VM is moving to it; if the VM is here (in
        that peer's scope, protected, with state), start migrating it there."""
        if body.get("type") != "pull":
            raise FieldError("type", "a pull frame must hold a pull message")
        vms = want_vms(body, "vms")
        if not peer.covers_all(vms.addrs).all():
            raise MigrateError(f"{vms.label} is outside the scope of {peer.name} here "
                               f"(vms: {scope_text(peer.vms)})")
        require_protected(self.fw, vms)
        if not vm_last_seen_ns(self.fw, vms):
            raise MigrateError(f"{self.me} holds no state of {vms.label}")
        _, doc = find_record(self.cfg.state_dir, vms)
        if doc and doc.get("status") == "running":
            raise MigrateError(f"{vms.label} is already migrating to {doc.get('peer')}")
        opts = MigrateOptions(until_cutover=True, keep_source=True, plaintext=self.cfg.plaintext)
        threading.Thread(target=self.pulled, args=(peer, vms, opts), daemon=True).start()
        _log("pulled", peer=peer.name, vm=vms.label)
        return sign_control(self.identity, {"type": "pull-ack", "to": peer.name, "ok": True,
                                            "vms": list(vms.ips), "pid": os.getpid()}, nonce)

    def pulled(self, peer: Peer, vms: VmAddrs, opts: MigrateOptions) -> None:
        """A pulled migration (its source state goes when the hypervisor releases the VM
        here, not after an idle time, since a peer asked for it): a thread of its own."""
        try:
            self.runner.run(peer, vms, opts)
        except (SamiError, OSError):
            pass  # logged by the runner; the record says failed


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], agent: Agent,
                 on_tick: Callable[[], None] | None = None) -> None:
        self.agent = agent
        self.on_tick = on_tick
        super().__init__(address, socketserver.BaseRequestHandler)

    def service_actions(self) -> None:
        """Runs in the accept loop between polls: a watchdog petted here stops when
        the loop hangs."""
        if self.on_tick is not None:
            self.on_tick()

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.agent.admission.admit(str(client_address[0])):
            self.agent.counters.connection("refused")
            _log("connection-refused", address=f"{client_address[0]}:{client_address[1]}",
                 reason="too many connections")
            self.shutdown_request(request)
            return
        self.agent.counters.connection("accepted")
        super().process_request(request, client_address)

    def finish_request(self, request: Any, client_address: Any) -> None:
        self.agent.serve_connection(request, f"{client_address[0]}:{client_address[1]}")


def serve(cfg: AgentConfig, ready: threading.Event | None = None,
          on_ready: Callable[[str], None] | None = None,
          on_tick: Callable[[], None] | None = None,
          on_start: Callable[[Agent], None] | None = None) -> None:
    """Runs until interrupted (SIGINT or SIGTERM). `on_start(agent)` once it listens
    (the metrics endpoint reads its counters), then `on_ready(address)`; `on_tick()`
    from the accept loop, a few times a second."""
    agent = Agent(cfg)
    host, port = parse_address(cfg.listen)
    try:
        server = _Server((host, port), agent, on_tick)
    except OSError as exc:
        raise MigrateError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    _log(
        "listening",
        address=f"{host}:{server.server_address[1]}",
        host_id=agent.me,
        tls=not cfg.plaintext,
        max_bundle=agent.max_bundle,
    )
    stop = threading.Event()
    try:
        local = LocalServer(agent.runner, cfg.config_dir, cfg.state_dir, _log,
                            stats=lambda: {"scan_passes": agent.scan.passes})
    except MigrateError:
        server.server_close()
        raise
    try:
        local.start()
        _log("local-socket", path=str(local.path))
        if on_start is not None:
            on_start(agent)
        if ready is not None:
            ready.set()
        if on_ready is not None:  # ready once everything listens
            on_ready(f"{host}:{server.server_address[1]}")
        threading.Thread(target=agent.watch_arrivals, args=(stop,), daemon=True).start()
        threading.Thread(target=agent.housekeeping, args=(stop,), daemon=True).start()
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        local.close()
        # running migrations end at their next phase boundary; each destination is
        # asked to drop what it got (bounded: a round in flight may take a while)
        left = agent.runner.stop_all("the agent stopped", STOP_WAIT_S)
        if left:
            _log("migrations-cut-off", count=left, reason="the agent stopped before they ended")
        server.server_close()
        agent.fw.close()
        print("agent stopped", file=sys.stderr)

