"""`samixdp`: the operator's command line. It parses, calls and prints.

Every command reopens the pinned state under --bpffs; errors become one line
on stderr and the exit code of their family (`common.EXIT_CODES`), caught once
here in main(). One module per command group: firewall, events, policy, trust,
migrate, ops.
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from ..base.errors import SamiError
from ..loader import bpffs
from ..loader.bpfsys import BpfError
from . import drain, events, firewall, migrate, ops, policy, trust
from .common import INTERNAL_ERROR, Ctx, exit_code

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
        typer.Option(envvar="SAMIXDP_CONFIG_DIR", help="Host key, peers, samixdp.toml."),
    ] = Path("/etc/samixdp"),
    state_dir: Annotated[
        Path,
        typer.Option(envvar="SAMIXDP_STATE_DIR", help="Replay cache, migration records."),
    ] = Path("/var/lib/samixdp"),
) -> None:
    ctx.obj = Ctx(bpffs=bpffs.resolve(bpffs_dir), config_dir=config_dir, state_dir=state_dir)


firewall.register(app)
events.register(app)
policy.register(app)
trust.register(app)
migrate.register(app)
drain.register(app)
ops.register(app)


def main() -> None:
    try:
        code = app(standalone_mode=False)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        typer.echo("samixdp: error: interrupted", err=True)
        sys.exit(130)
    except typer.TyperException as exc:  # a usage error (click's), on one line
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:
            typer.echo(ctx.get_help())
            sys.exit(2)
        text = " ".join(getattr(exc, "format_message", exc.__str__)().split())
        typer.echo(f"samixdp: error: {text}", err=True)
        sys.exit(getattr(exc, "exit_code", 2))
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
    except Exception as exc:  # a bug: still one line, unless asked for the traceback
        if os.environ.get("SAMIXDP_DEBUG"):
            raise
        text = " ".join(str(exc).split())[:300]
        typer.echo(
            f"samixdp: internal error: {type(exc).__name__}: {text} "
            "(a bug; SAMIXDP_DEBUG=1 shows the traceback)",
            err=True,
        )
        sys.exit(INTERNAL_ERROR)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
