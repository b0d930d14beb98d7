"""What every command module shares: the global options, JSON and table output."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

from ..base.errors import (
    BpffsError,
    BusyError,
    CompileError,
    InterfaceError,
    InvalidArgument,
    LayoutMismatchError,
    NotAttachedError,
    NotRootError,
    SamiError,
)
from ..loader.bpfsys import BpfError
from ..loader.pinned import Firewall
from ..migrate.errors import (
    BundleRefused,
    ControlError,
    IdentityError,
    ImportFailed,
    MigrateError,
    MigrationRefused,
    RollbackIncomplete,
    StateDirError,
    TransportError,
    TrustStoreError,
    UnknownMigrationError,
)
from ..migrate.recovery import recover

# The exit code of each error family, most specific first (README "Exit codes").
EXIT_CODES: tuple[tuple[type[BaseException], int, str], ...] = (
    (InvalidArgument, 2, "a bad argument, option value, rule or input file"),
    (NotAttachedError, 3, "the firewall is not attached there"),
    (NotRootError, 4, "not run as root"),
    (LayoutMismatchError, 5, "the pinned maps have another layout version"),
    (BpffsError, 6, "no usable bpffs directory for the pins"),
    (CompileError, 7, "the XDP program cannot be built or loaded (bcc, headers)"),
    (InterfaceError, 8, "an interface is missing or refuses the program"),
    (BusyError, 9, "another process holds it (the event stream has one reader at a time)"),
    (BundleRefused, 11, "a bundle failed verification (nothing loaded)"),
    (ControlError, 11, "a peer's signed control message failed verification"),
    (IdentityError, 12, "this host's key or host id is missing or unusable"),
    (TrustStoreError, 12, "the peers file or a peer entry is bad"),
    (RollbackIncomplete, 15, "an import failed and its rollback failed too"),
    (ImportFailed, 13, "an import failed and was rolled back"),
    (UnknownMigrationError, 14, "no such migration recorded here"),
    (StateDirError, 18, "the state dir (replay cache, import journal, records) is unusable"),
    (TransportError, 16, "the peer cannot be reached or the connection failed"),
    (MigrationRefused, 17, "the peer refused the migration"),
    (MigrateError, 10, "another migration failure"),
    (BpfError, 1, "a bpf(2) call failed"),
    (SamiError, 1, "another failure"),
    (OSError, 1, "a system call or file operation failed"),
)


INTERNAL_ERROR = 70  # a bug (EX_SOFTWARE): one line, SAMIXDP_DEBUG=1 for the traceback


def exit_code(exc: BaseException) -> int:
    for family, code, _ in EXIT_CODES:
        if isinstance(exc, family):
            return code
    return 1


@dataclass
class Ctx:
    """Global options, shared by every command."""

    bpffs: Path
    config_dir: Path
    state_dir: Path

    def open(self) -> Firewall:
        """The pinned firewall, for reading."""
        return Firewall.open(self.bpffs)

    def change(self) -> Firewall:
        """The pinned firewall, for a command that changes it: first an import that a
        crash (kill -9) interrupted is rolled back or completed (recovery.py)."""
        fw = Firewall.open(self.bpffs)
        try:
            recovered(fw, self.state_dir)
        except BaseException:
            fw.close()
            raise
        return fw


def recovered(fw: Firewall, state_dir: Path) -> None:
    done = recover(fw, state_dir)
    if done:
        typer.echo(f"samixdp: recovered an interrupted import: {done.describe()}", err=True)


def root_opts(ctx: typer.Context) -> Ctx:
    """The global options of this invocation (set by the root callback)."""
    obj = ctx.find_root().obj
    assert isinstance(obj, Ctx)
    return obj


def endpoint(ip: object, port: object) -> str:
    """address:port, an IPv6 address in brackets (RFC 5952 section 6)."""
    return f"[{ip}]:{port}" if ":" in str(ip) else f"{ip}:{port}"


def emit_json(data: object) -> None:
    typer.echo(json.dumps(data, indent=2, sort_keys=False))


def table(rows: list[list[Any]], header: list[str]) -> None:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=False)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    typer.echo(fmt.format(*header))
    for r in rows:
        typer.echo(fmt.format(*[str(c) for c in r]))
