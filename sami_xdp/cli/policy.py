"""`samixdp acl ...` and `samixdp blacklist ...`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..base.errors import InvalidArgument
from ..base.layout import load_layout
from ..base.netutil import parse_ip
from ..policy import acl, blacklist
from .common import emit_json, root_opts, table
from .values import whole

acl_app = typer.Typer(no_args_is_help=True, help="Ordered first-match inbound rules per VM.")
bl_app = typer.Typer(
    no_args_is_help=True,
    help="Sources banned for SYN floods (an IPv6 source is banned as its /64).",
)


MAX_BAN_S = 2**32  # the largest ban time (config slots are u64, the datapath adds ns)


def register(app: typer.Typer) -> None:
    app.add_typer(acl_app, name="acl")
    app.add_typer(bl_app, name="blacklist")


@acl_app.command("add")
def acl_add(
    ctx: typer.Context,
    vm: Annotated[
        str, typer.Option(help="VM address (or prefix), IPv4 or IPv6, the rule protects.")
    ],
    proto: Annotated[str, typer.Option(help="tcp|udp|icmp|icmpv6|any")] = "any",
    dport: Annotated[str | None, typer.Option(help="Port N or range N-M.")] = None,
    src: Annotated[
        str | None, typer.Option(help="Source prefix, of the VM's family (default: any).")
    ] = None,
    vlan: Annotated[int | None, typer.Option(help="Innermost 802.1Q VID.")] = None,
    iface: Annotated[str | None, typer.Option(help="Ingress interface.")] = None,
    action: Annotated[str, typer.Option(help="allow|deny")] = "allow",
    priority: Annotated[int | None, typer.Option(help="Lower matches first.")] = None,
) -> None:
    """Add a rule; prints its id."""
    with root_opts(ctx).change() as fw:
        rule = acl.make_rule(
            fw,
            vm=vm,
            proto=proto,
            dport=dport,
            src=src,
            vlan=vlan,
            iface=iface,
            action=action,
            priority=priority,
        )
        (rule_id,) = acl.add_rules(fw, [rule])
    typer.echo(rule_id)


@acl_app.command("list")
def acl_list(
    ctx: typer.Context,
    vm: Annotated[str | None, typer.Option(help="Only rules for this VM.")] = None,
    json_: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Rules in evaluation order, with hit counters."""
    with root_opts(ctx).open() as fw:
        entries = acl.read_rules(fw) if vm is None else acl.vm_entries(fw, vm)
        rows = acl.describe(fw, entries)
    if json_:
        emit_json(rows)
        return
    table(
        [
            [
                r["id"],
                r["priority"],
                r["action"],
                r["vm"],
                r["proto"],
                r["dport"],
                r["src"],
                r["vlan"] or "-",
                r["iface"] or "-",
                r["hits"],
            ]
            for r in rows
        ],
        ["id", "prio", "action", "vm", "proto", "dport", "src", "vlan", "iface", "hits"],
    )


@acl_app.command("del")
def acl_del(ctx: typer.Context, rule_id: Annotated[int, typer.Argument(metavar="ID")]) -> None:
    """Delete rule ID."""
    whole("ID", rule_id, 1, load_layout().const("SAMIXDP_ACL_MAX_RULE_ID") - 1)
    with root_opts(ctx).change() as fw:
        if not acl.delete_rules(fw, [rule_id]):
            raise InvalidArgument(f"no ACL rule with id {rule_id}")
    typer.echo(f"deleted rule {rule_id}")


@acl_app.command("load")
def acl_load(ctx: typer.Context, file: Path) -> None:
    """Replace the whole rule set atomically from a TOML or YAML file."""
    with root_opts(ctx).change() as fw:
        rules = acl.parse_rule_file(fw, file)
        ids = acl.load_rules(fw, rules)
    typer.echo(f"loaded {len(ids)} rules from {file}")


@bl_app.command("list")
def bl_list(ctx: typer.Context, json_: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Banned sources (active first)."""
    with root_opts(ctx).open() as fw:
        rows = blacklist.blacklist_records(fw)
    if json_:
        emit_json(rows)
        return
    table(
        [
            [r["ip"], r["vm"], r["scope"], r["expires_in_s"], r["dropped"],
             "yes" if r["active"] else "expired"]
            for r in rows
        ],
        ["ip", "vm", "scope", "expires_in_s", "dropped", "active"],
    )


@bl_app.command("add")
def bl_add(
    ctx: typer.Context,
    ip: Annotated[str, typer.Argument(help="Address to ban (IPv6: its /64 is banned).")],
    seconds: Annotated[
        int | None, typer.Option("--seconds", help="Ban time (default: the `ban` setting).")
    ] = None,
    vm: Annotated[
        str | None, typer.Option(help="The VM the ban is recorded for (travels with it).")
    ] = None,
) -> None:
    """Ban IP from reaching every VM here."""
    if seconds is not None:
        whole("--seconds", seconds, 1, MAX_BAN_S)
    if vm is not None:
        parse_ip(vm)
    with root_opts(ctx).change() as fw:
        length = seconds if seconds is not None else fw.read_config()[fw.const("CFG_BAN_S")]
        banned = blacklist.ban(fw, ip, vm, length)
    typer.echo(f"banned {banned} for {length} s")


@bl_app.command("del")
def bl_del(
    ctx: typer.Context,
    ip: Annotated[str, typer.Argument(help="Banned address or IPv6 /64 (as `list` shows it).")],
) -> None:
    """Lift the ban on IP (an IPv6 address: the ban of its /64)."""
    with root_opts(ctx).change() as fw:
        if not blacklist.unban(fw, ip):
            raise InvalidArgument(f"{ip} is not on the blacklist")
    typer.echo(f"unbanned {ip}")
