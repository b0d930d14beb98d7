"""Running sami-xdp as a host service: `apply` (the host config file)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..ops import apply as host
from ..ops.apply import Change
from ..ops.hostconfig import CONFIG_FILE
from .common import emit_json, root_opts


def register(app: typer.Typer) -> None:
    app.command("apply")(apply_cmd)


def apply_cmd(
    ctx: typer.Context,
    check: Annotated[
        bool, typer.Option("--check", help="Check the file and print the plan; change nothing.")
    ] = False,
    file: Annotated[
        Path | None,
        typer.Option("--file", help=f"The host config (default: <config-dir>/{CONFIG_FILE})."),
    ] = None,
    json_: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Make this host's firewall what the host config file says (idempotent)."""
    c = root_opts(ctx)
    path = file if file is not None else c.config_dir / CONFIG_FILE
    if check:
        plan = host.check(path, c.bpffs, c.state_dir)
        if json_:
            emit_json(plan.as_dict(check=True))
            return
        for change in plan.changes:
            typer.echo(f"would {change.text}")
        typer.echo(
            f"{path} is valid; the host is in sync: nothing to change" if plan.in_sync
            else f"{path} is valid; {len(plan.changes)} changes would bring the host in sync"
        )
        return

    def said(change: Change) -> None:
        if not json_:
            typer.echo(change.text)

    done = host.apply(path, c.bpffs, c.state_dir, report=said)
    if done.recovery:
        typer.echo(
            f"samixdp: recovered an interrupted import: {done.recovery.describe()}", err=True
        )
    if json_:
        emit_json(done.plan.as_dict(check=False))
    elif done.plan.in_sync:
        typer.echo("nothing to change")
    else:
        typer.echo(f"{len(done.plan.changes)} changes made")
