"""Checks of option values that click's types let through (base/values.py: nan,
inf, huge or negative numbers, files), and the one only a command needs: a path
to write."""

from __future__ import annotations

from pathlib import Path

from ..base.errors import InvalidArgument
from ..base.values import MAX_INPUT_FILE, read_input, seconds, whole

__all__ = ["MAX_INPUT_FILE", "output_path", "read_input", "seconds", "whole"]


def output_path(path: Path) -> Path:
    """A file the command may create or replace: its directory exists, it is no directory."""
    if path.is_dir():
        raise InvalidArgument(f"{path} is a directory, not a file to write")
    if not path.parent.is_dir():
        raise InvalidArgument(f"cannot write {path}: {path.parent} is not a directory")
    return path
