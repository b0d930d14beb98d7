"""Offline migration commands: keys, peers, export, import, bundle inspect, imports.

Registered into the main `samixdp` app by sami_xdp.cli (`register(app)`).
Global options come from the root context: --config-dir (host key, peers),
--state-dir (replay cache, import records), --bpffs (the maps).
Errors are SamiError subclasses: cli.main() prints them as one line and
exits with their code.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from .errors import InvalidArgument
from .migrate import (
    ExportState,
    HostIdentity,
    ReplayCache,
    TrustStore,
    abort_import,
    build_bundle,
    import_vm_state,
    new_migration_id,
    verify_bundle,
)
from .migrate.bundle import COMPRESSIONS, DEFAULT_VALIDITY_S, MAX_VALIDITY_S
from .migrate.errors import UnknownMigrationError
from .migrate.importer import DEFAULT_PICKUP_S, ImportRecords
from .migrate.replay import REPLAY_FILE
from .migrate.verify import inspect_bundle
from .netutil import ip_to_be32

keys_app = typer.Typer(no_args_is_help=True, help="This host's Ed25519 identity.")
peers_app = typer.Typer(no_args_is_help=True, help="Trusted peer hosts and their keys.")
bundle_app = typer.Typer(no_args_is_help=True, help="Look at migration bundle files.")
imports_app = typer.Typer(no_args_is_help=True, help="Migrations imported on this host.")


def _root(ctx: typer.Context) -> Any:
    """The main app's Ctx (bpffs, config_dir, state_dir, open())."""
    return ctx.find_root().obj


def _echo_json(data: object) -> None:
    typer.echo(json.dumps(data, indent=2))


def _table(rows: list[list[object]], header: list[str]) -> None:
    cols = list(zip(header, *rows, strict=False))
    widths = [max(len(str(c)) for c in col) for col in cols]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    typer.echo(fmt.format(*header))
    for r in rows:
        typer.echo(fmt.format(*[str(c) for c in r]))


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


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InvalidArgument(f"cannot read {path}: {exc.strerror}") from exc


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
    c = _root(ctx)
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
    ident = HostIdentity.load(_root(ctx).config_dir)
    if json_:
        _echo_json(
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
    replace: Annotated[bool, typer.Option("--replace", help="Change an existing peer.")] = False,
) -> None:
    """Trust a peer: bundles signed by KEY and naming NAME as source are accepted."""
    trust = TrustStore.load(_root(ctx).config_dir)
    peer = trust.add(name, address, key, replace=replace)
    trust.save()
    typer.echo(f"peer {peer.name} at {peer.address}, key id {peer.key_id.hex()}")


@peers_app.command("remove")
def peers_remove(ctx: typer.Context, name: str) -> None:
    """Stop trusting a peer."""
    trust = TrustStore.load(_root(ctx).config_dir)
    trust.remove(name)
    trust.save()
    typer.echo(f"removed peer {name}")


