"""Commands on this host's firewall: attach, detach, reset, status, sessions,
stats, gc, protect, config, metrics (the Prometheus endpoint without an agent)."""

from __future__ import annotations

import time
from typing import Annotated

import typer

from ..base.errors import InvalidArgument, SamiError
from ..base.netutil import parse_ip, parse_network
from ..loader import attach as xdp
from ..loader import bpffs
from ..loader.compile import Limits
from ..loader.pinned import Firewall, unpin_all
from ..ops.metrics import parse_listen, serve_metrics
from ..policy import blacklist, protect, roles, sessions, stats
from ..policy.config import (
    MAX_SESSIONS,
    MAX_SETTING,
    MAX_UNASSURED,
    config_names,
    create_firewall,
    parse_config_value,
    read_settings,
)
from ..policy.links import attach_link, attached_links, detach_link
from .common import emit_json, endpoint, recovered, root_opts, table
from .values import whole

config_app = typer.Typer(no_args_is_help=True, help="Show or change runtime settings.")


def register(app: typer.Typer) -> None:
    for name, fn in (
        ("attach", attach_cmd),
        ("detach", detach_cmd),
        ("reset", reset_cmd),
        ("status", status_cmd),
        ("sessions", sessions_cmd),
        ("stats", stats_cmd),
        ("gc", gc_cmd),
        ("protect", protect_cmd),
        ("metrics", metrics_cmd),
    ):
        app.command(name)(fn)
    app.add_typer(config_app, name="config")


def _parse_rate(value: str) -> int:
    text = value.removesuffix("/s")
    try:
        rate = int(text)
    except ValueError as exc:
        raise InvalidArgument(f"--syn-rate needs N or N/s, got {value!r}") from exc
    return whole("--syn-rate", rate, 1, MAX_SETTING)


# ---- attach / detach / status ----------------------------------------------


def attach_cmd(
    ctx: typer.Context,
    iface: Annotated[str, typer.Argument(help="Interface to filter.")],
    protect_: Annotated[
        list[str] | None,
        typer.Option(
            "--protect", help="VM prefix behind this host, IPv4 or IPv6 (repeatable)."
        ),
    ] = None,
    mode: Annotated[
        str,
        typer.Option(help="auto (TC on virtual devices such as veth, native XDP on NIC drivers)"
                     "|native|generic|tc"),
    ] = "auto",
    role: Annotated[
        str,
        typer.Option(
            help="What IFACE leads to, for anti-spoofing: auto (the routes say), vm, uplink."
        ),
    ] = "auto",
    syn_rate: Annotated[
        str | None, typer.Option("--syn-rate", help="SYNs/s per source and VM before a ban.")
    ] = None,
    ban: Annotated[int | None, typer.Option(help="Ban time in seconds.")] = None,
    max_sessions: Annotated[int, typer.Option(help="Session table size (first attach).")] = 1 << 20,
    max_unassured: Annotated[int, typer.Option(help="Unassured-flow LRU size (first attach).")] = 1
    << 18,
) -> None:
    """Load the firewall (once per host) and attach it to IFACE."""
    c = root_opts(ctx)
    if mode not in xdp.MODES:
        raise InvalidArgument(f"--mode must be one of {', '.join(xdp.MODES)}, got {mode!r}")
    roles.parse_role(role)
    nets = [parse_network(p) for p in (protect_ or [])]
    rate = _parse_rate(syn_rate) if syn_rate is not None else None
    if ban is not None:
        whole("--ban", ban, 1, MAX_SETTING)
    whole("--max-sessions", max_sessions, 1, MAX_SESSIONS)
    whole("--max-unassured", max_unassured, 1, MAX_UNASSURED)
    bpffs.require_root()
    xdp.query(iface)  # fails early and clearly for a missing interface
    limits = Limits(max_sessions=max_sessions, max_unassured=max_unassured)
    with create_firewall(c.bpffs, limits) as fw:
        recovered(fw, c.state_dir)
        for net in nets:
            protect.add_protected(fw, str(net))
        if rate is not None:
            fw.set_config(fw.const("CFG_SYN_RATE"), rate)
        if ban is not None:
            fw.set_config(fw.const("CFG_BAN_S"), ban)
        state = attach_link(fw, iface, mode, role)
        typer.echo(f"attached to {iface} in {state.mode} mode (program id {state.prog_id})")


def detach_cmd(ctx: typer.Context, iface: str) -> None:
    """Detach the firewall from IFACE (state stays pinned)."""
    bpffs.require_root()
    xdp.query(iface)
    with root_opts(ctx).change() as fw:
        detach_link(fw, iface)
    typer.echo(f"detached from {iface}")


def reset_cmd(
    ctx: typer.Context,
    yes: Annotated[bool, typer.Option("--yes", help="Confirm: all state is lost.")] = False,
) -> None:
    """Unpin the program and every map (only when attached nowhere here)."""
    c = root_opts(ctx)
    bpffs.require_root()
    if not yes:
        raise InvalidArgument("reset deletes all firewall state: add --yes to confirm")
    if Firewall.exists(c.bpffs):
        try:
            with c.change() as fw:
                still = xdp.list_attached(fw.programs())
        except SamiError:
            still = []  # an unreadable (old layout) state may always be removed
        if still:
            names = ", ".join(s.ifname for s in still)
            raise InvalidArgument(f"still attached to {names}: detach first")
    n = unpin_all(c.bpffs)
    typer.echo(f"removed {n} pinned objects from {c.bpffs}")


