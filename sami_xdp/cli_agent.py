"""`samixdp agent` and `samixdp migrate`: the online migration path."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Annotated

import typer

from .errors import InvalidArgument
from .loader import bpffs
from .migrate.transport import DEFAULT_MAX_MESSAGE, DEFAULT_TIMEOUT_S, TlsConfig
from .netutil import ip_to_be32


def register(app: typer.Typer) -> None:
    app.command("agent")(agent_cmd)
    app.command("migrate")(migrate_cmd)
    app.command("migrate-cleanup", hidden=True)(cleanup_cmd)


def _cli():  # late import: cli imports this module
    from . import cli

    return cli


def agent_cmd(
    ctx: typer.Context,
    listen: Annotated[str, typer.Option(help="HOST:PORT to accept peers on.")] = "0.0.0.0:7800",
    pickup: Annotated[float, typer.Option(help="Pickup window (s) after each import.")] = 10.0,
    max_message: Annotated[int, typer.Option(help="Largest bundle accepted (bytes).")] = (
        DEFAULT_MAX_MESSAGE
    ),
    timeout: Annotated[float, typer.Option(help="Per-read timeout (s).")] = DEFAULT_TIMEOUT_S,
    tls_cert: Annotated[Path | None, typer.Option(help="TLS certificate (optional).")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="TLS private key.")] = None,
) -> None:
    """Receive migration bundles from trusted peers and load them."""
    from .migrate.agent import AgentConfig, serve

    c = _cli()._ctx(ctx)
    bpffs.require_root()
    if pickup < 0 or max_message < 1024 or timeout <= 0:
        raise InvalidArgument("--pickup >= 0, --max-message >= 1024, --timeout > 0")
    if bool(tls_cert) != bool(tls_key):
        raise InvalidArgument("--tls-cert and --tls-key go together")
    cfg = AgentConfig(
        bpffs=c.bpffs,
        config_dir=c.config_dir,
        state_dir=c.state_dir,
        listen=listen,
        pickup_s=pickup,
        max_message=max_message,
        timeout_s=timeout,
        tls=TlsConfig(
            certfile=str(tls_cert) if tls_cert else None,
            keyfile=str(tls_key) if tls_key else None,
        ),
    )
    serve(cfg)


def _print_report(report: dict, as_json: bool) -> None:
    cli = _cli()
    if as_json:
        cli.emit_json(report)
        return
    rows = []
    for p in report["phases"]:
        rows.append(
            [
                p["name"],
                f"{p['seconds'] * 1000:.1f}",
                p["bytes"],
                sum(p["exported"].values()),
                sum(p["imported"].values()),
                p["refused"] or "-",
            ]
        )
    cli.table(rows, ["phase", "ms", "bytes", "exported", "imported", "refused"])
    typer.echo(
        f"migration {report['migration_id'][:12]} of {report['vm']} to {report['peer']}: "
        f"{report['outcome']}, {report['total_bytes']} bytes in {report['total_seconds']:.3f} s"
    )
    if report.get("cleanup"):
        typer.echo(report["cleanup"])


def migrate_cmd(
    ctx: typer.Context,
    vm: Annotated[str, typer.Option(help="The VM's address.")],
    peer: Annotated[str | None, typer.Option(help="Peer NAME or HOST:PORT.")] = None,
    rounds: Annotated[int, typer.Option(help="Delta rounds before the final one.")] = 1,
    interval: Annotated[float, typer.Option(help="Seconds between delta rounds.")] = 0.5,
    until_cutover: Annotated[
        bool, typer.Option("--until-cutover", help="Keep syncing deltas until --final.")
    ] = False,
    final: Annotated[
        bool, typer.Option("--final", help="Tell a running --until-cutover to finish.")
    ] = False,
    abort: Annotated[
        bool, typer.Option("--abort", help="Stop; the destination drops what it imported.")
    ] = False,
    source_grace: Annotated[float, typer.Option(help="Idle seconds before source cleanup.")] = 30.0,
    keep_source: Annotated[
        bool, typer.Option("--keep-source", help="Never delete the VM's state here.")
    ] = False,
    compress: Annotated[bool, typer.Option("--compress", help="zlib the bundle body.")] = False,
    tls_ca: Annotated[Path | None, typer.Option(help="CA file: talk TLS to the peer.")] = None,
    json_: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Move VM's firewall state to a peer: preflight, full copy, deltas, final, cleanup."""
    from .loader.pinned import Firewall
    from .migrate import phases
    from .migrate.keys import HostIdentity, TrustStore

    c = _cli()._ctx(ctx)
    ip_to_be32(vm)  # validates
    bpffs.require_root()
    if final and abort:
        raise InvalidArgument("--final and --abort exclude each other")
    if final:
        phases.signal_running(c.state_dir, vm, phases.SIG_FINAL)
        done = phases.wait_finished(c.state_dir, vm)
        _print_report(done["report"], json_)
        if done["status"] != "completed":
            raise phases.MigrationRefused(done["report"]["outcome"])
        return
    identity = HostIdentity.load(c.config_dir)
    trust = TrustStore.load(c.config_dir)
    if abort:
        doc = phases.read_record(c.state_dir, vm)
        if doc and doc.get("status") == "running":
            phases.signal_running(c.state_dir, vm, signal.SIGTERM)
            done = phases.wait_finished(c.state_dir, vm)
            typer.echo(f"aborted migration {done['migration_id'][:12]} of {vm}")
            return
        if not doc:
            raise InvalidArgument(f"no migration of {vm} recorded on this host")
        target = phases.resolve_peer(trust, peer or doc["peer"])
        ack = phases.send_abort(identity, trust, target, doc["migration_id"])
        phases.write_record(c.state_dir, vm, {**doc, "status": "aborted"})
        typer.echo(
            f"aborted migration {doc['migration_id'][:12]} of {vm}; {target.name} removed "
            f"{ack.get('removed')}; nothing changed here"
        )
        return
    if peer is None:
        raise InvalidArgument("--peer NAME|HOST:PORT is required")
    if rounds < 0 or interval < 0 or source_grace < 0:
        raise InvalidArgument("--rounds, --interval and --source-grace must be >= 0")
    target = phases.resolve_peer(trust, peer)
    opts = phases.MigrateOptions(
        delta_rounds=rounds,
        interval_s=interval,
        until_cutover=until_cutover,
        source_grace_s=source_grace,
        keep_source=keep_source,
        compression="zlib" if compress else "none",
        tls=TlsConfig(cafile=str(tls_ca) if tls_ca else None),
    )
    say = (lambda m: typer.echo(m, err=True)) if not json_ else (lambda _m: None)
    with Firewall.open(c.bpffs) as fw:
        mig = phases.Migration(fw, identity, trust, target, vm, opts, progress=say)
        record = {
            "pid": _pid(),
            "vm": vm,
            "peer": target.name,
            "migration_id": mig.mid.hex(),
            "status": "running",
            "started": time.time(),
        }
        phases.write_record(c.state_dir, vm, record)

        def on_final(_sig: int, _frm: object) -> None:
            mig.cutover = True

        def on_abort(_sig: int, _frm: object) -> None:
            raise phases.MigrationRefused("aborted by the operator")

        signal.signal(phases.SIG_FINAL, on_final)
        signal.signal(signal.SIGTERM, on_abort)
        try:
            report = mig.run()
        except BaseException as exc:
            phases.write_record(
                c.state_dir, vm, {**record, "status": "failed", "report": mig.report.as_dict()}
            )
            if isinstance(exc, KeyboardInterrupt):
                raise phases.MigrationRefused("interrupted; destination asked to drop it") from exc
            raise
        if keep_source:
            report.cleanup = "source state kept (--keep-source)"
        else:
            log = c.state_dir / "migrations" / f"{vm}.cleanup.log"
            pid = phases.spawn_cleanup(c.bpffs, vm, source_grace, opts.max_wait_s, log)
            report.cleanup = (
                f"source cleanup: VM state here is removed once it has been idle for "
                f"{source_grace:g} s (helper pid {pid}, log {log})"
            )
        phases.write_record(
            c.state_dir, vm, {**record, "status": "completed", "report": report.as_dict()}
        )
    _print_report(report.as_dict(), json_)


def _pid() -> int:
    import os

    return os.getpid()


def cleanup_cmd(
    ctx: typer.Context,
    vm: Annotated[str, typer.Option()],
    grace: Annotated[float, typer.Option()] = 30.0,
    max_wait: Annotated[float, typer.Option()] = 3600.0,
) -> None:
    """Wait until VM has been idle here for GRACE seconds, then delete its state."""
    from .loader.pinned import Firewall
    from .migrate import phases

    with Firewall.open(_cli()._ctx(ctx).bpffs) as fw:
        removed = phases.wait_and_cleanup(fw, vm, grace, max_wait, progress=typer.echo)
    typer.echo(json.dumps({"vm": vm, "removed": removed}))
