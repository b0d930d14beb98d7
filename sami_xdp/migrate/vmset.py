"""A VM is all its addresses: the address set one migration moves.

A migration (and its bundles, its records here and at the peer) names a VM by the
list of its addresses, of either family: `--vm 10.1.1.1 --vm 2001:db8:1::10`. Each
is a `struct ip_addr` in the maps (IPv4 as ::ffff:a.b.c.d) and canonical text
everywhere a person or a JSON reader sees it. The list keeps the order it was
given in; an address may appear once, and a VM has at most MAX_VM_ADDRS.

Also the vectorised address tests the migration layer needs on map rows: which
addresses are one of the VM's (`addr_isin`), and numeric order (`addr_halves`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from ..base.errors import InvalidArgument
from ..base.layout import load_layout
from ..base.netutil import IPAddress, addr_array, addrs_to_ips, canonical_ip, is_ipv4_addr

MAX_VM_ADDRS = 32  # addresses of one VM (a bundle's address table is bounded by it)
ADDR_BYTES = load_layout().sizeof("ip_addr")


def addr_rows(values: np.ndarray) -> np.ndarray:
    """`struct ip_addr` values as rows of 16 bytes (network order)."""
    return np.ascontiguousarray(values).view(np.uint8).reshape(-1, ADDR_BYTES)


Halves = tuple[np.ndarray, np.ndarray]
_MAPPED_LOW = np.uint64(0xFFFF)  # the low half of ::ffff:a.b.c.d, shifted down 32 bits


def addr_halves(values: np.ndarray) -> Halves:
    """(high, low) 64 bits of each address as numbers (one pass over the addresses):
    comparing (high, low) pairs is comparing the 128-bit addresses, as the datapath's
    addr_cmp does. Tests on many addresses take these once and then the *_halves
    functions below."""
    words = np.ascontiguousarray(values).view(">u8").reshape(-1, 2).astype(np.uint64)
    return words[:, 0], words[:, 1]


def halves_isin(v: Halves, addrs: np.ndarray) -> np.ndarray:
    hi, lo = v
    out = np.zeros(len(hi), dtype=bool)
    for h, low in zip(*addr_halves(addrs), strict=True):
        out |= (hi == h) & (lo == low)
    return out


def halves_lt(a: Halves, b: Halves) -> np.ndarray:
    """a < b, element-wise, as 128-bit numbers."""
    return (a[0] < b[0]) | ((a[0] == b[0]) & (a[1] < b[1]))


def halves_eq(a: Halves, b: Halves) -> np.ndarray:
    return (a[0] == b[0]) & (a[1] == b[1])


def halves_ipv4(v: Halves) -> np.ndarray:
    """Which addresses are IPv4 (::ffff:a.b.c.d)."""
    return (v[0] == 0) & ((v[1] >> np.uint64(32)) == _MAPPED_LOW)


def addr_isin(values: np.ndarray, addrs: np.ndarray) -> np.ndarray:
    """Which `struct ip_addr` values are one of `addrs` (exact, vectorised)."""
    return halves_isin(addr_halves(values), addrs)


def addr_lt(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a < b, element-wise, as 128-bit numbers."""
    return halves_lt(addr_halves(a), addr_halves(b))


def addr_eq(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return halves_eq(addr_halves(a), addr_halves(b))


def first_duplicate(addrs: np.ndarray) -> int | None:
    """The index of the first address that appeared earlier in `addrs`, if any."""
    seen: set[bytes] = set()
    for i, row in enumerate(addr_rows(addrs)):
        raw = row.tobytes()
        if raw in seen:
            return i
        seen.add(raw)
    return None


def source_text(values: np.ndarray) -> list[str]:
    """How SYN counters and bans key a source, as text: an IPv4 address as it is, an
    IPv6 source as its /64 (IPV6_BAN_PLEN)."""
    plen = load_layout().const("IPV6_BAN_PLEN")
    v4 = is_ipv4_addr(values)
    return [ip if four else f"{ip}/{plen}"
            for ip, four in zip(addrs_to_ips(values), v4.tolist(), strict=True)]


@dataclass(frozen=True, eq=False)
class VmAddrs:
    """The addresses of one VM, in the order given (canonical text and map form)."""

    ips: tuple[str, ...]
    addrs: np.ndarray  # of struct ip_addr

    @classmethod
    def parse(cls, items: Iterable[str | IPAddress] | str, what: str = "--vm") -> VmAddrs:
        """From text (or address objects); InvalidArgument (one line) for a value that
        is no address, an address given twice, none, or more than MAX_VM_ADDRS."""
        given = [items] if isinstance(items, str) else list(items)
        if not given:
            raise InvalidArgument(f"{what}: at least one VM address is needed")
        if len(given) > MAX_VM_ADDRS:
            raise InvalidArgument(
                f"{what}: {len(given)} addresses, a VM has at most {MAX_VM_ADDRS}"
            )
        ips = tuple(canonical_ip(x) for x in given)
        seen: set[str] = set()
        for ip in ips:
            if ip in seen:
                raise InvalidArgument(f"{what}: VM address {ip} is given twice")
            seen.add(ip)
        return cls(ips, addr_array(ips))

    @classmethod
    def of_addrs(cls, addrs: np.ndarray) -> VmAddrs:
        """From map-form addresses already checked (count, no duplicates)."""
        arr = np.ascontiguousarray(addrs)
        return cls(tuple(addrs_to_ips(arr)), arr)

    @property
    def label(self) -> str:
        """All the addresses on one line: how reports and records name the VM."""
        return ",".join(self.ips)

    def __len__(self) -> int:
        return len(self.ips)

    def __iter__(self) -> Iterator[str]:
        return iter(self.ips)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VmAddrs) and self.ips == other.ips

    def __hash__(self) -> int:
        return hash(self.ips)

    def contains(self, values: np.ndarray) -> np.ndarray:
        """Which `struct ip_addr` values are one of this VM's addresses."""
        return addr_isin(values, self.addrs)

    def same_set(self, ips: Iterable[str]) -> bool:
        return set(self.ips) == set(ips)
