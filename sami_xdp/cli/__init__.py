"""`samixdp`: the operator's command line.

Every command reopens the pinned state under --bpffs; errors become one line
on stderr and a non-zero exit, caught once here in main().
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from . import blacklist, protect, sessions, stats
from .config import config_names, parse_config_value
from .errors import InvalidArgument, SamiError
from .loader import attach as xdp
from .loader import bpffs
from .loader.bpfsys import BpfError
from .loader.compile import Limits
from .loader.pinned import Firewall, unpin_all

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="sami-xdp: XDP stateful firewall whose state follows a VM across live migration.",
)
config_app = typer.Typer(no_args_is_help=True, help="Show or change runtime settings.")
app.add_typer(config_app, name="config")


@dataclass
class Ctx:
    """Global options, shared by every command."""

    bpffs: Path
    config_dir: Path
    state_dir: Path

    def open(self) -> Firewall:
        return Firewall.open(self.bpffs)


def _ctx(ctx: typer.Context) -> Ctx:
    obj = ctx.find_root().obj
    assert isinstance(obj, Ctx)
    return obj


@app.callback()
def _root(
    ctx: typer.Context,
    bpffs_dir: Annotated[
        str | None,
        typer.Option("--bpffs", envvar="SAMIXDP_BPFFS", help="bpffs directory of the pins."),
    ] = None,
    config_dir: Annotated[
        Path,
        typer.Option(envvar="SAMIXDP_CONFIG_DIR", help="Host key, peers."),
    ] = Path("/etc/samixdp"),
    state_dir: Annotated[
        Path,
        typer.Option(envvar="SAMIXDP_STATE_DIR", help="Replay cache, migration records."),
    ] = Path("/var/lib/samixdp"),
) -> None:
    ctx.obj = Ctx(bpffs=bpffs.resolve(bpffs_dir), config_dir=config_dir, state_dir=state_dir)


def emit_json(data: object) -> None:
    typer.echo(json.dumps(data, indent=2, sort_keys=False))


def table(rows: list[list[Any]], header: list[str]) -> None:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=False)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    typer.echo(fmt.format(*header))
    for r in rows:
        typer.echo(fmt.format(*[str(c) for c in r]))


def _parse_rate(value: str) -> int:
    text = value.removesuffix("/s")
    try:
        rate = int(text)
    except ValueError as exc:
        raise InvalidArgument(f"--syn-rate needs N or N/s, got {value!r}") from exc
    if rate < 1:
        raise InvalidArgument("--syn-rate must be at least 1")
    return rate


# ---- attach / detach / status ----------------------------------------------


@app.command("attach")
def attach_cmd(
    ctx: typer.Context,
    iface: Annotated[str, typer.Argument(help="Interface to filter.")],
    protect_: Annotated[
        list[str] | None,
        typer.Option("--protect", help="VM prefix behind this host (repeatable)."),
    ] = None,
    mode: Annotated[str, typer.Option(help="auto|native|generic")] = "auto",
    syn_rate: Annotated[
        str | None, typer.Option("--syn-rate", help="SYNs/s per source and VM before a ban.")
    ] = None,
    ban: Annotated[int | None, typer.Option(help="Ban time in seconds.")] = None,
    max_sessions: Annotated[int, typer.Option(help="Session table size (first attach).")] = 1 << 20,
    max_halfopen: Annotated[int, typer.Option(help="Half-open LRU size (first attach).")] = 1 << 16,
) -> None:
    """Load the firewall (once per host) and attach it to IFACE."""
    c = _ctx(ctx)
    if mode not in xdp.MODES:
        raise InvalidArgument(f"--mode must be one of {', '.join(xdp.MODES)}, got {mode!r}")
    nets = [protect.parse_network(p) for p in (protect_ or [])]
    rate = _parse_rate(syn_rate) if syn_rate is not None else None
    if ban is not None and ban < 1:
        raise InvalidArgument("--ban must be at least 1 second")
    bpffs.require_root()
    xdp.query(iface)  # fails early and clearly for a missing interface
    limits = Limits(max_sessions=max_sessions, max_halfopen=max_halfopen)
    with Firewall.create(c.bpffs, limits) as fw:
        for net in nets:
            protect.add_protected(fw, str(net))
        if rate is not None:
            fw.set_config(fw.const("CFG_SYN_RATE"), rate)
        if ban is not None:
            fw.set_config(fw.const("CFG_BAN_S"), ban)
        state = xdp.attach(iface, fw.prog_fd, fw.prog_id(), mode)
        typer.echo(f"attached to {iface} in {state.mode} mode (program id {state.prog_id})")


@app.command("detach")
def detach_cmd(ctx: typer.Context, iface: str) -> None:
    """Detach the firewall from IFACE (state stays pinned)."""
    bpffs.require_root()
    xdp.query(iface)
    with _ctx(ctx).open() as fw:
        xdp.detach(iface, fw.prog_fd, fw.prog_id())
    typer.echo(f"detached from {iface}")


@app.command("reset")
def reset_cmd(
    ctx: typer.Context,
    yes: Annotated[bool, typer.Option("--yes", help="Confirm: all state is lost.")] = False,
) -> None:
    """Unpin the program and every map (only when attached nowhere here)."""
    c = _ctx(ctx)
    bpffs.require_root()
    if not yes:
        raise InvalidArgument("reset deletes all firewall state: add --yes to confirm")
    if Firewall.exists(c.bpffs):
        try:
            with c.open() as fw:
                still = xdp.list_attached(fw.prog_id())
        except SamiError:
            still = []  # an unreadable (old layout) state may always be removed
        if still:
            names = ", ".join(s.ifname for s in still)
            raise InvalidArgument(f"still attached to {names}: detach first")
    n = unpin_all(c.bpffs)
    typer.echo(f"removed {n} pinned objects from {c.bpffs}")


def _status(fw: Firewall) -> dict[str, object]:
    ifaces = [
        {"ifname": s.ifname, "ifindex": s.ifindex, "mode": s.mode}
        for s in xdp.list_attached(fw.prog_id())
    ]
    maps = {
        name: {
            "type": m.info.type_name,
            "max_entries": m.info.max_entries,
            "entries": m.count(),
        }
        for name, m in fw.maps.items()
        if name not in ("config", "meta", "verdicts", "acl_hits")
    }
    slots = fw.read_config()
    return {
        "bpffs": str(fw.path),
        "layout_version": int(fw.meta()["layout_version"]),
        "program_id": fw.prog_id(),
        "interfaces": ifaces,
        "protected": [str(n) for n in protect.list_protected(fw)],
        "maps": maps,
        "config": {name: slots[idx] for name, idx in config_names(fw.layout).items()},
    }


@app.command("status")
def status_cmd(ctx: typer.Context, json_: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Interfaces, program, map fill levels, layout version."""
    with _ctx(ctx).open() as fw:
        st = _status(fw)
    if json_:
        emit_json(st)
        return
    typer.echo(f"bpffs {st['bpffs']}  layout v{st['layout_version']}  program {st['program_id']}")
    ifaces = st["interfaces"]
    assert isinstance(ifaces, list)
    typer.echo(
        "interfaces: "
        + (", ".join(f"{i['ifname']} ({i['mode']})" for i in ifaces) or "none in this netns")
    )
    prot = st["protected"]
    assert isinstance(prot, list)
    typer.echo("protected: " + (", ".join(prot) or "none"))
    maps = st["maps"]
    assert isinstance(maps, dict)
    table(
        [[n, m["type"], m["entries"], m["max_entries"]] for n, m in maps.items()],
        ["map", "type", "entries", "capacity"],
    )


