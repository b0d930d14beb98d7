"""An outgoing migration as the operator runs it: a record of the running
migration in the state dir (so `migrate --final` / `--abort` from another shell
find it), the signals that drive it, and the source cleanup afterwards."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..base.errors import InvalidArgument
from ..loader.pinned import Firewall
from .errors import MigrateError, MigrationRefused, StateDirError
from .keys import HostIdentity, atomic_write, one_line
from .peers import Peer, TrustStore
from .phases import (
    MigrateOptions,
    Migration,
    MigrationReport,
    resolve_peer,
    send_abort,
    spawn_cleanup,
)

SIG_FINAL = signal.SIGUSR1  # `migrate --final` tells a running --until-cutover to finish


def record_path(state_dir: Path, vm: str) -> Path:
    return state_dir / "migrations" / f"{vm}.json"


def write_record(state_dir: Path, vm: str, doc: dict[str, Any]) -> None:
    path = record_path(state_dir, vm)
    try:
        atomic_write(path, json.dumps(doc).encode(), 0o644)
    except OSError as exc:
        raise StateDirError(f"cannot write the migration record {path}: {one_line(exc)}") from exc


def read_record(state_dir: Path, vm: str) -> dict[str, Any] | None:
    """The record of the VM's last outgoing migration here (None: there is none)."""
    path = record_path(state_dir, vm)
    if not path.exists():
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise StateDirError(f"cannot read the migration record {path}: {one_line(exc)}") from exc
    if (
        not isinstance(doc, dict)
        or not isinstance(doc.get("status"), str)
        or not isinstance(doc.get("migration_id"), str)
        or not isinstance(doc.get("peer"), str)
        or isinstance(doc.get("pid"), bool)
        or not isinstance(doc.get("pid"), int)
        or doc["pid"] <= 1
    ):
        raise StateDirError(f"the migration record {path} is malformed")
    return doc


def signal_running(state_dir: Path, vm: str, sig: int) -> dict[str, Any]:
    doc = read_record(state_dir, vm)
    if not doc or doc.get("status") != "running":
        raise MigrateError(f"no running migration of {vm} on this host")
    try:
        os.kill(int(doc["pid"]), sig)
    except ProcessLookupError as exc:
        raise MigrateError(f"the migration process of {vm} is gone") from exc
    return doc


def wait_finished(state_dir: Path, vm: str, timeout_s: float = 60.0) -> dict[str, Any]:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        doc = read_record(state_dir, vm)
        if doc and doc.get("status") != "running":
            return doc
        time.sleep(0.05)
    raise MigrateError(f"migration of {vm} did not finish within {timeout_s:.0f} s")


def run_recorded(
    fw: Firewall,
    identity: HostIdentity,
    trust: TrustStore,
    target: Peer,
    vm: str,
    opts: MigrateOptions,
    *,
    state_dir: Path,
    bpffs: Path,
    progress: Callable[[str], None],
) -> MigrationReport:
    """Runs one migration with its record kept up to date; SIG_FINAL ends an
    --until-cutover run with the final delta, SIGTERM aborts it. Then the source
    cleanup (unless --keep-source) is left to a detached helper."""
    mig = Migration(fw, identity, trust, target, vm, opts, progress=progress)
    record = {
        "pid": os.getpid(),
        "vm": vm,
        "peer": target.name,
        "migration_id": mig.mid.hex(),
        "status": "running",
        "started": time.time(),
    }
    write_record(state_dir, vm, record)

    def on_final(_sig: int, _frm: object) -> None:
        mig.cutover = True

    def on_abort(_sig: int, _frm: object) -> None:
        raise MigrationRefused("aborted by the operator")

    signal.signal(SIG_FINAL, on_final)
    signal.signal(signal.SIGTERM, on_abort)
    try:
        report = mig.run()
    except BaseException as exc:
        write_record(state_dir, vm, {**record, "status": "failed", "report": mig.report.as_dict()})
        if isinstance(exc, KeyboardInterrupt):
            raise MigrationRefused("interrupted; destination asked to drop it") from exc
        raise
    if opts.keep_source:
        report.cleanup = "source state kept (--keep-source)"
    else:
        log = state_dir / "migrations" / f"{vm}.cleanup.log"
        pid = spawn_cleanup(bpffs, vm, opts.source_grace_s, opts.max_wait_s, log)
        report.cleanup = (
            f"source cleanup: VM state here is removed once it has been idle for "
            f"{opts.source_grace_s:g} s (helper pid {pid}, log {log})"
        )
    write_record(state_dir, vm, {**record, "status": "completed", "report": report.as_dict()})
    return report


def finish_running(state_dir: Path, vm: str) -> dict[str, Any]:
    """`--final`: tells the running --until-cutover migration of `vm` to send the
    final delta; returns its record once it ended ("status", "report")."""
    signal_running(state_dir, vm, SIG_FINAL)
    return wait_finished(state_dir, vm)


def abort_migration(
    state_dir: Path,
    vm: str,
    identity: HostIdentity,
    trust: TrustStore,
    peer: str | None,
    plaintext: bool = False,
) -> str:
    """`--abort`: stops the running migration of `vm`, or asks the destination of
    the last recorded one to drop what it imported. Nothing changes here."""
    doc = read_record(state_dir, vm)
    if doc and doc.get("status") == "running":
        signal_running(state_dir, vm, signal.SIGTERM)
        done = wait_finished(state_dir, vm)
        return f"aborted migration {done['migration_id'][:12]} of {vm}"
    if not doc:
        raise InvalidArgument(f"no migration of {vm} recorded on this host")
    target = resolve_peer(trust, peer or doc["peer"])
    ack = send_abort(identity, trust, target, doc["migration_id"], plaintext)
    write_record(state_dir, vm, {**doc, "status": "aborted"})
    return (
        f"aborted migration {doc['migration_id'][:12]} of {vm}; {target.name} removed "
        f"{ack.get('removed')}; nothing changed here"
    )
