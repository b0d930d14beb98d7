"""Moving a VM's state: `export`, `import`, `bundle inspect`, `imports ...` (what
this host received), `agent` (the destination's server) and `migrate` (the
source's phases).

A VM is all its addresses: every command that names one takes `--vm` once per
address (`--vm 10.1.1.1 --vm 2001:db8:1::10`), and moves or finds them together."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from ..base.errors import InvalidArgument, SamiError
from ..loader import bpffs
from ..migrate import localproto, running
from ..migrate.agent import Agent, AgentConfig, serve
from ..migrate.bundle import (
    COMPRESSIONS,
    DEFAULT_VALIDITY_S,
    FORMAT_VERSION,
    MAX_VALIDITY_S,
    new_migration_id,
    parse_bundle,
)
from ..migrate.describe import record_lines
from ..migrate.errors import (
    BundleRefused,
    MigrationRefused,
    TrustStoreError,
    UnknownMigrationError,
)
from ..migrate.export import build_bundle, require_protected
from ..migrate.importer import DEFAULT_PICKUP_S, MAX_PICKUP_S, abort_import, import_vm_state
from ..migrate.journal import ImportRecords
from ..migrate.keys import HostIdentity
from ..migrate.keys import parse_address as host_port
from ..migrate.peers import TrustStore
from ..migrate.phases import MigrateOptions, resolve_peer, send_pull, wait_and_cleanup
from ..migrate.plan import record_limits
from ..migrate.replay import REPLAY_FILE, ReplayCache
from ..migrate.select import ExportState
from ..migrate.verify import inspect_bundle, verify_bundle
from ..migrate.vmset import VmAddrs
from ..ops.hostconfig import CONFIG_FILE, AgentSpec, load_host_config
from ..ops.metrics import parse_listen, serve_metrics
from ..ops.systemd import ServiceNotifier
from .common import emit_json, root_opts, table
from .values import output_path, read_input, seconds, whole

MAX_WAIT_S = 7 * 86400.0
VM_HELP = "An address of the VM; repeat for each of its addresses (either family)."

bundle_app = typer.Typer(no_args_is_help=True, help="Look at migration bundle files.")
imports_app = typer.Typer(no_args_is_help=True, help="Migrations imported on this host.")


def register(app: typer.Typer) -> None:
    app.add_typer(bundle_app, name="bundle")
    app.add_typer(imports_app, name="imports")
    app.command("export")(export_cmd)
    app.command("import")(import_cmd)
    app.command("agent")(agent_cmd)
    app.command("migrate")(migrate_cmd)
    app.command("pull")(pull_cmd)
    app.command("migrate-cleanup", hidden=True)(cleanup_cmd)


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ---- export / import ------------------------------------------------------------------


def export_cmd(
    ctx: typer.Context,
    vm: Annotated[list[str], typer.Option("--vm", help=VM_HELP)],
    to: Annotated[str, typer.Option("--to", help="Destination peer (its host id).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Bundle file to write.")],
    seq: Annotated[int, typer.Option(help="Phase sequence number.")] = 1,
    validity: Annotated[
        float, typer.Option(help="Seconds the bundle stays valid.")
    ] = DEFAULT_VALIDITY_S,
    compress: Annotated[str, typer.Option(help="none | zlib | zlib+shuffle")] = "zlib+shuffle",
    migration_id: Annotated[
        str | None, typer.Option("--migration-id", help="32 hex digits (default: random).")
    ] = None,
    json_: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Write a signed bundle of one VM's whole state (every address given) for peer TO
    (a single, final round: importing it opens the VM's pickup windows there)."""
    c = root_opts(ctx)
    vms = VmAddrs.parse(vm)
    output_path(output)
    if compress not in COMPRESSIONS:
        raise InvalidArgument(f"--compress must be one of {', '.join(COMPRESSIONS)}")
    seconds("--validity", validity, 0, MAX_VALIDITY_S, lo_open=True)
    if not 0 <= seq < 2**32:
        raise InvalidArgument("--seq must fit in 32 bits")
    if migration_id is None:
        mid = new_migration_id()
    else:
        try:
            mid = bytes.fromhex(migration_id)
        except ValueError:
            mid = b""
        if len(mid) != 16:
            raise InvalidArgument("--migration-id must be 32 hex digits")
    ident = HostIdentity.load(c.config_dir)
    peer = TrustStore.load(c.config_dir).get(to)
    timings: dict[str, float] = {}
    with c.open() as fw:
        data = build_bundle(
            fw,
            vms,
            peer.name,
            seq,
            mid,
            "final",  # one offline round: the whole state, and the last
            ExportState(),
            identity=ident,
            validity_s=validity,
            compression=compress,
            timings=timings,
        )
    _write_private(output, data)
    counts = parse_bundle(data).counts()
    summary = {
        "file": str(output),
        "migration_id": mid.hex(),
        "seq": seq,
        "vm": vms.label,
        "vms": list(vms.ips),
        "format_version": FORMAT_VERSION,
        "source": ident.host_id,
        "audience": peer.name,
        "bytes": len(data),
        "counts": counts,
        "expires_in_s": validity,
        "seconds": round(timings.get("total_s", 0.0), 4),
    }
    if json_:
        emit_json(summary)
        return
    typer.echo(
        f"wrote {output}: {counts['sessions']} sessions, {counts['syn']} SYN counters, "
        f"{counts['blacklist']} bans, {counts['acl']} ACL rules of {vms.label} for {peer.name} "
        f"({len(data)} bytes, migration {mid.hex()} #{seq}, valid {validity:g} s)"
    )


