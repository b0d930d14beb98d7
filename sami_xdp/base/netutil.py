"""Address helpers. Every address in the maps is a `struct ip_addr`: IPv6 as it
is, IPv4 as the IPv4-mapped ::ffff:a.b.c.d, 16 bytes in network order. Python
holds one as a NumPy scalar of the header's `ip_addr` dtype (comparable with a
structured array's address field) and prints it in its family's canonical form.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

import numpy as np

from .errors import InvalidArgument
from .layout import load_layout

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_MAPPED_PREFIX = b"\x00" * 10 + b"\xff\xff"


def addr_dtype() -> np.dtype:
    return load_layout().dtype("ip_addr")


def parse_ip(ip: str | IPAddress) -> IPAddress:
    """An address of either family; InvalidArgument (one line) otherwise. An IPv6
    text holding an IPv4-mapped address is read as the IPv4 address it maps."""
    if isinstance(ip, ipaddress.IPv4Address | ipaddress.IPv6Address):
        addr: IPAddress = ip
    else:
        try:
            addr = ipaddress.ip_address(str(ip).strip())
        except ValueError:
            raise InvalidArgument(f"not an IP address: {str(ip)[:80]!r}") from None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def canonical_ip(ip: str | IPAddress) -> str:
    """The canonical text of an address (IPv6 compressed, lower case)."""
    return str(parse_ip(ip))


def ip_to_bytes(ip: str | IPAddress) -> bytes:
    addr = parse_ip(ip)
    if isinstance(addr, ipaddress.IPv4Address):
        return _MAPPED_PREFIX + addr.packed
    return addr.packed


def bytes_to_ip(raw: bytes) -> IPAddress:
    if raw[:12] == _MAPPED_PREFIX:
        return ipaddress.IPv4Address(raw[12:16])
    return ipaddress.IPv6Address(raw)


def ip_to_addr(ip: str | IPAddress) -> np.void:
    """The `struct ip_addr` of an address, as a NumPy scalar."""
    return np.frombuffer(ip_to_bytes(ip), dtype=addr_dtype())[0]


def addr_to_ip(value: np.void | np.ndarray | bytes) -> str:
    """One `struct ip_addr` (scalar, 0-d array or 16 bytes) -> canonical text."""
    raw = value if isinstance(value, bytes) else np.asarray(value).tobytes()
    return str(bytes_to_ip(raw))


def addrs_to_ips(values: np.ndarray) -> list[str]:
    """An array of `struct ip_addr` -> canonical texts."""
    raw = np.ascontiguousarray(values).view(np.uint8).reshape(-1, 16)
    return [str(bytes_to_ip(row.tobytes())) for row in raw]


def addr_array(ips: Iterable[str | IPAddress]) -> np.ndarray:
    """Addresses -> an array of `struct ip_addr`."""
    raw = b"".join(ip_to_bytes(ip) for ip in ips)
    return np.frombuffer(raw, dtype=addr_dtype()).copy()


def is_ipv4_addr(values: np.ndarray) -> np.ndarray:
    """Which `struct ip_addr` values are IPv4 (mapped)."""
    raw = np.ascontiguousarray(values).view(np.uint8).reshape(-1, 16)
    return np.all(raw[:, :12] == np.frombuffer(_MAPPED_PREFIX, np.uint8), axis=1)


def port_be(port: int) -> int:
    return int.from_bytes(int(port).to_bytes(2, "big"), "little")


def be16_array_to_host(values: np.ndarray) -> np.ndarray:
    return np.asarray(values, dtype=np.uint16).byteswap()


def parse_network(cidr: str | IPNetwork) -> IPNetwork:
    """A prefix of either family (host bits ignored); InvalidArgument otherwise.
    A bare address is its own /32 or /128."""
    if isinstance(cidr, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return cidr
    try:
        net = ipaddress.ip_network(str(cidr).strip(), strict=False)
    except ValueError:
        raise InvalidArgument(f"not an IP prefix: {str(cidr)[:80]!r}") from None
    if isinstance(net, ipaddress.IPv6Network) and net.network_address.ipv4_mapped is not None:
        if net.prefixlen < 96:
            raise InvalidArgument(f"an IPv4-mapped prefix shorter than /96: {str(cidr)[:80]!r}")
        v4 = net.network_address.ipv4_mapped
        return ipaddress.IPv4Network((v4, net.prefixlen - 96))
    return net


def mapped_prefixlen(net: IPNetwork) -> int:
    """A prefix's length in the maps' address space (IPv4 /n is /(96 + n))."""
    plen = load_layout().const("IPV4_MAPPED_PLEN")
    return net.prefixlen + plen if isinstance(net, ipaddress.IPv4Network) else net.prefixlen


def network_from_mapped(addr: np.void | np.ndarray | bytes, plen: int) -> IPNetwork:
    """The prefix a map holds as (address, mapped prefix length)."""
    ip = parse_ip(addr_to_ip(addr))
    if isinstance(ip, ipaddress.IPv4Address):
        return ipaddress.IPv4Network((ip, int(plen) - load_layout().const("IPV4_MAPPED_PLEN")))
    return ipaddress.IPv6Network((ip, int(plen)))


def _as_v6(net: IPNetwork) -> ipaddress.IPv6Network:
    if isinstance(net, ipaddress.IPv4Network):
        mapped = ipaddress.IPv6Address(_MAPPED_PREFIX + net.network_address.packed)
        return ipaddress.IPv6Network((mapped, mapped_prefixlen(net)))
    return net


def in_networks(addrs: np.ndarray, nets: Iterable[IPNetwork]) -> np.ndarray:
    """Which `struct ip_addr` values lie in any of `nets` (either family; vectorised)."""
    raw = np.ascontiguousarray(addrs).view(np.uint8).reshape(-1, 16)
    hi = raw[:, :8].copy().view(">u8").reshape(-1)
    lo = raw[:, 8:].copy().view(">u8").reshape(-1)
    out = np.zeros(len(raw), dtype=bool)
    for net in nets:
        v6 = _as_v6(net)
        mask = int(v6.netmask)
        base = int(v6.network_address)
        mhi, mlo = np.uint64(mask >> 64), np.uint64(mask & (2**64 - 1))
        bhi, blo = np.uint64(base >> 64), np.uint64(base & (2**64 - 1))
        out |= ((hi & mhi) == bhi) & ((lo & mlo) == blo)
    return out


def ban_ip(ip: str | IPAddress) -> IPAddress:
    """What a ban of `ip` covers, as the blacklist keys it: an IPv4 address as
    is, an IPv6 address as its /64 (the interface half zero)."""
    addr = parse_ip(ip)
    if isinstance(addr, ipaddress.IPv6Address):
        plen = load_layout().const("IPV6_BAN_PLEN")
        return ipaddress.IPv6Network((addr, plen), strict=False).network_address
    return addr


def network_mask(net: IPNetwork) -> np.void:
    """A prefix's netmask as a `struct ip_addr` (in the mapped space)."""
    v6 = _as_v6(net)
    return np.frombuffer(v6.netmask.packed, dtype=addr_dtype())[0]


def subnet_of(inner: IPNetwork, outer: IPNetwork) -> bool:
    """Is `inner` inside `outer`? False across families (ipaddress raises there)."""
    if isinstance(inner, ipaddress.IPv4Network) and isinstance(outer, ipaddress.IPv4Network):
        return inner.subnet_of(outer)
    if isinstance(inner, ipaddress.IPv6Network) and isinstance(outer, ipaddress.IPv6Network):
        return inner.subnet_of(outer)
    return False


def ipv4_addr_array(hosts: np.ndarray) -> np.ndarray:
    """IPv4 addresses given as host-order integers -> an array of `struct ip_addr`
    (vectorised, for tests and benchmarks that fill maps with many addresses)."""
    hosts = np.asarray(hosts, dtype=np.uint32)
    raw = np.zeros((len(hosts), 16), dtype=np.uint8)
    raw[:, :12] = np.frombuffer(_MAPPED_PREFIX, np.uint8)
    raw[:, 12:] = hosts.astype(">u4").view(np.uint8).reshape(-1, 4)
    return raw.view(addr_dtype()).reshape(-1)
