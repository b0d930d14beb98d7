"""Address helpers: the maps hold IPv4 addresses and ports in network order."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

import numpy as np

from .errors import InvalidArgument


def ip_to_be32(ip: str) -> int:
    """Dotted quad -> the u32 a little-endian map field holds (network order bytes)."""
    try:
        packed = ipaddress.IPv4Address(ip).packed
    except ValueError as exc:
        raise InvalidArgument(f"not an IPv4 address: {ip!r}") from exc
    return int.from_bytes(packed, "little")


def be32_to_ip(value: int) -> str:
    return str(ipaddress.IPv4Address(int(value).to_bytes(4, "little")))


def be32_array_to_host(values: np.ndarray) -> np.ndarray:
    """Map-order u32 addresses -> host-order integers (comparable, printable)."""
    return np.asarray(values, dtype=np.uint32).byteswap()


def host_to_ip(value: int) -> str:
    return str(ipaddress.IPv4Address(int(value)))


def port_be(port: int) -> int:
    return int.from_bytes(int(port).to_bytes(2, "big"), "little")


def be16_array_to_host(values: np.ndarray) -> np.ndarray:
    return np.asarray(values, dtype=np.uint16).byteswap()


def parse_network(cidr: str) -> ipaddress.IPv4Network:
    try:
        return ipaddress.IPv4Network(cidr, strict=False)
    except ValueError as exc:
        raise InvalidArgument(f"not an IPv4 prefix: {cidr!r}") from exc


def in_networks(addrs_be: np.ndarray, nets: Iterable[ipaddress.IPv4Network]) -> np.ndarray:
    """Which map-order u32 addresses lie in any of `nets` (vectorised)."""
    host = np.asarray(addrs_be, dtype=np.uint32).byteswap()
    out = np.zeros(host.shape, dtype=bool)
    for net in nets:
        mask = np.uint32(int(net.netmask))
        out |= (host & mask) == np.uint32(int(net.network_address))
    return out
