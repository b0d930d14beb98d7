"""`samixdp drain`: move every protected VM (or those in --vms prefixes) to peers,
a bounded number at a time, with a progress bar and one report."""

from __future__ import annotations

import contextlib
import socket
import sys
import threading
from pathlib import Path
from typing import Annotated, Any

import typer

from ..base.errors import InvalidArgument
from ..base.netutil import parse_network
from ..loader import bpffs
from ..migrate import localproto
from ..migrate.drain import DrainItem, DrainReport, plan, read_mapping, run_drain, vm_addresses
from ..migrate.errors import MigrateError, MigrationRefused
from ..migrate.peers import TrustStore
from ..migrate.phases import MigrateOptions, resolve_peer
from ..migrate.runner import MigrationRunner
from ..migrate.sharedscan import SharedScan
from .common import emit_json, root_opts, table
from .values import read_input, seconds, whole

MAX_PARALLEL = 256
BAR = 30


def register(app: typer.Typer) -> None:
    app.command("drain")(drain_cmd)


class Bar:
    """The drain's progress on stderr: one bar redrawn on a terminal, else a line
    for each VM that ends."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.done = 0

    def __call__(self, items: list[DrainItem]) -> None:
        if not self.enabled:
            return
        ended = [i for i in items if i.outcome not in ("waiting", "running")]
        running = sum(1 for i in items if i.outcome == "running")
        failed = sum(1 for i in ended if i.outcome != "completed")
        n = len(items)
        if self.tty:
            fill = BAR * len(ended) // max(n, 1)
            sys.stderr.write(f"\rdrain [{'#' * fill}{'.' * (BAR - fill)}] {len(ended)}/{n} "
                             f"done, {running} running, {failed} failed ")
            if len(ended) == n:
                sys.stderr.write("\n")
            sys.stderr.flush()
            return
        for item in ended[self.done:]:
            typer.echo(f"drain: {len(ended)}/{n} {item.vms.label} -> {item.peer}: "
                       f"{item.outcome} ({item.seconds:.2f} s)", err=True)
        self.done = len(ended)


def _print(report: DrainReport) -> None:
    d = report.as_dict()
    rows = [[r["vm"], r["peer"], r["outcome"][:60], r["sessions"], r["bytes"],
             r["phases"].get("full copy", "-"), f"{r['seconds'] * 1000:.0f}"] for r in d["vms"]]
    table(rows, ["vm", "peer", "outcome", "sessions", "bytes", "full ms", "total ms"])
    typer.echo(f"drained {d['completed']} of {len(d['vms'])} VMs in {d['seconds']:.2f} s "
               f"({d['sessions']} sessions, {d['bytes']} bytes, {d['parallel']} at once, "
               f"run by {'the agent' if d['via'] == 'agent' else 'this command'})")


def drain_cmd(
    ctx: typer.Context,
    peer: Annotated[list[str] | None, typer.Option(
        "--peer", help="Destination NAME; repeat to spread the VMs over several.")] = None,
    map_file: Annotated[Path | None, typer.Option(
        "--map", help="File of 'ADDR[,ADDR...] PEER' lines: each VM's addresses and "
        "destination.")] = None,
    vms: Annotated[list[str] | None, typer.Option(
        "--vms", help="Only VMs inside this PREFIX (repeatable).")] = None,
    parallel: Annotated[int, typer.Option(help="Migrations at once.")] = 8,
    rounds: Annotated[int, typer.Option(help="Delta rounds before the final one.")] = 1,
    interval: Annotated[float, typer.Option(help="Seconds between delta rounds.")] = 0.5,
    source_grace: Annotated[float, typer.Option(help="Idle seconds before source cleanup.")] = 30.0,
    keep_source: Annotated[
        bool, typer.Option("--keep-source", help="Never delete the VMs' state here.")] = False,
    compress: Annotated[bool, typer.Option("--compress", help="zlib the bundle bodies.")] = False,
    plaintext: Annotated[
        bool, typer.Option("--plaintext", help="No TLS, for agents run with --plaintext.")
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show which VM goes where; move nothing.")] = False,
    json_: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Move every protected VM of this host (or those in --vms) to peers, --parallel at
    a time; one VM's failure ends only its own migration. Exits non-zero when a VM
    did not move."""
    c = root_opts(ctx)
    whole("--parallel", parallel, 1, MAX_PARALLEL)
    whole("--rounds", rounds, 0, 10_000)
    seconds("--interval", interval, 0, 3600)
    seconds("--source-grace", source_grace, 0, 7 * 86400)
    try:
        within = [parse_network(p) for p in vms or []]
    except ValueError as exc:
        raise InvalidArgument(f"--vms: {exc}") from exc
    if not peer and map_file is None:
        raise InvalidArgument("name the destination: --peer NAME (repeatable) or --map FILE")
    text = read_input(map_file, "mapping file").decode(errors="replace") if map_file else ""
    bpffs.require_root()
    trust = TrustStore.load(c.config_dir)
    peers = [resolve_peer(trust, p) for p in dict.fromkeys(peer or [])]
    mapping = [(v, resolve_peer(trust, name))
               for v, name in (read_mapping(map_file, text) if map_file else [])]
    with c.open() as fw:
        found = vm_addresses(fw, within)
    if within:
        mapping = [(v, p) for v, p in mapping if v.ips[0] in set(found)]
    items = plan(found, peers, mapping)
    opts = MigrateOptions(delta_rounds=rounds, interval_s=interval, source_grace_s=source_grace,
                          keep_source=keep_source, compression="zlib" if compress else "none",
                          plaintext=plaintext)
    if dry_run or not items:
        report = DrainReport(items, parallel=parallel, via="none")
        for item in items:
            item.outcome = "planned"
        if json_:
            emit_json(report.as_dict())
        elif not items:
            typer.echo("nothing to drain: no protected VM with state here"
                       + (f" inside {', '.join(map(str, within))}" if within else ""))
        else:
            table([[i.vms.label, i.peer] for i in items], ["vm", "peer"])
        return
    bar = Bar(not json_)
    with localproto.connect(c.state_dir) as probe:
        via_agent = probe is not None
    try:
        if via_agent:
            report = _through_agent(c.state_dir, items, opts, parallel, bar)
        else:
            report = _in_process(c, items, opts, parallel, bar)
    except KeyboardInterrupt as exc:
        raise MigrationRefused("drain interrupted: running migrations aborted, the rest "
                               "not started") from exc
    if json_:
        emit_json(report.as_dict())
    else:
        _print(report)
    if report.failed:
        first = report.failed[0]
        raise MigrateError(f"{len(report.failed)} of {len(items)} VMs did not move (first: "
                           f"{first.vms.label}: {first.outcome.removeprefix('failed: ')})")


