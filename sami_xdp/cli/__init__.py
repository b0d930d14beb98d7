"""`samixdp`: the operator's command line. It parses, calls and prints.

Every command reopens the pinned state under --bpffs; errors become one line
on stderr and the exit code of their family (`common.EXIT_CODES`), caught once
here in main(). One module per command group: firewall, policy, trust, migrate.
"""

from __future__ import annotations

import errno
import sys
from pathlib import Path
from typing import Annotated

import typer

from ..base.errors import SamiError
from ..loader import bpffs
from ..loader.bpfsys import BpfError
from . import firewall, migrate, policy, trust
from .common import Ctx, exit_code

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="sami-xdp: XDP stateful firewall whose state follows a VM across live migration.",
)


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


firewall.register(app)
policy.register(app)
trust.register(app)
migrate.register(app)


def main() -> None:
    try:
        app()
    except SamiError as exc:
        typer.echo(f"samixdp: error: {exc}", err=True)
        sys.exit(exit_code(exc))
    except BpfError as exc:
        hint = " (are you root?)" if exc.errno in (errno.EPERM, errno.EACCES) else ""
        typer.echo(f"samixdp: error: {exc.strerror}{hint}", err=True)
        sys.exit(exit_code(exc))
    except OSError as exc:
        typer.echo(f"samixdp: error: {exc.strerror or exc}", err=True)
        sys.exit(exit_code(exc))


if __name__ == "__main__":
    main()
