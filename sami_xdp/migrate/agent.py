"""`samixdp agent`: receives migration bundles from trusted peers.

One thread per connection (many migrations at once); imports themselves are
serialised (map writes and the undo records share one lock). Every request
gets an answer signed by this host: the counts imported, or the reason for a
refusal. Frames above the size limit are refused before being read, and an
idle or slow peer is dropped after the timeout.
"""

from __future__ import annotations

import json
import socket
import socketserver
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..base.errors import SamiError
from ..loader.pinned import Firewall
from ..policy.sessions import SESSION_MAPS
from .bundle import parse_bundle
from .control import sign_control, verify_control
from .errors import ControlError, MigrateError, TransportError
from .importer import abort_import, receive_bundle
from .keys import HostIdentity
from .peers import TrustStore
from .replay import ReplayCache
from .transport import (
    CONTROL_MAX_MESSAGE,
    DEFAULT_MAX_MESSAGE,
    DEFAULT_TIMEOUT_S,
    MSG_ABORT,
    MSG_ACK,
    MSG_BUNDLE,
    MSG_ERROR,
    MSG_PREFLIGHT,
    MSG_PREFLIGHT_REPLY,
    TlsConfig,
    parse_address,
    recv_frame,
    send_frame,
)


@dataclass
class AgentConfig:
    bpffs: Path
    config_dir: Path
    state_dir: Path
    listen: str
    pickup_s: float = 10.0
    max_message: int = DEFAULT_MAX_MESSAGE
    timeout_s: float = DEFAULT_TIMEOUT_S
    tls: TlsConfig = field(default_factory=TlsConfig)


def _count_only(keys: np.ndarray, _values: np.ndarray) -> np.ndarray:
    return np.zeros(len(keys), dtype=bool)


def _log(event: str, **fields: Any) -> None:
    line = {"ts": round(time.time(), 3), "event": event, **fields}
    print(json.dumps(line), flush=True)


