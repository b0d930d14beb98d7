"""The agent's side of the local control socket (localproto.py): runs the
outgoing migrations that `samixdp migrate` and `drain` hand it."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import MigrateError
from .fields import FieldError, want_str, want_vms
from .localproto import error_answer, options_from, read_line, send_line, socket_path
from .peers import TrustStore
from .phases import Migration, resolve_peer
from .runner import MigrationRunner
from .running import find_record, wait_finished

REQUEST_TIMEOUT_S = 10.0  # for the request line to arrive whole
MAX_CLIENTS = 256  # local connections at once (a drain holds one per running VM)
CLIENT_GONE = "the client went away (interrupted): aborted, the destination drops what it got"


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


class LocalServer:
    """Accepts local requests in a thread; each connection gets its own."""

    def __init__(self, runner: MigrationRunner, config_dir: Path, state_dir: Path,
                 log: Callable[..., None],
                 stats: Callable[[], dict[str, Any]] | None = None) -> None:
        """`stats()`: figures `list` answers with (the shared scan's passes)."""
        self.runner, self.config_dir, self.state_dir = runner, config_dir, state_dir
        self.log = log
        self.stats = stats or dict
        self.path = socket_path(state_dir)
        self.slots = threading.BoundedSemaphore(MAX_CLIENTS)
        self.sock = self._bind()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def _bind(self) -> socket.socket:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(self.path))
        except OSError:
            self.path.unlink(missing_ok=True)  # a socket left by an agent that is gone
        else:
            raise MigrateError(f"another agent answers on {self.path}: one agent per state dir")
        finally:
            probe.close()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # born 0600: no window in which another user may connect
        try:
            sock.bind(str(self.path))
        except OSError as exc:
            sock.close()
            raise MigrateError(f"cannot listen on {self.path}: {exc.strerror}") from exc
        finally:
            os.umask(old)
        sock.listen(64)
        return sock

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
        self.path.unlink(missing_ok=True)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed: the agent stops
            if not self.slots.acquire(blocking=False):
                with contextlib.suppress(OSError):
                    send_line(conn, error_answer(MigrateError("too many local clients")))
                conn.close()
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            uid = _peer_uid(conn)
            if uid not in (0, os.geteuid()):
                send_line(conn, error_answer(MigrateError(f"uid {uid} may not control the agent")))
                return
            conn.settimeout(REQUEST_TIMEOUT_S)
            line = read_line(conn, bytearray())
            conn.settimeout(None)
            if line is None:
                return
            try:
                req = json.loads(line)
            except ValueError:
                req = None
            if not isinstance(req, dict):
                raise FieldError("request", "must be one JSON object")
            send_line(conn, self.handle(conn, req))
        except (OSError, ValueError) as exc:
            with contextlib.suppress(OSError):
                send_line(conn, error_answer(MigrateError(f"bad request: {exc}")))
        except Exception as exc:  # noqa: BLE001 - every failure is an answer, never a dead thread
            with contextlib.suppress(OSError):
                send_line(conn, error_answer(exc))
        finally:
            conn.close()
            self.slots.release()

    def handle(self, conn: socket.socket, req: dict[str, Any]) -> dict[str, Any]:
        op = want_str(req, "op", 32)
        if op == "migrate":
            return self.migrate(conn, req)
        if op in ("final", "abort"):
            vms = want_vms(req, "vms")
            mid = (self.runner.finish(vms) if op == "final"
                   else self.runner.abort(vms, "aborted by the operator"))
            path, _ = find_record(self.state_dir, vms)
            doc = wait_finished(path, vms.label)
            self.log(f"migration-{op}", vm=vms.label, migration_id=mid)
            return {"ok": True, "status": doc.get("status"), "migration_id": mid,
                    "vms": doc.get("vms"), "report": doc.get("report")}
        if op == "list":
            return {"ok": True, "running": self.runner.list_running(), **self.stats()}
        raise FieldError("op", "must be migrate, final, abort or list")

    def migrate(self, conn: socket.socket, req: dict[str, Any]) -> dict[str, Any]:
        vms = want_vms(req, "vms")
        opts_doc = req.get("options")
        if not isinstance(opts_doc, dict):
            raise FieldError("options", "must be an object")
        opts = options_from(opts_doc)
        target = resolve_peer(TrustStore.load(self.config_dir), want_str(req, "peer", 300))

        def progress(text: str) -> None:
            with contextlib.suppress(OSError):  # a client gone is seen by the watcher
                send_line(conn, {"progress": text})

        def watch(mig: Migration) -> None:
            """The client's end of the connection: closed early means abort."""
            def wait_eof() -> None:
                with contextlib.suppress(OSError):
                    while conn.recv(4096):
                        pass
                mig.stop(CLIENT_GONE)
            threading.Thread(target=wait_eof, daemon=True).start()

        report = self.runner.run(target, vms, opts, progress=progress, started=watch)
        return {"ok": True, "report": report.as_dict()}
