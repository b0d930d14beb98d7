"""Crafted Ethernet/IPv4 frames for BPF_PROG_TEST_RUN (no scapy needed)."""

from __future__ import annotations

import ipaddress
import struct
from typing import Any

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
    sport: int,
    dport: int,
    flags: int,
    payload: bytes = b"",
    seq: int = 1,
    ack: int = 0,
    win: int = 65535,
    options: bytes = b"",
) -> bytes:
    """A TCP segment; `options` must be padded to a multiple of 4 bytes."""
    assert len(options) % 4 == 0 and len(options) <= 40
    doff = 5 + len(options) // 4
    head = struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, doff << 4,
                       flags, win, 0, 0)
    return head + options + payload


def syn_options(wscale: int | None = 7, sack: bool = True, mss: int = 1460) -> bytes:
    """A SYN's options as Linux sends them (MSS, SACK-permitted, window scale)."""
    opts = struct.pack("!BBH", 2, 4, mss)
    if sack:
        opts += bytes([4, 2])
    if wscale is not None:
        opts += bytes([1, 3, 3, wscale])  # NOP, window scale
    return opts + b"\x01" * (-len(opts) % 4)


class TcpFlow:
    """Both ends of one TCP connection, with the sequence and acknowledgement
    numbers a real pair of stacks would use, so a window-tracking firewall can be
    fed a believable conversation. "a" opened the connection, "b" answered.

    Each builder returns one frame and advances the sender's sequence (and what the
    other end has received); `seq=`/`ack=` override them for crafted attacks."""

    def __init__(self, a: str, aport: int, b: str, bport: int, *, isn_a: int = 1000,
                 isn_b: int = 900_000, win: int = 65535, vlans: tuple[int, ...] = ()) -> None:
        self.ends = {"a": (a, aport), "b": (b, bport)}
        self.snd_nxt = {"a": isn_a, "b": isn_b}
        self.rcv_nxt = {"a": 0, "b": 0}
        self.win = win
        self.vlans = vlans

    def frame(self, frm: str, flags: int, payload: bytes = b"", *, seq: int | None = None,
              ack: int | None = None, win: int | None = None, options: bytes = b"",
              advance: bool = True) -> bytes:
        to = "b" if frm == "a" else "a"
        (src, sport), (dst, dport) = self.ends[frm], self.ends[to]
        s = self.snd_nxt[frm] if seq is None else seq
        k = (self.rcv_nxt[frm] if flags & ACK else 0) if ack is None else ack
        seg = self.segment(src, sport, dst, dport, flags, payload, seq=s, ack=k,
                           win=self.win if win is None else win, options=options)
        if advance and seq is None:
            used = len(payload) + (1 if flags & SYN else 0) + (1 if flags & FIN else 0)
            self.snd_nxt[frm] = (s + used) & 0xFFFFFFFF
            self.rcv_nxt[to] = self.snd_nxt[frm]
        return self.packet(src, dst, seg)

    def segment(self, src: str, sport: int, dst: str, dport: int, flags: int,
                payload: bytes, **kw: Any) -> bytes:
        return tcp_seg(sport, dport, flags, payload, **kw)

    def packet(self, src: str, dst: str, seg: bytes) -> bytes:
        return eth(ipv4(src, dst, 6, seg), vlans=self.vlans)

    def syn(self, **kw: Any) -> bytes:
        return self.frame("a", SYN, **kw)

    def synack(self, **kw: Any) -> bytes:
        return self.frame("b", SYN | ACK, **kw)

    def ack(self, frm: str = "a", **kw: Any) -> bytes:
        return self.frame(frm, ACK, **kw)

    def data(self, frm: str, payload: bytes, **kw: Any) -> bytes:
        return self.frame(frm, PSH | ACK, payload, **kw)

    def fin(self, frm: str, **kw: Any) -> bytes:
        return self.frame(frm, FIN | ACK, **kw)

    def rst(self, frm: str, **kw: Any) -> bytes:
        return self.frame(frm, RST | ACK, **kw)


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


def garp(ip: str, mac: bytes = b"\x02\0\0\0\0\x01", op: int = 1) -> bytes:
    """A gratuitous ARP (sender = target = `ip`), as a moved VM or its hypervisor sends."""
    addr = ipaddress.IPv4Address(ip).packed
    body = struct.pack("!HHBBH", 1, 0x0800, 6, 4, op) + mac + addr + b"\0" * 6 + addr
    return eth(body, ethertype=0x0806)


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


# ---- IPv6 (RFC 8200), ICMPv6 (RFC 4443) and neighbour discovery (RFC 4861) ----

ETH_P_IPV6 = 0x86DD
NH_HOPOPTS, NH_ROUTING, NH_FRAGMENT, NH_DSTOPTS, NH_NONE = 0, 43, 44, 60, 59


def ipv6(src: str, dst: str, nh: int, payload: bytes, hlim: int = 64, ext: bytes = b"",
         plen: int | None = None, version: int = 6) -> bytes:
    """An IPv6 packet; `ext` is a ready-made chain of extension headers whose first
    one is `nh` (the chain's last header names the payload's protocol)."""
    length = len(ext) + len(payload) if plen is None else plen
    hdr = struct.pack("!IHBB16s16s", version << 28, length, nh, hlim,
                      ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed)
    return hdr + ext + payload