# ---- sessions / stats / gc -------------------------------------------------


@app.command("sessions")
def sessions_cmd(
    ctx: typer.Context,
    vm: Annotated[
        str | None, typer.Option(help="Only sessions with this VM at either end.")
    ] = None,
    json_: Annotated[bool, typer.Option("--json")] = False,
    limit: Annotated[int, typer.Option(help="Rows in the human table (0 = all).")] = 50,
) -> None:
    """List sessions (src = initiator)."""
    if vm is not None:
        protect.parse_network(vm)
    with _ctx(ctx).open() as fw:
        tbl = sessions.read_sessions(fw)
        if vm is not None:
            tbl = tbl.select(sessions.vm_mask(tbl.keys, vm))
        shown = tbl if json_ or limit == 0 else tbl.select(slice(0, limit))  # type: ignore[arg-type]
        rows = sessions.session_records(shown)
    if json_:
        emit_json(rows)
        return
    table(
        [
            [
                r["proto"],
                f"{r['src']}:{r['sport']}",
                f"{r['dst']}:{r['dport']}",
                r["state"],
                r["age_s"],
                r["idle_s"],
                r["packets"],
                r["bytes"],
            ]
            for r in rows
        ],
        ["proto", "src", "dst", "state", "age_s", "idle_s", "packets", "bytes"],
    )
    if len(rows) < len(tbl):
        typer.echo(f"... {len(tbl) - len(rows)} more (use --limit 0 or --json)")
    else:
        typer.echo(f"{len(tbl)} sessions")


