"""`samixdp keys ...` (this host's identity) and `samixdp peers ...` (whom it trusts)."""

from __future__ import annotations

from typing import Annotated

import typer

from ..migrate.keys import HostIdentity
from ..migrate.peers import TrustStore, parse_scope, scope_text
from .common import emit_json, root_opts, table

keys_app = typer.Typer(no_args_is_help=True, help="This host's Ed25519 identity.")
peers_app = typer.Typer(no_args_is_help=True, help="Trusted peer hosts and their keys.")


def register(app: typer.Typer) -> None:
    app.add_typer(keys_app, name="keys")
    app.add_typer(peers_app, name="peers")


# ---- keys ---------------------------------------------------------------------------


@keys_app.command("init")
def keys_init(
    ctx: typer.Context,
    host_id: Annotated[
        str | None, typer.Option("--host-id", help="This host's name (default: hostname).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing key.")] = False,
) -> None:
    """Create this host's Ed25519 key pair (private key mode 0600) and host id."""
    c = root_opts(ctx)
    ident = HostIdentity.init(c.config_dir, host_id, force=force)
    typer.echo(f"host id {ident.host_id}, key id {ident.key_id.hex()} ({c.config_dir})")
    typer.echo(f"public key {ident.public_b64}")


@keys_app.command("show")
def keys_show(
    ctx: typer.Context,
    json_: Annotated[bool, typer.Option("--json", help="Host id, key id and key.")] = False,
    host_id: Annotated[bool, typer.Option("--host-id", help="Print the host id alone.")] = False,
) -> None:
    """Print this host's public key alone on one line (base64)."""
    ident = HostIdentity.load(root_opts(ctx).config_dir)
    if json_:
        emit_json(
            {"host_id": ident.host_id, "key_id": ident.key_id.hex(), "public_key": ident.public_b64}
        )
    elif host_id:
        typer.echo(ident.host_id)
    else:
        typer.echo(ident.public_b64)


# ---- peers --------------------------------------------------------------------------


@peers_app.command("add")
def peers_add(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The peer's host id.")],
    address: Annotated[str, typer.Option("--address", help="HOST:PORT of its agent.")],
    key: Annotated[str, typer.Option("--key", help="Its public key (`keys show` there).")],
    vms: Annotated[
        str,
        typer.Option(
            "--vms",
            help="VM prefixes (either family) it may send state for: PREFIX[,PREFIX...] "
            "(default none). A VM of several addresses needs all of them inside.",
        ),
    ] = "",
    replace: Annotated[bool, typer.Option("--replace", help="Change an existing peer.")] = False,
) -> None:
    """Trust a peer: bundles signed by KEY, naming NAME as source, for a VM in --vms."""
    trust = TrustStore.load(root_opts(ctx).config_dir)
    peer = trust.add(name, address, key, replace=replace, vms=parse_scope(vms))
    trust.save()
    typer.echo(
        f"peer {peer.name} at {peer.address}, key id {peer.key_id.hex()}, "
        f"vms {scope_text(peer.vms)}"
    )


@peers_app.command("set-vms")
def peers_set_vms(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The peer's host id.")],
    prefixes: Annotated[
        str,
        typer.Argument(
            help="PREFIX[,PREFIX...] (either family) it may send state for ('none': no VM)."
        ),
    ],
) -> None:
    """Change which VM prefixes a peer may send state for."""
    scope = parse_scope(prefixes)
    trust = TrustStore.load(root_opts(ctx).config_dir)
    peer = trust.set_vms(name, scope)
    trust.save()
    typer.echo(f"peer {peer.name} may send state for: {scope_text(peer.vms)}")


@peers_app.command("remove")
def peers_remove(
    ctx: typer.Context, name: Annotated[str, typer.Argument(help="The peer's host id.")]
) -> None:
    """Stop trusting a peer."""
    trust = TrustStore.load(root_opts(ctx).config_dir)
    trust.remove(name)
    trust.save()
    typer.echo(f"removed peer {name}")


@peers_app.command("list")
def peers_list(ctx: typer.Context, json_: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Trusted peers."""
    found = TrustStore.load(root_opts(ctx).config_dir).peers()
    if json_:
        emit_json([p.as_dict() for p in found])
        return
    if not found:
        typer.echo("no peers (add one with `samixdp peers add NAME --address HOST:PORT --key K`)")
        return
    table(
        [
            [p.name, p.address, p.key_id.hex(), p.public_b64, scope_text(p.vms)]
            for p in found
        ],
        ["name", "address", "key_id", "public_key", "vms"],
    )
