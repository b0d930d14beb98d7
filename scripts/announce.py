#!/usr/bin/env python3
"""Announce a VM at its new place, as a hypervisor's guest announce does after a
live migration (virtio-net's VIRTIO_NET_F_GUEST_ANNOUNCE: a gratuitous ARP per
IPv4 address, an unsolicited neighbour advertisement per IPv6 address).

usage: announce.py IFACE ADDRESS...   (run inside the VM's network namespace)

Standard library only: raw AF_PACKET frames on IFACE, from IFACE's MAC."""

from __future__ import annotations

import ipaddress
import socket
import struct
import sys
from pathlib import Path

ETH_P_ARP, ETH_P_IPV6 = 0x0806, 0x86DD
NA_OVERRIDE = 0x20000000
ALL_NODES = ipaddress.IPv6Address("ff02::1")


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def garp(mac: bytes, ip: ipaddress.IPv4Address) -> bytes:
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + mac + ip.packed + b"\0" * 6 + ip.packed
    return b"\xff" * 6 + mac + struct.pack("!H", ETH_P_ARP) + arp


def unsolicited_na(mac: bytes, ip: ipaddress.IPv6Address) -> bytes:
    body = struct.pack("!BBHI", 136, 0, 0, NA_OVERRIDE) + ip.packed + bytes([2, 1]) + mac
    pseudo = ip.packed + ALL_NODES.packed + struct.pack("!I3xB", len(body), 58)
    body = body[:2] + struct.pack("!H", checksum(pseudo + body)) + body[4:]
    ip6 = struct.pack("!IHBB", 6 << 28, len(body), 58, 255) + ip.packed + ALL_NODES.packed
    return b"\x33\x33\x00\x00\x00\x01" + mac + struct.pack("!H", ETH_P_IPV6) + ip6 + body


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__.strip().splitlines()[-3], file=sys.stderr)
        return 2
    iface, addrs = argv[0], [ipaddress.ip_address(a) for a in argv[1:]]
    mac = bytes.fromhex(Path(f"/sys/class/net/{iface}/address").read_text().strip()
                        .replace(":", ""))
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
        s.bind((iface, 0))
        for a in addrs:
            if isinstance(a, ipaddress.IPv4Address):
                s.send(garp(mac, a))
            else:
                s.send(unsolicited_na(mac, a))
    print(f"announced {' '.join(map(str, addrs))} on {iface}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