@app.command("stats")
def stats_cmd(
    ctx: typer.Context,
    json_: Annotated[bool, typer.Option("--json")] = False,
    bytes_: Annotated[bool, typer.Option("--bytes", help="Include byte counts.")] = False,
) -> None:
    """Verdict counters by reason."""
    with _ctx(ctx).open() as fw:
        full = stats.read_verdicts(fw)
    if json_:
        emit_json(full if bytes_ else {k: v["packets"] for k, v in full.items()})
        return
    table([[k, v["packets"], v["bytes"]] for k, v in full.items()], ["reason", "packets", "bytes"])


@app.command("gc")
def gc_cmd(ctx: typer.Context) -> None:
    """Delete expired sessions in batches."""
    with _ctx(ctx).open() as fw:
        removed = sessions.gc(fw)
        removed.update(blacklist.gc(fw))
    total = sum(removed.values())
    detail = ", ".join(f"{k} {v}" for k, v in removed.items())
    typer.echo(f"removed {total} expired entries ({detail})")


# ---- protected prefixes and config -----------------------------------------


@app.command("protect")
def protect_cmd(
    ctx: typer.Context,
    cidr: str,
    remove: Annotated[bool, typer.Option("--remove")] = False,
) -> None:
    """Add (or --remove) a protected VM prefix."""
    with _ctx(ctx).open() as fw:
        if remove:
            if not protect.remove_protected(fw, cidr):
                raise InvalidArgument(f"{cidr} is not protected")
            typer.echo(f"no longer protecting {cidr}")
        else:
            typer.echo(f"protecting {protect.add_protected(fw, cidr)}")


@config_app.command("show")
def config_show(ctx: typer.Context, json_: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Current settings."""
    with _ctx(ctx).open() as fw:
        slots = fw.read_config()
        values = {name: slots[idx] for name, idx in config_names(fw.layout).items()}
    if json_:
        emit_json(values)
    else:
        table([[k, v] for k, v in values.items()], ["name", "value"])


@config_app.command("set")
def config_set(ctx: typer.Context, name: str, value: str) -> None:
    """Change a setting live, e.g. `config set syn-rate 500`, `config set ban 120`."""
    with _ctx(ctx).open() as fw:
        names = config_names(fw.layout)
        if name not in names:
            raise InvalidArgument(f"unknown setting {name!r}; known: {', '.join(names)}")
        number = parse_config_value(name, value.removesuffix("/s") if name == "syn-rate" else value)
        fw.set_config(names[name], number)
    typer.echo(f"{name} = {value}")


def _register_optional() -> None:
    """Policy and migration commands live in their own modules."""
    import importlib

    for mod in ("sami_xdp.cli_policy", "sami_xdp.cli_migrate", "sami_xdp.cli_agent"):
        try:
            module = importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name != mod:
                raise
            continue
        module.register(app)


_register_optional()


def main() -> None:
    try:
        app()
    except SamiError as exc:
        typer.echo(f"samixdp: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except BpfError as exc:
        hint = " (are you root?)" if exc.errno in (1, 13) else ""
        typer.echo(f"samixdp: error: {exc.strerror}{hint}", err=True)
        sys.exit(1)
    except OSError as exc:
        typer.echo(f"samixdp: error: {exc.strerror or exc}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
