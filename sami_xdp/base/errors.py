"""Errors an operator reads: one line each, caught once at the CLI edge.

Every class is one family of failure; the CLI maps each family to its own exit code
(`sami_xdp.cli.EXIT_CODES`), so a script can tell a typo from a refused bundle.
"""

from __future__ import annotations


class SamiError(Exception):
    """Base class: the message is what the operator reads."""


class InvalidArgument(SamiError):
    """A command-line value, rule or file the operator gave is not acceptable."""


class NotAttachedError(SamiError):
    """The firewall is not attached where the command expects it."""


class NotRootError(SamiError):
    """The command needs root (CAP_BPF, CAP_NET_ADMIN)."""


class LayoutMismatchError(SamiError):
    """The pinned maps were made by a build with another map layout."""


class BpffsError(SamiError):
    """No usable bpffs directory for the pins."""


class CompileError(SamiError):
    """bcc cannot build or load the XDP program (headers, verifier)."""


class InterfaceError(SamiError):
    """A network interface is missing or cannot take the program."""


class BusyError(SamiError):
    """Another process holds what only one may hold at a time (the event reader)."""
