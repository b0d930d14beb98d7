"""An outgoing migration as the operator runs it: a record of the running
migration in the state dir (so `migrate --final` / `--abort` from another shell
find it), the signals that drive it, and the source cleanup afterwards.

A record is named by the VM's addresses; `--final` and `--abort` find it by all
of them or by any part of them (`--vm 2001:db8:1::10` finds the migration of
10.1.1.1 and 2001:db8:1::10)."""

from __future__ import annotations

import hashlib
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
from .localproto import ask, connect
from .peers import Peer, TrustStore
from .phases import (
    MigrateOptions,
    Migration,
    MigrationReport,
    resolve_peer,
    send_abort,
    spawn_cleanup,
)
from .vmset import VmAddrs

VIA_AGENT = "agent"  # a record's "via": the agent runs it (ask it, no pid to signal)
SIG_FINAL = signal.SIGUSR1  # `migrate --final` tells a running --until-cutover to finish
RECORDS_DIR = "migrations"
MAX_NAME = 128  # longer address lists name their record by a digest


def record_name(vms: VmAddrs) -> str:
    label = vms.label
    if len(label) <= MAX_NAME:
        return label
    return "vm-" + hashlib.sha256(label.encode()).hexdigest()[:16]


def record_path(state_dir: Path, vms: VmAddrs) -> Path:
    return state_dir / RECORDS_DIR / f"{record_name(vms)}.json"


def write_record(path: Path, doc: dict[str, Any]) -> None:
    try:
        atomic_write(path, json.dumps(doc).encode(), 0o644)
    except OSError as exc:
        raise StateDirError(f"cannot write the migration record {path}: {one_line(exc)}") from exc


def read_record(path: Path) -> dict[str, Any] | None:
    """A record of an outgoing migration (None: there is none)."""
    if not path.exists():
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise StateDirError(f"cannot read the migration record {path}: {one_line(exc)}") from exc
    if isinstance(doc, dict) and "vms" not in doc and isinstance(doc.get("vm"), str):
        doc["vms"] = [doc["vm"]]  # written before a VM could have several addresses
    vms = doc.get("vms") if isinstance(doc, dict) else None
    if (
        not isinstance(doc, dict)
        or not isinstance(doc.get("status"), str)
        or not isinstance(doc.get("migration_id"), str)
        or not isinstance(doc.get("peer"), str)
        or not isinstance(vms, list)
        or not all(isinstance(v, str) for v in vms)
        or isinstance(doc.get("pid"), bool)
        or not isinstance(doc.get("pid"), int)
        or doc["pid"] <= 1
    ):
        raise StateDirError(f"the migration record {path} is malformed")
    return doc


def find_record(state_dir: Path, vms: VmAddrs) -> tuple[Path, dict[str, Any] | None]:
    """The record of the VM's last outgoing migration here: the one named by exactly
    these addresses, else the newest whose VM holds all of them; (where a record of
    exactly these addresses goes, None) when there is none."""
    exact = record_path(state_dir, vms)
    doc = read_record(exact)
    if doc is not None:
        return exact, doc
    best: tuple[float, Path, dict[str, Any]] | None = None
    folder = state_dir / RECORDS_DIR
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            other = read_record(path)
        except StateDirError:
            continue  # another migration's record, unreadable: not this one's business
        if other is None or not set(vms.ips) <= set(other["vms"]):
            continue
        started = float(other.get("started", 0))
        if best is None or started > best[0]:
            best = (started, path, other)
    return (best[1], best[2]) if best else (exact, None)


def signal_running(state_dir: Path, vms: VmAddrs, sig: int) -> tuple[Path, dict[str, Any]]:
    path, doc = find_record(state_dir, vms)
    if not doc or doc.get("status") != "running":
        raise MigrateError(f"no running migration of {vms.label} on this host")
    if doc.get("via") == VIA_AGENT:  # its pid is the agent's: a signal would stop it
        raise MigrateError(f"the migration of {vms.label} runs in the agent: ask the agent")
    try:
        os.kill(int(doc["pid"]), sig)
    except ProcessLookupError as exc:
        raise MigrateError(f"the migration process of {vms.label} is gone") from exc
    return path, doc


def wait_finished(path: Path, label: str, timeout_s: float = 60.0) -> dict[str, Any]:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        doc = read_record(path)
        if doc and doc.get("status") != "running":
            return doc
        time.sleep(0.05)
    raise MigrateError(f"migration of {label} did not finish within {timeout_s:.0f} s")


