"""Crafted Ethernet/IPv4 frames for BPF_PROG_TEST_RUN (no scapy needed)."""

from __future__ import annotations

import ipaddress
import struct

ETH_SRC = bytes.fromhex("020000000001")
ETH_DST = bytes.fromhex("020000000002")

FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10


def inet_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def eth(payload: bytes, ethertype: int = 0x0800, vlans: tuple[int, ...] = ()) -> bytes:
    hdr = ETH_DST + ETH_SRC
    tpids = [0x88A8] * (len(vlans) - 1) + [0x8100] if vlans else []
    for tpid, vid in zip(tpids, vlans, strict=True):
        hdr += struct.pack("!H", tpid) + struct.pack("!H", vid & 0x0FFF)
    return hdr + struct.pack("!H", ethertype) + payload


def ipv4(
    src: str, dst: str, proto: int, l4: bytes, frag: int = 0, ident: int = 1, ttl: int = 64
) -> bytes:
    tot = 20 + len(l4)
    hdr = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        tot,
        ident,
        frag,
        ttl,
        proto,
        0,
        ipaddress.IPv4Address(src).packed,
        ipaddress.IPv4Address(dst).packed,
    )
    hdr = hdr[:10] + struct.pack("!H", inet_checksum(hdr)) + hdr[12:]
    return hdr + l4


def tcp_seg(
    sport: int, dport: int, flags: int, payload: bytes = b"", seq: int = 1, ack: int = 0
) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, 65535, 0, 0) + payload


def tcp(
    src: str,
    sport: int,
    dst: str,
    dport: int,
    flags: int,
    payload: bytes = b"",
    vlans: tuple[int, ...] = (),
) -> bytes:
    return eth(ipv4(src, dst, 6, tcp_seg(sport, dport, flags, payload)), vlans=vlans)


def udp(
    src: str, sport: int, dst: str, dport: int, payload: bytes = b"x", vlans: tuple[int, ...] = ()
) -> bytes:
    seg = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    return eth(ipv4(src, dst, 17, seg), vlans=vlans)


def icmp_echo(src: str, dst: str, ident: int, reply: bool = False, seq: int = 1) -> bytes:
    body = struct.pack("!BBHHH", 0 if reply else 8, 0, 0, ident, seq) + b"ping"
    body = body[:2] + struct.pack("!H", inet_checksum(body)) + body[4:]
    return eth(ipv4(src, dst, 1, body))


def icmp_error(src: str, dst: str, quoted_ip: bytes, icmp_type: int = 3, code: int = 3) -> bytes:
    """An ICMP error from `src` to `dst` quoting the first 28 bytes of `quoted_ip`."""
    body = struct.pack("!BBHI", icmp_type, code, 0, 0) + quoted_ip[:28]
    return eth(ipv4(src, dst, 1, body))


def arp() -> bytes:
    return eth(b"\x00\x01\x08\x00\x06\x04\x00\x01" + b"\0" * 20, ethertype=0x0806)


# ---- additions for the datapath / fuzz suites (raw, possibly invalid headers) ----

IP_MF = 0x2000  # "more fragments" flag in the IPv4 frag_off field (offset is in 8-byte units)
TPID_8021Q, TPID_8021AD = 0x8100, 0x88A8


def eth_tags(payload: bytes, tags: tuple[tuple[int, int], ...], ethertype: int = 0x0800) -> bytes:
    """Ethernet with an explicit stack of (TPID, VID) tags, outermost first."""
    hdr = ETH_DST + ETH_SRC
    for tpid, vid in tags:
        hdr += struct.pack("!HH", tpid, vid & 0x0FFF)
    return hdr + struct.pack("!H", ethertype) + payload


def ipv4_raw(
    src: str,
    dst: str,
    proto: int,
    l4: bytes,
    *,
    ihl: int = 5,
    version: int = 4,
    tot_len: int | None = None,
    frag: int = 0,
    ident: int = 1,
    ttl: int = 64,
    options: bytes = b"",
) -> bytes:
    """An IPv4 packet whose header fields may lie: `ihl`, `version` and `tot_len` are
    written as given (options are appended as-is, padded to `ihl` only by the caller)."""
    hdr_len = 20 + len(options)
    tot = hdr_len + len(l4) if tot_len is None else tot_len
    hdr = (
        struct.pack(
            "!BBHHHBBH4s4s",
            (version << 4) | (ihl & 0x0F),
            0,
            tot & 0xFFFF,
            ident,
            frag,
            ttl,
            proto,
            0,
            ipaddress.IPv4Address(src).packed,
            ipaddress.IPv4Address(dst).packed,
        )
        + options
    )
    hdr = hdr[:10] + struct.pack("!H", inet_checksum(hdr)) + hdr[12:]
    return hdr + l4


def tcp_seg_raw(
    sport: int,
    dport: int,
    flags: int,
    payload: bytes = b"",
    *,
    doff: int = 5,
    options: bytes = b"",
    seq: int = 1,
    ack: int = 0,
) -> bytes:
    """A TCP segment with an arbitrary data offset (may disagree with `options`)."""
    return (
        struct.pack("!HHIIBBHHH", sport, dport, seq, ack, (doff & 0x0F) << 4, flags, 65535, 0, 0)
        + options
        + payload
    )


def udp_seg(sport: int, dport: int, payload: bytes = b"x") -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def icmp_msg(
    icmp_type: int, code: int = 0, rest: bytes = b"\0\0\0\0", payload: bytes = b""
) -> bytes:
    """A raw ICMP message (type, code, checksum, 4 bytes of `rest`, payload)."""
    body = struct.pack("!BBH", icmp_type, code, 0) + rest[:4].ljust(4, b"\0") + payload
    return body[:2] + struct.pack("!H", inet_checksum(body)) + body[4:]


def icmp_echo_ip(src: str, dst: str, ident: int, reply: bool = False, seq: int = 1) -> bytes:
    """The IPv4 packet (no Ethernet) of an echo request/reply, e.g. to quote in an error."""
    return ipv4(
        src, dst, 1, icmp_msg(0 if reply else 8, 0, struct.pack("!HH", ident, seq), b"ping")
    )
