"""Errors the CLI turns into one clear line and a non-zero exit."""

from __future__ import annotations


class SamiError(Exception):
    """Base class: the message is what the operator reads."""

    exit_code = 1


class NotRootError(SamiError):
    exit_code = 4


class NotAttachedError(SamiError):
    exit_code = 3


class LayoutMismatchError(SamiError):
    exit_code = 5


class BpffsError(SamiError):
    exit_code = 6


class CompileError(SamiError):
    exit_code = 7


class InterfaceError(SamiError):
    exit_code = 8


class InvalidArgument(SamiError):
    exit_code = 2