def run_recorded(
    fw: Firewall,
    identity: HostIdentity,
    trust: TrustStore,
    target: Peer,
    vms: VmAddrs,
    opts: MigrateOptions,
    *,
    state_dir: Path,
    bpffs: Path,
    progress: Callable[[str], None],
) -> MigrationReport:
    """Runs one migration with its record kept up to date; SIG_FINAL ends an
    --until-cutover run with the final delta, SIGTERM aborts it. Then the source
    cleanup (unless --keep-source) is left to a detached helper."""
    mig = Migration(fw, identity, trust, target, vms, opts, progress=progress)
    path = record_path(state_dir, vms)
    record = {
        "pid": os.getpid(),
        "vm": vms.label,
        "vms": list(vms.ips),
        "peer": target.name,
        "migration_id": mig.mid.hex(),
        "status": "running",
        "started": time.time(),
    }
    note = cutover_note_path(path)
    note.unlink(missing_ok=True)

    def on_final(_sig: int, _frm: object) -> None:
        mig.cutover = True

    def on_abort(_sig: int, _frm: object) -> None:
        raise MigrationRefused("aborted by the operator")

    # the handlers first: a signal that finds the record must find them too
    signal.signal(SIG_FINAL, on_final)
    signal.signal(signal.SIGTERM, on_abort)
    write_record(path, record)
    try:
        report = mig.run()
    except BaseException as exc:
        write_record(path, {**record, "status": "failed", "report": mig.report.as_dict()})
        if isinstance(exc, KeyboardInterrupt):
            raise MigrationRefused("interrupted; destination asked to drop it") from exc
        raise
    if opts.until_cutover:
        report.cutover = take_cutover_note(path, "the operator (migrate --final or SIGUSR1)")
    if opts.keep_source:
        report.cleanup = "source state kept (--keep-source)"
    else:
        report.cleanup = clean_up_by_helper(bpffs, vms, opts, path)
    write_record(path, {**record, "status": "completed", "report": report.as_dict()})
    return report


def cutover_note_path(record: Path) -> Path:
    return record.with_name(record.name.removesuffix(".json") + ".cutover")


def leave_cutover_note(record: Path, why: str) -> None:
    """Who said the VM had moved, for the migration's report."""
    note = cutover_note_path(record)
    try:
        atomic_write(note, why.encode()[:1000], 0o644)
    except OSError as exc:
        raise StateDirError(f"cannot write {note}: {one_line(exc)}") from exc


def take_cutover_note(record: Path, default: str) -> str:
    """Who said the VM had moved (the note a cutover request left), then gone."""
    note = cutover_note_path(record)
    try:
        text = note.read_text()[:1000]
        note.unlink()
    except FileNotFoundError:
        return default
    return text


def clean_up_by_helper(bpffs: Path, vms: VmAddrs, opts: MigrateOptions, record: Path) -> str:
    """A detached helper deletes the VM's state here once it is idle (no process of
    ours stays); the report's line about it."""
    log = record.with_name(f"{record_name(vms)}.cleanup.log")
    pid = spawn_cleanup(bpffs, vms, opts.source_grace_s, opts.max_wait_s, log)
    return (f"source cleanup: VM state here is removed once it has been idle for "
            f"{opts.source_grace_s:g} s (helper pid {pid}, log {log})")


def request_cutover(state_dir: Path, vms: VmAddrs, mid: str, peer: str, why: str) -> None:
    """A destination's cutover request: finishes the running migration of the VM
    only if it is migration `mid` and goes to `peer` (who asks)."""
    path, doc = find_record(state_dir, vms)
    if not doc or doc.get("status") != "running" or doc.get("migration_id") != mid:
        raise MigrateError(f"no running migration {mid[:12]} of {vms.label} on this host")
    if doc.get("peer") != peer:
        raise MigrateError(f"migration {mid[:12]} of {vms.label} goes to {doc.get('peer')}, "
                           f"not {peer}")
    leave_cutover_note(path, why)
    signal_running(state_dir, vms, SIG_FINAL)


def ask_agent(state_dir: Path, op: str, doc: dict[str, Any]) -> dict[str, Any]:
    """`op` ("final", "abort") for a migration the agent runs (its record `doc`)."""
    with connect(state_dir) as sock:
        if sock is None:
            raise MigrateError(f"the agent that runs the migration of {doc['vm']} does not "
                               "answer (is it running?)")
        return ask(sock, {"op": op, "vms": doc["vms"]})


def finish_running(state_dir: Path, vms: VmAddrs) -> dict[str, Any]:
    """`--final`: tells the running --until-cutover migration of the VM to send the
    final delta; returns its record once it ended ("status", "report")."""
    _, doc = find_record(state_dir, vms)
    if doc and doc.get("status") == "running" and doc.get("via") == VIA_AGENT:
        return ask_agent(state_dir, "final", doc)
    path, doc = signal_running(state_dir, vms, SIG_FINAL)
    return wait_finished(path, doc["vm"] if isinstance(doc.get("vm"), str) else vms.label)


def abort_migration(
    state_dir: Path,
    vms: VmAddrs,
    identity: HostIdentity,
    trust: TrustStore,
    peer: str | None,
    plaintext: bool = False,
) -> str:
    """`--abort`: stops the running migration of the VM, or asks the destination of
    the last recorded one to drop what it imported. Nothing changes here."""
    path, doc = find_record(state_dir, vms)
    if doc and doc.get("status") == "running" and doc.get("via") == VIA_AGENT:
        done = ask_agent(state_dir, "abort", doc)
        return f"aborted migration {done['migration_id'][:12]} of {','.join(doc['vms'])}"
    if doc and doc.get("status") == "running":
        signal_running(state_dir, vms, signal.SIGTERM)
        done = wait_finished(path, vms.label)
        return f"aborted migration {done['migration_id'][:12]} of {','.join(done['vms'])}"
    if not doc:
        raise InvalidArgument(f"no migration of {vms.label} recorded on this host")
    label = ",".join(doc["vms"])
    target = resolve_peer(trust, peer or doc["peer"])
    ack = send_abort(identity, trust, target, doc["migration_id"], plaintext)
    write_record(path, {**doc, "status": "aborted"})
    return (
        f"aborted migration {doc['migration_id'][:12]} of {label}; {target.name} removed "
        f"{ack.get('removed')}; nothing changed here"
    )
