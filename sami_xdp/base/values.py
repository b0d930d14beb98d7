"""Checks of operator values that a parser lets through: nan, inf, huge or negative
numbers, directories given as files. Each raises InvalidArgument naming the option
(or the config key), before anything is changed. Used by the command line and by
the host config file alike."""

from __future__ import annotations

import math
from pathlib import Path

from .errors import InvalidArgument

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


def read_input(path: Path, what: str = "file", limit: int = MAX_INPUT_FILE) -> bytes:
    """The whole of a regular file the operator named."""
    try:
        if not path.is_file():
            raise InvalidArgument(f"{path} is not a readable regular {what}")
        if path.stat().st_size > limit:
            raise InvalidArgument(f"{path} is larger than {limit} bytes")
        return path.read_bytes()
    except OSError as exc:
        raise InvalidArgument(f"cannot read {path}: {exc.strerror or exc}") from exc
