"""Checks of option values that click's types let through: nan, inf, huge or
negative numbers, directories given as files. Each raises InvalidArgument naming
the option, before anything is changed."""

from __future__ import annotations

import math
from pathlib import Path

from ..base.errors import InvalidArgument

MAX_INPUT_FILE = 1 << 31  # bundles and rule files are read whole; nothing larger is


def seconds(option: str, value: float, lo: float = 0.0, hi: float = 86400.0,
            lo_open: bool = False) -> float:
    """A finite number of seconds within [lo, hi] (or (lo, hi])."""
    if not math.isfinite(value) or value < lo or value > hi or (lo_open and value == lo):
        bound = "(" if lo_open else "["
        raise InvalidArgument(f"{option} must be a number of seconds in {bound}{lo:g}, {hi:g}]")
    return value


def whole(option: str, value: int, lo: int, hi: int) -> int:
    if not lo <= value <= hi:
        raise InvalidArgument(f"{option} must be a whole number in [{lo}, {hi}]")
    return value


def read_input(path: Path, what: str = "file") -> bytes:
    """The whole of a regular file the operator named."""
    try:
        if not path.is_file():
            raise InvalidArgument(f"{path} is not a readable regular {what}")
        if path.stat().st_size > MAX_INPUT_FILE:
            raise InvalidArgument(f"{path} is larger than {MAX_INPUT_FILE} bytes")
        return path.read_bytes()
    except OSError as exc:
        raise InvalidArgument(f"cannot read {path}: {exc.strerror or exc}") from exc


def output_path(path: Path) -> Path:
    """A file the command may create or replace: its directory exists, it is no directory."""
    if path.is_dir():
        raise InvalidArgument(f"{path} is a directory, not a file to write")
    if not path.parent.is_dir():
        raise InvalidArgument(f"cannot write {path}: {path.parent} is not a directory")
    return path