def import_cmd(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="Bundle file.")],
    pickup: Annotated[
        float, typer.Option(help="Seconds of mid-flow TCP pickup for the VM (0: none).")
    ] = DEFAULT_PICKUP_S,
    json_: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Verify a bundle and load it into the maps (all or nothing)."""
    c = root_opts(ctx)
    seconds("--pickup", pickup, 0, MAX_PICKUP_S)
    data = read_input(file, "bundle file")
    ident = HostIdentity.load(c.config_dir)
    trust = TrustStore.load(c.config_dir)
    with c.open() as fw, ReplayCache(c.state_dir) as replay:
        vb = verify_bundle(data, trust, ident.host_id, replay, limits=record_limits(fw))
        res = import_vm_state(fw, vb, c.state_dir, replay=replay, pickup_s=pickup)
    if json_:
        emit_json(res.as_dict())
        return
    n = res.counts
    typer.echo(
        f"imported {res.vm} from {res.source} ({res.kind}, migration {res.migration_id} "
        f"#{res.seq}): {n['sessions']} sessions, {n['unassured']} unassured, "
        f"{n['syn_counters']} SYN counters, {n['blacklist']} bans, {n['acl_rules']} ACL rules"
        f"{f'; pickup window {pickup:g} s' if pickup > 0 else ''}"
    )
    for w in res.warnings:
        typer.echo(f"warning: {w}", err=True)


# ---- bundle inspect ----------------------------------------------------------------------


@bundle_app.command("inspect")
def bundle_inspect(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="Bundle file.")],
    records: Annotated[
        bool, typer.Option("--records", help="List every record (a trusted peer's bundle).")
    ] = False,
    json_: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Verify (without consuming the replay cache) and summarise a bundle.

    Exits 0 only when the bundle would be accepted here."""
    c = root_opts(ctx)
    data = read_input(file, "bundle file")
    trust = TrustStore.load(c.config_dir)
    host_id = HostIdentity.load(c.config_dir).host_id if HostIdentity.exists(c.config_dir) else None
    replay = ReplayCache(c.state_dir) if (c.state_dir / REPLAY_FILE).exists() else None
    try:
        info = inspect_bundle(data, trust, host_id, replay, records=records)
    finally:
        if replay is not None:
            replay.close()
    if json_:
        emit_json(info)
    else:
        _print_inspect(file, info)
    if not info["valid"]:
        raise BundleRefused(str(info["reason"]))


def _print_inspect(file: Path, info: dict[str, Any]) -> None:
    if "migration_id" not in info:
        typer.echo(f"{file}: not a valid bundle: {info['reason']}")
        return
    cnt = info["counts"]
    verdict = "valid" if info["valid"] else f"NOT valid: {info['reason']}"
    typer.echo(f"{file}: {verdict}")
    typer.echo(
        f"  vm {info['vm']}  from {info['source']}  to {info['audience']}  "
        f"signer {info['signer'] or 'unknown'} (key {info['key_id']})"
    )
    typer.echo(
        f"  migration {info['migration_id']} #{info['seq']}  kind {info['kind']}  "
        f"layout v{info['layout_version']}  compression {info['compression']}"
    )
    expires = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["expires_at_ms"] / 1000))
    typer.echo(
        f"  issued {info['age_s']:.1f} s ago, expires in {info['expires_in_s']:.1f} s ({expires})"
    )
    typer.echo(
        f"  sessions {cnt['sessions']}  syn {cnt['syn']}  blacklist {cnt['blacklist']}  "
        f"acl {cnt['acl']} ({info['acl']})  deleted: sessions {cnt['del_sessions']} "
        f"syn {cnt['del_syn']} blacklist {cnt['del_blacklist']}"
    )
    bps = info["bytes_per_session"]
    typer.echo(f"  {info['bytes']} bytes" + (f", {bps} bytes/session" if bps else ""))
    for note in info.get("notes", []):
        typer.echo(f"  note: {note}")
    if "records" in info:
        for line in record_lines(info["records"]):
            typer.echo(f"  {line}")


