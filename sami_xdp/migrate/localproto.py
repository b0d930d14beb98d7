"""The agent's local control socket: how `samixdp migrate`, `drain`, `--final`
and `--abort` hand outgoing migrations to the host's agent.

A Unix socket in the state dir (`agent.sock`, mode 0600), answered only for a
peer process of root or of the agent's own user (SO_PEERCRED). One JSON request
line per connection; the answer is a stream of lines: `{"progress": text}` while
the migration runs, then one `{"ok": true, ...}` or `{"ok": false, "error": text,
"kind": family}`. Closing the connection before the last line (Ctrl-C, kill of
the client) aborts the migration it asked for: the destination drops what it
imported, as for a `migrate` process that is interrupted.
"""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

from ..base.errors import InvalidArgument, NotRootError, SamiError
from .errors import (
    BundleRefused,
    ControlError,
    IdentityError,
    ImportFailed,
    MigrateError,
    MigrationRefused,
    StateDirError,
    TransportError,
    TrustStoreError,
    UnknownMigrationError,
)
from .fields import FieldError, want_bool, want_int, want_str
from .phases import MigrateOptions

SOCKET_NAME = "agent.sock"
MAX_LINE = 1 << 16  # a request or answer line; a report of many phases fits
CONNECT_TIMEOUT_S = 2.0
# the families an answer may name, most specific first (the CLI maps each to its
# exit code, so a migration run by the agent exits as one run in the CLI would)
FAMILIES: tuple[type[SamiError], ...] = (
    InvalidArgument, NotRootError, UnknownMigrationError, StateDirError, IdentityError,
    TrustStoreError, ImportFailed, BundleRefused, ControlError, TransportError,
    MigrationRefused, MigrateError, SamiError,
)
COMPRESSIONS = ("none", "zlib")


def socket_path(state_dir: Path) -> Path:
    return state_dir / SOCKET_NAME


def error_answer(exc: BaseException) -> dict[str, Any]:
    kind = next((f.__name__ for f in FAMILIES if isinstance(exc, f)), "MigrateError")
    return {"ok": False, "error": str(exc)[:1000] or type(exc).__name__, "kind": kind}


def raise_answer(doc: dict[str, Any]) -> NoReturn:
    family = {f.__name__: f for f in FAMILIES}.get(str(doc.get("kind")), MigrateError)
    raise family(str(doc.get("error", "the agent refused"))[:1000])


def options_doc(opts: MigrateOptions) -> dict[str, Any]:
    return {"rounds": opts.delta_rounds, "interval_s": opts.interval_s,
            "until_cutover": opts.until_cutover, "source_grace_s": opts.source_grace_s,
            "keep_source": opts.keep_source, "compression": opts.compression,
            "plaintext": opts.plaintext}


def _seconds(body: dict[str, Any], field: str, hi: float) -> float:
    v = body.get(field)
    if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v <= hi:
        raise FieldError(field, f"must be a number of seconds from 0 to {hi:g}")
    return float(v)


def options_from(body: dict[str, Any]) -> MigrateOptions:
    """A request's options, checked as the CLI checks its flags."""
    compression = want_str(body, "compression", 16)
    if compression not in COMPRESSIONS:
        raise FieldError("compression", f"must be one of {', '.join(COMPRESSIONS)}")
    return MigrateOptions(
        delta_rounds=want_int(body, "rounds", 0, 10_000),
        interval_s=_seconds(body, "interval_s", 3600),
        until_cutover=want_bool(body, "until_cutover"),
        source_grace_s=_seconds(body, "source_grace_s", 7 * 86400),
        keep_source=want_bool(body, "keep_source"),
        compression=compression,
        plaintext=want_bool(body, "plaintext"),
    )


def read_line(sock: socket.socket, buf: bytearray) -> bytes | None:
    """One line (without its newline) from `sock`, `buf` holding what came after
    the previous one; None at the end of the stream."""
    while b"\n" not in buf:
        if len(buf) > MAX_LINE:
            raise MigrateError(f"a control line longer than {MAX_LINE} bytes")
        chunk = sock.recv(65536)
        if not chunk:
            return None
        buf += chunk
    line, _, rest = bytes(buf).partition(b"\n")
    if len(line) > MAX_LINE:
        raise MigrateError(f"a control line longer than {MAX_LINE} bytes")
    buf[:] = rest
    return line


def send_line(sock: socket.socket, doc: dict[str, Any]) -> None:
    sock.sendall(json.dumps(doc, default=str).encode() + b"\n")


@contextlib.contextmanager
def connect(state_dir: Path) -> Iterator[socket.socket | None]:
    """A connection to the host's agent, or None when no agent listens here (no
    socket, or one left by an agent that is gone)."""
    path = socket_path(state_dir)
    if not path.exists():
        yield None
        return
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(CONNECT_TIMEOUT_S)
        try:
            sock.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            yield None
            return
        sock.settimeout(None)
        yield sock
    finally:
        sock.close()


def ask(sock: socket.socket, request: dict[str, Any],
        progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Sends one request; returns the agent's last answer (progress lines go to
    `progress`); a refusal is raised as its family."""
    send_line(sock, request)
    buf = bytearray()
    while True:
        line = read_line(sock, buf)
        if line is None:
            raise MigrateError("the agent closed the connection without an answer")
        try:
            doc = json.loads(line)
        except ValueError as exc:
            raise MigrateError("the agent sent a line that is not JSON") from exc
        if not isinstance(doc, dict):
            raise MigrateError("the agent sent a line that is not a JSON object")
        if "progress" in doc and "ok" not in doc:
            if progress is not None:
                progress(str(doc["progress"])[:1000])
            continue
        if doc.get("ok") is not True:
            raise_answer(doc)
        return doc