def _through_agent(state_dir: Path, items: list[DrainItem], opts: MigrateOptions,
                   parallel: int, bar: Bar) -> DrainReport:
    """Each VM one request on its own connection to the agent; closing them
    aborts what runs."""
    open_socks: set[socket.socket] = set()
    lock = threading.Lock()

    def one(item: DrainItem) -> dict[str, Any]:
        with localproto.connect(state_dir) as sock:
            if sock is None:
                raise MigrateError("the agent stopped answering")
            with lock:
                open_socks.add(sock)
            try:
                request = {"op": "migrate", "vms": list(item.vms.ips), "peer": item.peer,
                           "options": localproto.options_doc(opts)}
                return dict(localproto.ask(sock, request)["report"])
            finally:
                with lock:
                    open_socks.discard(sock)

    def interrupt() -> None:
        with lock:
            for sock in open_socks:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    return run_drain(items, parallel, one, bar, interrupt)


def _in_process(c: Any, items: list[DrainItem], opts: MigrateOptions, parallel: int,
                bar: Bar) -> DrainReport:
    """No agent here: this process runs the migrations, as threads sharing what the
    agent's would (one dirty-log group, one scan per batch)."""
    trust = TrustStore.load(c.config_dir)
    with c.change() as fw:
        scan = SharedScan(fw)
        runner = MigrationRunner(fw, c.config_dir, c.state_dir, select=scan.select,
                                 cleanup_bpffs=c.bpffs)

        def one(item: DrainItem) -> dict[str, Any]:
            return runner.run(resolve_peer(trust, item.peer), item.vms, opts).as_dict()

        def interrupt() -> None:
            for mig in list(runner.running.values()):
                mig.stop("the drain was interrupted")

        report = run_drain(items, parallel, one, bar, interrupt)
    report.via = "process"
    return report