def ext_hdr(nh: int, body: bytes = b"\0" * 6) -> bytes:
    """Hop-by-hop / destination options / generic header: next header, length in
    8-byte units beyond the first 8, body padded to a multiple of 8."""
    body = body.ljust(((len(body) + 2 + 7) // 8) * 8 - 2, b"\0")
    return struct.pack("!BB", nh, (len(body) + 2) // 8 - 1) + body


def routing_hdr(nh: int, rtype: int, segments_left: int = 1, addrs: tuple[str, ...] = ()) -> bytes:
    body = struct.pack("!BBI", rtype, segments_left, 0)
    body += b"".join(ipaddress.IPv6Address(a).packed for a in addrs)
    return struct.pack("!BB", nh, len(addrs) * 2) + body


def frag_hdr(nh: int, offset: int = 0, more: bool = False, ident: int = 1) -> bytes:
    """Fragment header; `offset` in 8-byte units."""
    return struct.pack("!BBHI", nh, 0, (offset << 3) | (1 if more else 0), ident)


def _l4_checksum6(src: str, dst: str, nh: int, seg: bytes) -> int:
    pseudo = (ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address(dst).packed
              + struct.pack("!IxxxB", len(seg), nh))
    return inet_checksum(pseudo + seg)


def tcp6_seg(src: str, sport: int, dst: str, dport: int, flags: int, payload: bytes = b"",
             **kw: Any) -> bytes:
    seg = tcp_seg(sport, dport, flags, payload, **kw)
    seg = seg[:16] + b"\0\0" + seg[18:]
    return seg[:16] + struct.pack("!H", _l4_checksum6(src, dst, 6, seg)) + seg[18:]


def tcp6(src: str, sport: int, dst: str, dport: int, flags: int, payload: bytes = b"",
         vlans: tuple[int, ...] = (), **kw: Any) -> bytes:
    return eth(ipv6(src, dst, 6, tcp6_seg(src, sport, dst, dport, flags, payload, **kw)),
               ethertype=ETH_P_IPV6, vlans=vlans)


def udp6_seg(src: str, sport: int, dst: str, dport: int, payload: bytes = b"x") -> bytes:
    seg = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    return seg[:6] + struct.pack("!H", _l4_checksum6(src, dst, 17, seg)) + seg[8:]


def udp6(src: str, sport: int, dst: str, dport: int, payload: bytes = b"x",
         vlans: tuple[int, ...] = ()) -> bytes:
    return eth(ipv6(src, dst, 17, udp6_seg(src, sport, dst, dport, payload)),
               ethertype=ETH_P_IPV6, vlans=vlans)


def icmp6_msg(src: str, dst: str, icmp_type: int, code: int = 0, rest: bytes = b"\0\0\0\0",
              payload: bytes = b"") -> bytes:
    body = struct.pack("!BBH", icmp_type, code, 0) + rest[:4].ljust(4, b"\0") + payload
    return body[:2] + struct.pack("!H", _l4_checksum6(src, dst, 58, body)) + body[4:]


def icmp6_echo_ip(src: str, dst: str, ident: int, reply: bool = False, seq: int = 1) -> bytes:
    """The IPv6 packet (no Ethernet) of an echo request/reply."""
    msg = icmp6_msg(src, dst, 129 if reply else 128, 0, struct.pack("!HH", ident, seq), b"ping")
    return ipv6(src, dst, 58, msg)


def icmp6_echo(src: str, dst: str, ident: int, reply: bool = False, seq: int = 1) -> bytes:
    return eth(icmp6_echo_ip(src, dst, ident, reply, seq), ethertype=ETH_P_IPV6)


def icmp6_error(src: str, dst: str, quoted_ip: bytes, icmp_type: int = 1, code: int = 4,
                mtu: int = 0, hlim: int = 64) -> bytes:
    """An ICMPv6 error from `src` to `dst` quoting `quoted_ip` (up to 1232 bytes, as
    RFC 4443 allows); for packet-too-big (type 2) `mtu` fills the 4-byte field."""
    msg = icmp6_msg(src, dst, icmp_type, code, struct.pack("!I", mtu), quoted_ip[:1232])
    return eth(ipv6(src, dst, 58, msg, hlim=hlim), ethertype=ETH_P_IPV6)


def ndp(src: str, dst: str, icmp_type: int = 135, target: str = "::", hlim: int = 255) -> bytes:
    """A neighbour solicitation/advertisement (or RS/RA/redirect by type)."""
    msg = icmp6_msg(src, dst, icmp_type, 0, b"\0\0\0\0", ipaddress.IPv6Address(target).packed)
    return eth(ipv6(src, dst, 58, msg, hlim=hlim), ethertype=ETH_P_IPV6)


class Tcp6Flow(TcpFlow):
    """TcpFlow over IPv6."""

    def segment(self, src: str, sport: int, dst: str, dport: int, flags: int,
                payload: bytes, **kw: Any) -> bytes:
        return tcp6_seg(src, sport, dst, dport, flags, payload, **kw)

    def packet(self, src: str, dst: str, seg: bytes) -> bytes:
        return eth(ipv6(src, dst, 6, seg), ethertype=ETH_P_IPV6, vlans=self.vlans)