@peers_app.command("list")
def peers_list(ctx: typer.Context, json_: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Trusted peers."""
    peers = [p.as_dict() for p in TrustStore.load(_root(ctx).config_dir).peers()]
    if json_:
        _echo_json(peers)
        return
    if not peers:
        typer.echo("no peers (add one with `samixdp peers add NAME --address HOST:PORT --key K`)")
        return
    _table(
        [[p["name"], p["address"], p["key_id"], p["public_key"]] for p in peers],
        ["name", "address", "key_id", "public_key"],
    )


# ---- export / import ------------------------------------------------------------------


def export_cmd(
    ctx: typer.Context,
    vm: Annotated[str, typer.Option("--vm", help="The VM's IPv4 address.")],
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
    """Write a signed full-snapshot bundle of one VM's state for peer TO."""
    c = _root(ctx)
    ip_to_be32(vm)
    if compress not in COMPRESSIONS:
        raise InvalidArgument(f"--compress must be one of {', '.join(COMPRESSIONS)}")
    if not 0 < validity <= MAX_VALIDITY_S:
        raise InvalidArgument(f"--validity must be in (0, {MAX_VALIDITY_S}] seconds")
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
            vm,
            peer.name,
            seq,
            mid,
            "full",
            ExportState(),
            identity=ident,
            validity_s=validity,
            compression=compress,
            timings=timings,
        )
    _write_private(output, data)
    from .migrate.bundle import parse_bundle

    counts = parse_bundle(data).counts()
    summary = {
        "file": str(output),
        "migration_id": mid.hex(),
        "seq": seq,
        "vm": vm,
        "source": ident.host_id,
        "audience": peer.name,
        "bytes": len(data),
        "counts": counts,
        "expires_in_s": validity,
        "seconds": round(timings.get("total_s", 0.0), 4),
    }
    if json_:
        _echo_json(summary)
        return
    typer.echo(
        f"wrote {output}: {counts['sessions']} sessions, {counts['syn']} SYN counters, "
        f"{counts['blacklist']} bans, {counts['acl']} ACL rules of {vm} for {peer.name} "
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
    c = _root(ctx)
    if pickup < 0:
        raise InvalidArgument("--pickup must be >= 0")
    data = _read_file(file)
    ident = HostIdentity.load(c.config_dir)
    trust = TrustStore.load(c.config_dir)
    with ReplayCache(c.state_dir) as replay:
        # refusals need no firewall: verify first, then open the maps
        vb = verify_bundle(data, trust, ident.host_id, replay)
        with c.open() as fw:
            res = import_vm_state(fw, vb, c.state_dir, replay=replay, pickup_s=pickup)
    if json_:
        _echo_json(res.as_dict())
        return
    n = res.counts
    typer.echo(
        f"imported {res.vm} from {res.source} ({res.kind}, migration {res.migration_id} "
        f"#{res.seq}): {n['sessions']} sessions, {n['halfopen']} half-open, "
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
    json_: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Verify (without consuming the replay cache) and summarise a bundle.

    Exits 0 only when the bundle would be accepted here."""
    c = _root(ctx)
    data = _read_file(file)
    trust = TrustStore.load(c.config_dir)
    host_id = HostIdentity.load(c.config_dir).host_id if HostIdentity.exists(c.config_dir) else None
    replay = ReplayCache(c.state_dir) if (c.state_dir / REPLAY_FILE).exists() else None
    try:
        info = inspect_bundle(data, trust, host_id, replay)
    finally:
        if replay is not None:
            replay.close()
    if json_:
        _echo_json(info)
    else:
        _print_inspect(file, info)
    if not info["valid"]:
        from .migrate.errors import BundleRefused

        raise typer.Exit(BundleRefused.exit_code)


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


# ---- imports (what this host received) ----------------------------------------------------


@imports_app.command("list")
def imports_list(
    ctx: typer.Context, json_: Annotated[bool, typer.Option("--json")] = False
) -> None:
    """Migrations imported here, with their rounds."""
    recs = ImportRecords(_root(ctx).state_dir).list()
    if json_:
        _echo_json(recs)
        return
    if not recs:
        typer.echo("no imported migrations")
        return
    _table(
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
    c = _root(ctx)
    try:
        mid = bytes.fromhex(migration_id)
    except ValueError:
        mid = b""
    if len(mid) != 16:
        raise InvalidArgument("migration id must be 32 hex digits")
    if ImportRecords(c.state_dir).meta(mid) is None:
        raise UnknownMigrationError(f"no import of migration {mid.hex()} in {c.state_dir}")
    with c.open() as fw:
        counts = abort_import(fw, mid, c.state_dir)
    if json_:
        _echo_json(counts)
        return
    removed = sum(v for k, v in counts.items() if k.endswith(".removed"))
    restored = sum(v for k, v in counts.items() if k.endswith(".restored"))
    typer.echo(f"aborted {mid.hex()}: removed {removed} entries, restored {restored}")


def register(app: typer.Typer) -> None:
    app.add_typer(keys_app, name="keys")
    app.add_typer(peers_app, name="peers")
    app.add_typer(bundle_app, name="bundle")
    app.add_typer(imports_app, name="imports")
    app.command("export")(export_cmd)
    app.command("import")(import_cmd)