class Agent:
    """State shared by the connection threads."""

    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.identity = HostIdentity.load(cfg.config_dir)
        self.fw = Firewall.open(cfg.bpffs)
        self.import_lock = threading.Lock()
        cfg.state_dir.mkdir(parents=True, exist_ok=True)

    def trust(self) -> TrustStore:
        """Re-read on every request: `peers add` takes effect without a restart."""
        return TrustStore.load(self.cfg.config_dir)

    # ---- requests ----------------------------------------------------------

    def preflight(self, data: bytes) -> tuple[int, bytes]:
        trust = self.trust()
        me = self.identity.host_id
        try:
            peer, body = verify_control(data, trust, me)
        except ControlError as exc:
            return MSG_ERROR, json.dumps({"ok": False, "reason": str(exc)}).encode()
        reasons = []
        layout = self.fw.const("SAMIXDP_LAYOUT_VERSION")
        if body.get("layout_version") != layout:
            reasons.append(
                f"layout version {body.get('layout_version')} differs from {me}'s {layout}"
            )
        free = {}
        for name in SESSION_MAPS:
            m = self.fw.maps[name]
            free[name] = m.info.max_entries - m.scan(_count_only).scanned
        need = int(body.get("sessions", 0))
        if need > free["sessions"] + free["halfopen"]:
            reasons.append(f"{me} has room for {free['sessions']} sessions, {need} needed")
        ok = not reasons
        _log("preflight", peer=peer.name, vm=body.get("vm"), ok=ok, reasons=reasons)
        reply = sign_control(
            self.identity,
            {
                "type": "preflight-reply",
                "to": peer.name,
                "ok": ok,
                "reason": "; ".join(reasons),
                "layout_version": layout,
                "free": free,
                "migration_id": body.get("migration_id"),
            },
        )
        return MSG_PREFLIGHT_REPLY, reply

    def bundle(self, data: bytes, peer_addr: str) -> tuple[int, bytes]:
        trust = self.trust()
        t0 = time.perf_counter()
        replay = ReplayCache(self.cfg.state_dir)  # sqlite: one connection per thread
        try:
            with self.import_lock:
                res = receive_bundle(
                    self.fw,
                    data,
                    trust,
                    replay,
                    self.identity.host_id,
                    state_dir=self.cfg.state_dir,
                    pickup_s=self.cfg.pickup_s,
                )
        except SamiError as exc:
            _log("refused", peer=peer_addr, bytes=len(data), reason=str(exc))
            return MSG_ACK, self._ack_error(data, str(exc), type(exc).__name__)
        finally:
            replay.close()
        took = time.perf_counter() - t0
        _log(
            "imported",
            source=res.source,
            vm=res.vm,
            seq=res.seq,
            kind=res.kind,
            counts=res.counts,
            deleted=res.deleted,
            bytes=len(data),
            seconds=round(took, 4),
        )
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
        return MSG_ACK, sign_control(self.identity, body)

    def _ack_error(self, data: bytes, reason: str, kind: str) -> bytes:
        """A signed refusal; addressed to the bundle's claimed source if parsable."""
        to = "?"
        try:
            to = parse_bundle(data).source
        except Exception:  # noqa: BLE001 - a malformed bundle has no parsable source
            pass
        return sign_control(
            self.identity, {"type": "ack", "to": to, "ok": False, "reason": reason, "error": kind}
        )

    def abort(self, data: bytes) -> tuple[int, bytes]:
        trust = self.trust()
        try:
            peer, body = verify_control(data, trust, self.identity.host_id)
            mid = str(body["migration_id"])
            with self.import_lock:
                removed = abort_import(self.fw, mid, self.cfg.state_dir)
        except (SamiError, KeyError) as exc:
            reason = str(exc) if isinstance(exc, SamiError) else "abort without migration id"
            _log("abort-refused", reason=reason)
            return MSG_ERROR, json.dumps({"ok": False, "reason": reason}).encode()
        _log("aborted", peer=peer.name, migration_id=mid, removed=removed)
        return MSG_ACK, sign_control(
            self.identity,
            {
                "type": "abort-ack",
                "to": peer.name,
                "ok": True,
                "migration_id": mid,
                "removed": removed,
            },
        )

    # ---- connections ---------------------------------------------------------

    def handle(self, sock: socket.socket, peer_addr: str) -> None:
        sock.settimeout(self.cfg.timeout_s)
        while True:
            try:
                frame = recv_frame(sock, self.cfg.max_message)
            except TransportError as exc:
                if "closed the connection" not in str(exc):
                    _log("connection-error", peer=peer_addr, reason=str(exc))
                    try:
                        send_frame(
                            sock, MSG_ERROR, json.dumps({"ok": False, "reason": str(exc)}).encode()
                        )
                    except OSError:
                        pass
                return
            except OSError:
                return
            if frame.type == MSG_PREFLIGHT and len(frame.payload) <= CONTROL_MAX_MESSAGE:
                reply = self.preflight(frame.payload)
            elif frame.type == MSG_BUNDLE:
                reply = self.bundle(frame.payload, peer_addr)
            elif frame.type == MSG_ABORT and len(frame.payload) <= CONTROL_MAX_MESSAGE:
                reply = self.abort(frame.payload)
            else:
                reply = (MSG_ERROR, b'{"ok": false, "reason": "unexpected message"}')
            try:
                send_frame(sock, *reply)
            except OSError:
                return


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64


def serve(cfg: AgentConfig, ready: threading.Event | None = None) -> None:
    """Runs until interrupted."""
    agent = Agent(cfg)
    host, port = parse_address(cfg.listen)
    ctx = cfg.tls.server_context()

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            sock: socket.socket = self.request
            peer = f"{self.client_address[0]}:{self.client_address[1]}"
            if ctx is not None:
                try:
                    sock = ctx.wrap_socket(sock, server_side=True)
                except OSError as exc:
                    _log("tls-error", peer=peer, reason=str(exc))
                    return
            agent.handle(sock, peer)

    try:
        server = _Server((host, port), Handler)
    except OSError as exc:
        raise MigrateError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    _log(
        "listening",
        address=f"{host}:{server.server_address[1]}",
        host_id=agent.identity.host_id,
        tls=ctx is not None,
    )
    if ready is not None:
        ready.set()
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        agent.fw.close()
        print("agent stopped", file=sys.stderr)
