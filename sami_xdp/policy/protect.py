"""Protected prefixes: the VM addresses this host's firewall stands in front of.

They decide direction in the datapath (dst protected = inbound, src
protected = outbound, neither = transit)."""

from __future__ import annotations

import ipaddress

import numpy as np

from ..base.netutil import in_networks, ip_to_be32, parse_network
from ..loader.pinned import Firewall


def _key(fw: Firewall, net: ipaddress.IPv4Network) -> np.ndarray:
    key = np.zeros(1, dtype=fw.maps["protected"].key_dtype)
    key["prefixlen"] = net.prefixlen
    key["addr"] = int.from_bytes(net.network_address.packed, "little")
    return key


def add_protected(fw: Firewall, cidr: str) -> ipaddress.IPv4Network:
    net = parse_network(cidr)
    fw.maps["protected"].update(_key(fw, net), np.ones(1, dtype=np.uint32))
    return net


def remove_protected(fw: Firewall, cidr: str) -> bool:
    return fw.maps["protected"].delete(_key(fw, parse_network(cidr)))


def list_protected(fw: Firewall) -> list[ipaddress.IPv4Network]:
    nets = []
    for k in fw.maps["protected"].keys():
        addr = ipaddress.IPv4Address(int(k["addr"]).to_bytes(4, "little"))
        nets.append(ipaddress.IPv4Network(f"{addr}/{int(k['prefixlen'])}"))
    return sorted(nets)


def is_protected(fw: Firewall, ip: str) -> bool:
    """Is `ip` (checked: InvalidArgument if it is not an IPv4 address) a VM here?"""
    return bool(in_networks(np.array([ip_to_be32(ip)], np.uint32), list_protected(fw))[0])
