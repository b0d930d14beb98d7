"""Protected prefixes: the VM addresses this host's firewall stands in front of.

They decide direction in the datapath (dst protected = inbound, src
protected = outbound, neither = transit). Prefixes of either family share the
one LPM trie, IPv4 ones in the IPv4-mapped space (an IPv4 /24 is a /120)."""

from __future__ import annotations

import ipaddress

import numpy as np

from ..base.errors import InvalidArgument
from ..base.layout import load_layout
from ..base.netutil import (
    IPNetwork,
    addr_array,
    in_networks,
    ip_to_addr,
    mapped_prefixlen,
    network_from_mapped,
    parse_network,
)
from ..loader.pinned import Firewall


def _key(fw: Firewall, net: IPNetwork) -> np.ndarray:
    key = np.zeros(1, dtype=fw.maps["protected"].key_dtype)
    key["prefixlen"] = mapped_prefixlen(net)
    key["addr"] = ip_to_addr(net.network_address)
    return key


def _mapped_space() -> ipaddress.IPv6Network:
    """Where IPv4 lives in the maps (::ffff:0:0/96)."""
    return ipaddress.IPv6Network(("::ffff:0:0", load_layout().const("IPV4_MAPPED_PLEN")))


def check_protectable(net: IPNetwork) -> IPNetwork:
    """An IPv6 prefix must not reach into the IPv4-mapped space (::/0 would otherwise
    protect every IPv4 address too); InvalidArgument (one line) if it does."""
    if isinstance(net, ipaddress.IPv6Network) and _mapped_space().subnet_of(net):
        raise InvalidArgument(
            f"{net} covers the IPv4-mapped space {_mapped_space()}: protect IPv4 prefixes "
            "as IPv4 and IPv6 ones without it (e.g. 2000::/3)"
        )
    return net


def add_protected(fw: Firewall, cidr: str) -> IPNetwork:
    net = check_protectable(parse_network(cidr))
    fw.maps["protected"].update(_key(fw, net), np.ones(1, dtype=np.uint32))
    return net


def remove_protected(fw: Firewall, cidr: str) -> bool:
    return fw.maps["protected"].delete(_key(fw, parse_network(cidr)))


def _sort_key(net: IPNetwork) -> tuple[int, IPNetwork]:
    return (net.version, net)


def list_protected(fw: Firewall) -> list[IPNetwork]:
    """Every protected prefix, IPv4 first, each family in address order."""
    keys = fw.maps["protected"].keys()
    nets = [network_from_mapped(k["addr"], int(k["prefixlen"])) for k in keys]
    return sorted(nets, key=_sort_key)


def is_protected(fw: Firewall, ip: str) -> bool:
    """Is `ip` (checked: InvalidArgument if it is not an IP address) a VM here?"""
    return bool(in_networks(addr_array([ip]), list_protected(fw))[0])