def _status(fw: Firewall) -> dict[str, object]:
    ifaces = [
        {"ifname": s.ifname, "ifindex": s.ifindex, "mode": s.mode, "role": s.role}
        for s in attached_links(fw)
    ]
    maps = {
        name: {
            "type": m.info.type_name,
            "max_entries": m.info.max_entries,
            "entries": m.count(),
        }
        for name, m in fw.maps.items()
        if name not in ("config", "meta", "verdicts", "acl_hits", "stages", "tc_stages",
                        "scratch", "clock_cache", "track", "dirty_head", "dirty_log",
                        "events", "event_budget")
    }
    return {
        "bpffs": str(fw.path),
        "layout_version": int(fw.meta()["layout_version"]),
        "program_id": fw.prog_id(),
        "tc_program_id": fw.tc_prog_id(),
        "interfaces": ifaces,
        "protected": [str(n) for n in protect.list_protected(fw)],
        "maps": maps,
        "config": read_settings(fw),
    }


def status_cmd(ctx: typer.Context, json_: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Interfaces, program, map fill levels, layout version."""
    with root_opts(ctx).open() as fw:
        st = _status(fw)
    if json_:
        emit_json(st)
        return
    typer.echo(f"bpffs {st['bpffs']}  layout v{st['layout_version']}  program {st['program_id']}")
    ifaces = st["interfaces"]
    assert isinstance(ifaces, list)
    typer.echo(
        "interfaces: "
        + (
            ", ".join(f"{i['ifname']} ({i['mode']}, role {i['role']})" for i in ifaces)
            or "none in this netns"
        )
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


def sessions_cmd(
    ctx: typer.Context,
    vm: Annotated[
        str | None,
        typer.Option(help="Only sessions with this address (IPv4 or IPv6) at either end."),
    ] = None,
    json_: Annotated[bool, typer.Option("--json")] = False,
    limit: Annotated[int, typer.Option(help="Rows in the human table (0 = all).")] = 50,
) -> None:
    """List sessions (src = initiator)."""
    whole("--limit", limit, 0, 1 << 32)
    if vm is not None:
        parse_ip(vm)
    with root_opts(ctx).open() as fw:
        tbl = sessions.read_sessions(fw)
        if vm is not None:
            tbl = tbl.select(sessions.vm_mask(tbl.keys, vm))
        shown = tbl if json_ or limit == 0 else tbl.select(slice(0, limit))
        rows = sessions.session_records(fw, shown)
    if json_:
        emit_json(rows)
        return
    table(
        [
            [
                r["proto"],
                endpoint(r["src"], r["sport"]),
                endpoint(r["dst"], r["dport"]),
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


def stats_cmd(
    ctx: typer.Context,
    json_: Annotated[bool, typer.Option("--json")] = False,
    bytes_: Annotated[bool, typer.Option("--bytes", help="Include byte counts.")] = False,
) -> None:
    """Verdict counters by reason."""
    with root_opts(ctx).open() as fw:
        full = stats.read_verdicts(fw)
    if json_:
        emit_json(full if bytes_ else {k: v["packets"] for k, v in full.items()})
        return
    table([[k, v["packets"], v["bytes"]] for k, v in full.items()], ["reason", "packets", "bytes"])


def gc_cmd(ctx: typer.Context) -> None:
    """Delete expired sessions in batches."""
    with root_opts(ctx).change() as fw:
        removed = sessions.gc(fw)
        removed.update(blacklist.gc(fw))
    total = sum(removed.values())
    detail = ", ".join(f"{k} {v}" for k, v in removed.items())
    typer.echo(f"removed {total} expired entries ({detail})")


# ---- protected prefixes and config -----------------------------------------


def protect_cmd(
    ctx: typer.Context,
    cidr: Annotated[str, typer.Argument(help="A VM prefix (IPv4 or IPv6) or address.")],
    remove: Annotated[bool, typer.Option("--remove")] = False,
) -> None:
    """Add (or --remove) a protected VM prefix (see `status` for the list)."""
    net = parse_network(cidr)
    with root_opts(ctx).change() as fw:
        if remove:
            if not protect.remove_protected(fw, str(net)):
                raise InvalidArgument(f"{net} is not protected")
            typer.echo(f"no longer protecting {net}")
        else:
            typer.echo(f"protecting {protect.add_protected(fw, str(net))}")


@config_app.command("show")
def config_show(ctx: typer.Context, json_: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Current settings."""
    with root_opts(ctx).open() as fw:
        values = read_settings(fw)
    if json_:
        emit_json(values)
    else:
        table([[k, v] for k, v in values.items()], ["name", "value"])


@config_app.command("set")
def config_set(ctx: typer.Context, name: str, value: str) -> None:
    """Change a setting live, e.g. `config set syn-rate 500`, `config set ban 120`."""
    with root_opts(ctx).change() as fw:
        names = config_names(fw.layout)
        if name not in names:
            raise InvalidArgument(f"unknown setting {name!r}; known: {', '.join(names)}")
        rate = name in ("syn-rate", "events-rate")
        number = parse_config_value(name, value.removesuffix("/s") if rate else value)
        fw.set_config(names[name], number)
    typer.echo(f"{name} = {value}")


# ---- metrics ---------------------------------------------------------------


def metrics_cmd(
    ctx: typer.Context,
    listen: Annotated[
        str,
        typer.Option(help="IP:PORT or [IPV6]:PORT (unauthenticated: keep it local)."),
    ] = "127.0.0.1:9477",
) -> None:
    """Serve Prometheus metrics of this host's firewall and outgoing migrations
    (`agent --metrics` serves the agent's counters too)."""
    c = root_opts(ctx)
    parse_listen(listen, "--listen")
    bpffs.require_root()
    srv = serve_metrics(listen, c.bpffs, c.state_dir, option="--listen")
    typer.echo(f"serving http://{srv.address}/metrics", err=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        srv.close()