# ---- imports (what this host received) ----------------------------------------------------


@imports_app.command("list")
def imports_list(
    ctx: typer.Context, json_: Annotated[bool, typer.Option("--json")] = False
) -> None:
    """Migrations imported here, with their rounds."""
    records = ImportRecords(root_opts(ctx).state_dir)
    recs = records.list()
    if json_:
        emit_json(recs)
        return
    if records.inflight_path.exists() or records.abort_path.exists():
        typer.echo(
            "note: an import or abort was interrupted; the next agent start or "
            "state-changing command rolls it back or completes it",
            err=True,
        )
    if not recs:
        typer.echo("no imported migrations")
        return
    table(
        [
            [
                r["migration_id"],
                r.get("vm"),
                r.get("source"),
                r.get("status"),
                ",".join(f"{x['seq']}:{x['kind']}:{x['status']}" for x in r.get("rounds", [])),
            ]
            for r in recs
        ],
        ["migration", "vm", "source", "status", "rounds"],
    )


@imports_app.command("abort")
def imports_abort(
    ctx: typer.Context,
    migration_id: Annotated[str, typer.Argument(help="Migration id (32 hex digits).")],
    json_: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Remove exactly what a migration imported here and refuse its later bundles."""
    c = root_opts(ctx)
    try:
        mid = bytes.fromhex(migration_id)
    except ValueError:
        mid = b""
    if len(mid) != 16:
        raise InvalidArgument("migration id must be 32 hex digits")
    if ImportRecords(c.state_dir).meta(mid) is None:
        raise UnknownMigrationError(f"no import of migration {mid.hex()} in {c.state_dir}")
    with c.change() as fw:
        counts = abort_import(fw, mid, c.state_dir)
    if json_:
        emit_json(counts)
        return
    removed = sum(v for k, v in counts.items() if k.endswith(".removed"))
    restored = sum(v for k, v in counts.items() if k.endswith(".restored"))
    typer.echo(f"aborted {mid.hex()}: removed {removed} entries, restored {restored}")


# ---- online migration ------------------------------------------------------------------


def agent_cmd(
    ctx: typer.Context,
    listen: Annotated[
        str | None, typer.Option(help="HOST:PORT to accept peers on [default: 0.0.0.0:7800].")
    ] = None,
    pickup: Annotated[
        float | None,
        typer.Option(help=f"Pickup window (s) after a migration's final round "
                     f"[default: {DEFAULT_PICKUP_S:g}]."),
    ] = None,
    max_message: Annotated[
        int | None, typer.Option(help="Largest bundle accepted (bytes).")] = None,
    timeout: Annotated[
        float | None, typer.Option(help="Seconds for one whole message to arrive.")
    ] = None,
    idle: Annotated[
        float | None, typer.Option(help="Seconds a connection may wait between messages.")
    ] = None,
    handshake_timeout: Annotated[
        float | None, typer.Option(help="Seconds for a peer to authenticate (TLS or hello).")
    ] = None,
    max_conns: Annotated[int | None, typer.Option(help="Connections at once.")] = None,
    max_pending_per_ip: Annotated[
        int | None, typer.Option(help="Unauthenticated connections at once per address.")
    ] = None,
    max_bundles: Annotated[
        int | None, typer.Option(help="Bundles received/verified at once.")] = None,
    plaintext: Annotated[
        bool,
        typer.Option(
            "--plaintext", help="No TLS: a signed hello authenticates (debugging only)."
        ),
    ] = False,
    metrics: Annotated[
        str | None,
        typer.Option(
            help="IP:PORT or [IPV6]:PORT to serve Prometheus metrics on (unauthenticated: "
            "localhost or a management address; port 0 picks one)."
        ),
    ] = None,
) -> None:
    """Receive migration bundles from trusted peers (mutual TLS) and load them.

    An option not given takes its value from the [agent] section of
    CONFIG_DIR/samixdp.toml when that file exists (the service runs `samixdp agent`)."""
    c = root_opts(ctx)
    host_file = c.config_dir / CONFIG_FILE
    spec = load_host_config(host_file).agent if host_file.exists() else AgentSpec()
    listen = spec.listen if listen is None else listen
    pickup = spec.pickup_s if pickup is None else pickup
    max_message = spec.max_message if max_message is None else max_message
    timeout = spec.timeout_s if timeout is None else timeout
    idle = spec.idle_s if idle is None else idle
    handshake_timeout = spec.handshake_s if handshake_timeout is None else handshake_timeout
    max_conns = spec.max_conns if max_conns is None else max_conns
    max_pending_per_ip = (spec.max_pending_per_ip if max_pending_per_ip is None
                          else max_pending_per_ip)
    max_bundles = spec.max_bundles if max_bundles is None else max_bundles
    metrics = spec.metrics if metrics is None else metrics
    if metrics is not None:
        parse_listen(metrics)
    seconds("--pickup", pickup, 0, MAX_PICKUP_S)
    whole("--max-message", max_message, 1024, 1 << 31)
    seconds("--timeout", timeout, 0, 3600, lo_open=True)
    seconds("--idle", idle, 0, 86400, lo_open=True)
    seconds("--handshake-timeout", handshake_timeout, 0, 600, lo_open=True)
    whole("--max-conns", max_conns, 1, 4096)
    whole("--max-pending-per-ip", max_pending_per_ip, 1, 4096)
    whole("--max-bundles", max_bundles, 1, 64)
    try:
        host_port(listen)
    except TrustStoreError as exc:
        raise InvalidArgument(f"--listen: {exc}") from exc
    bpffs.require_root()
    cfg = AgentConfig(
        bpffs=c.bpffs,
        config_dir=c.config_dir,
        state_dir=c.state_dir,
        listen=listen,
        pickup_s=pickup,
        max_message=max_message,
        timeout_s=timeout,
        idle_s=idle,
        handshake_s=handshake_timeout,
        max_conns=max_conns,
        max_pending_per_ip=max_pending_per_ip,
        max_bundles=max_bundles,
        plaintext=plaintext,
    )
    # bound before the agent starts (a bad address stops it with one line); the
    # agent's counters join once it listens
    srv = serve_metrics(metrics, c.bpffs, c.state_dir) if metrics is not None else None

    def with_metrics(agent: Agent) -> None:
        assert srv is not None
        srv.collector.agent = agent
        line = {"ts": round(time.time(), 3), "event": "metrics", "address": srv.address,
                "path": "/metrics"}
        print(json.dumps(line), flush=True)  # the agent's log: JSON lines on stdout

    notifier = ServiceNotifier.from_env()  # systemd Type=notify (a no-op outside systemd)

    def on_term(_sig: int, _frm: object) -> None:
        raise KeyboardInterrupt  # the same clean stop as Ctrl-C

    with contextlib.suppress(ValueError):  # not the main thread: the caller's own handling
        signal.signal(signal.SIGTERM, on_term)
    try:
        serve(cfg, on_ready=lambda addr: notifier.ready(f"listening on {addr}"),
              on_tick=notifier.tick, on_start=with_metrics if srv is not None else None)
    finally:
        notifier.stopping()
        if srv is not None:
            srv.close()


def _print_report(report: dict, as_json: bool) -> None:
    if as_json:
        emit_json(report)
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
    table(rows, ["phase", "ms", "bytes", "exported", "imported", "refused"])
    typer.echo(
        f"migration {report['migration_id'][:12]} of {','.join(report['vms'])} to "
        f"{report['peer']}: "
        f"{report['outcome']}, {report['total_bytes']} bytes in {report['total_seconds']:.3f} s"
    )
    if report.get("cleanup"):
        typer.echo(report["cleanup"])


def migrate_cmd(
    ctx: typer.Context,
    vm: Annotated[list[str], typer.Option("--vm", help=VM_HELP)],
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
    plaintext: Annotated[
        bool, typer.Option("--plaintext", help="No TLS, for an agent run with --plaintext.")
    ] = False,
    json_: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Move a VM's firewall state (all its addresses, one bundle a round) to a peer:
    preflight, full copy, deltas, final, cleanup.

    When the host's agent runs (its socket in the state dir), the agent runs the
    migration and this command shows it (Ctrl-C aborts it); otherwise this
    command runs it itself."""
    c = root_opts(ctx)
    vms = VmAddrs.parse(vm)
    whole("--rounds", rounds, 0, 10_000)
    seconds("--interval", interval, 0, 3600)
    seconds("--source-grace", source_grace, 0, MAX_WAIT_S)
    bpffs.require_root()
    if final and abort:
        raise InvalidArgument("--final and --abort exclude each other")
    if final:
        done = running.finish_running(c.state_dir, vms)
        _print_report(done["report"], json_)
        if done["status"] != "completed":
            raise MigrationRefused(done["report"]["outcome"])
        return
    identity = HostIdentity.load(c.config_dir)
    trust = TrustStore.load(c.config_dir)
    if abort:
        typer.echo(running.abort_migration(c.state_dir, vms, identity, trust, peer, plaintext))
        return
    if peer is None:
        raise InvalidArgument("--peer NAME|HOST:PORT is required")
    target = resolve_peer(trust, peer)
    opts = MigrateOptions(
        delta_rounds=rounds,
        interval_s=interval,
        until_cutover=until_cutover,
        source_grace_s=source_grace,
        keep_source=keep_source,
        compression="zlib" if compress else "none",
        plaintext=plaintext,
    )
    say = (lambda m: typer.echo(m, err=True)) if not json_ else (lambda _m: None)
    with localproto.connect(c.state_dir) as sock:
        if sock is not None:  # the host's agent runs it (no start-up, shared scans)
            request = {"op": "migrate", "vms": list(vms.ips), "peer": target.name,
                       "options": localproto.options_doc(opts)}
            try:
                done = localproto.ask(sock, request, progress=say)
            except KeyboardInterrupt as exc:
                raise MigrationRefused("interrupted; the agent aborts the migration and the "
                                       "destination drops what it got") from exc
            _print_report(done["report"], json_)
            return
    with c.change() as fw:
        require_protected(fw, vms)
        report = running.run_recorded(
            fw,
            identity,
            trust,
            target,
            vms,
            opts,
            state_dir=c.state_dir,
            bpffs=c.bpffs,
            progress=say,
        )
    _print_report(report.as_dict(), json_)


def pull_cmd(
    ctx: typer.Context,
    vm: Annotated[list[str], typer.Option("--vm", help=VM_HELP)],
    from_: Annotated[
        list[str] | None,
        typer.Option("--from", help="Peer NAME to ask (repeatable; default: every peer "
                     "whose scope holds the VM)."),
    ] = None,
    plaintext: Annotated[bool, typer.Option("--plaintext")] = False,
    json_: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """The VM is about to arrive here (its hypervisor said so): ask the peer that
    hosts it to start `migrate --until-cutover` to this host. The final delta
    follows when this host's datapath sees the VM arrive."""
    c = root_opts(ctx)
    vms = VmAddrs.parse(vm)
    identity = HostIdentity.load(c.config_dir)
    trust = TrustStore.load(c.config_dir)
    if from_:
        asked = [resolve_peer(trust, name) for name in from_]
    else:
        asked = [p for p in trust.peers() if p.covers_all(vms.addrs).all()]
    if not asked:
        raise InvalidArgument(f"no peer's scope holds {vms.label}: name one with --from")
    answers: dict[str, str] = {}
    started = []
    for peer in asked:
        try:
            body = send_pull(identity, trust, peer, vms, plaintext)
            answers[peer.name] = f"started (pid {body.get('pid')})"
            started.append(peer.name)
        except (SamiError, OSError) as exc:
            answers[peer.name] = str(exc)
    if json_:
        emit_json({"vms": list(vms.ips), "started": started, "answers": answers})
    else:
        for name, text in answers.items():
            typer.echo(f"{name}: {text}")
    if not started:
        raise MigrationRefused(f"no peer started a migration of {vms.label}")


def cleanup_cmd(
    ctx: typer.Context,
    vm: Annotated[list[str], typer.Option("--vm", help=VM_HELP)],
    grace: Annotated[float, typer.Option()] = 30.0,
    max_wait: Annotated[float, typer.Option()] = 3600.0,
) -> None:
    """Wait until the VM has been idle here for GRACE seconds, then delete its state."""
    vms = VmAddrs.parse(vm)
    seconds("--grace", grace, 0, MAX_WAIT_S)
    seconds("--max-wait", max_wait, 0, MAX_WAIT_S)
    with root_opts(ctx).change() as fw:
        removed = wait_and_cleanup(fw, vms, grace, max_wait, progress=typer.echo)
    typer.echo(json.dumps({"vm": vms.label, "vms": list(vms.ips), "removed": removed}))
