"""Typed reading of the fields of a control message body (JSON from a peer).

Every getter returns the value with its type and range checked, or raises
FieldError naming the field: a refusal, never an exception further down (a
migration id that is not hex, a session count that is a string)."""

from __future__ import annotations

import re
from typing import Any

from ..base.errors import InvalidArgument
from ..base.netutil import canonical_ip
from .errors import ControlError
from .vmset import MAX_VM_ADDRS, VmAddrs

_HEX32 = re.compile(r"[0-9a-f]{32}")
MAX_TEXT = 4096


class FieldError(ControlError):
    """A control message field is missing or holds a bad value."""

    def __init__(self, field: str, why: str) -> None:
        super().__init__(f"bad field {field!r}: {why}")
        self.field = field


def want_int(body: dict[str, Any], field: str, lo: int = 0, hi: int = 2**32 - 1) -> int:
    value = body.get(field)
    if isinstance(value, bool) or not isinstance(value, int):
        raise FieldError(field, f"expected an integer, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise FieldError(field, f"{value} is outside [{lo}, {hi}]"[:200])
    return value


def want_bool(body: dict[str, Any], field: str) -> bool:
    value = body.get(field)
    if not isinstance(value, bool):
        raise FieldError(field, f"expected true or false, got {type(value).__name__}")
    return value


def want_str(body: dict[str, Any], field: str, max_len: int = MAX_TEXT) -> str:
    value = body.get(field)
    if not isinstance(value, str):
        raise FieldError(field, f"expected a string, got {type(value).__name__}")
    if len(value) > max_len:
        raise FieldError(field, f"longer than {max_len} characters")
    return value


def want_mid(body: dict[str, Any], field: str = "migration_id") -> bytes:
    value = want_str(body, field, 64)
    if not _HEX32.fullmatch(value):
        raise FieldError(field, "expected 32 lower-case hex digits")
    return bytes.fromhex(value)


def want_ip(body: dict[str, Any], field: str) -> str:
    """An address of either family, as canonical text."""
    value = want_str(body, field, 64)
    try:
        return canonical_ip(value)
    except InvalidArgument:
        raise FieldError(field, f"not an IP address: {value!r}") from None


def want_vms(body: dict[str, Any], field: str = "vms") -> VmAddrs:
    """A VM's addresses: a list of 1 to MAX_VM_ADDRS addresses, each once."""
    value = body.get(field)
    if not isinstance(value, list):
        raise FieldError(field, f"expected a list of addresses, got {type(value).__name__}")
    if not 0 < len(value) <= MAX_VM_ADDRS:
        raise FieldError(field, f"expected 1 to {MAX_VM_ADDRS} addresses, got {len(value)}")
    ips = [want_ip({field: v}, field) for v in value]
    try:
        return VmAddrs.parse(ips, field)
    except InvalidArgument as exc:
        raise FieldError(field, str(exc).removeprefix(f"{field}: ")) from None


def want_counts(body: dict[str, Any], field: str) -> dict[str, int]:
    """A flat {name: non-negative integer} object (counts in acknowledgements)."""
    value = body.get(field, {})
    if not isinstance(value, dict) or len(value) > 64:
        raise FieldError(field, "expected an object of at most 64 counts")
    out = {}
    for k, v in value.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 0 or len(k) > 64:
            raise FieldError(field, f"bad count {k!r}"[:200])
        out[k] = v
    return out
