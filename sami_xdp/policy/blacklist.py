"""Blacklist (banned sources) and the SYN counters that feed it.

The datapath bans a source whose SYN rate toward a VM crosses the limit and
records that VM, so bans travel with it on migration. Expiry is checked in
the datapath; `gc` removes entries that ended.

An IPv4 source is banned as its address, an IPv6 source as its /64
(IPV6_BAN_PLEN: a host owns a whole /64 and rotates through it at will), so a
ban of an IPv6 address covers its /64 and lists as that prefix."""

from __future__ import annotations

import time

import numpy as np

from ..base.errors import InvalidArgument
from ..base.layout import load_layout
from ..base.netutil import IPAddress, addr_to_ip, addrs_to_ips, ban_ip, ip_to_addr, parse_ip
from ..loader.pinned import Firewall

# a SYN counter idle this long carries no information any more
SYN_COUNTER_IDLE_NS = 60 * 1_000_000_000


def read_blacklist(fw: Firewall) -> tuple[np.ndarray, np.ndarray]:
    return fw.maps["blacklist"].dump()


def ban_text(banned: str) -> str:
    """How a blacklist key prints: an IPv4 address as is, an IPv6 one as the /64 it
    stands for (a key with interface bits, which no packet would match, as is)."""
    addr = parse_ip(banned)
    if addr != ban_ip(addr):
        return str(addr)
    return str(addr) if addr.version == 4 else f"{addr}/{load_layout().const('IPV6_BAN_PLEN')}"


def ban_key(fw: Firewall, ip: str | IPAddress) -> np.ndarray:
    """The blacklist key that bans `ip` (its /64 for IPv6; InvalidArgument for text
    that is no address)."""
    key = np.zeros(1, dtype=fw.maps["blacklist"].key_dtype)
    key[0] = ip_to_addr(ban_ip(ip))
    return key


def _vm_text(vm: np.void) -> str | None:
    """The VM a ban records; None for a manual ban made without one (all zero)."""
    return addr_to_ip(vm) if np.asarray(vm).tobytes().strip(b"\0") else None


def blacklist_records(fw: Firewall, now_ns: int | None = None) -> list[dict[str, object]]:
    now = now_ns if now_ns is not None else time.monotonic_ns()
    keys, values = read_blacklist(fw)
    vm_only = fw.const("BL_F_VM_ONLY")
    banned = addrs_to_ips(keys)
    out: list[dict[str, object]] = []
    for ip, v in zip(banned, values, strict=True):
        expires = int(v["expires_ns"])
        out.append(
            {
                "ip": ban_text(ip),
                "vm": _vm_text(v["vm"]),
                "scope": "vm" if int(v["flags"]) & vm_only else "all",
                "expires_in_s": round(max(0, expires - now) / 1e9, 3),
                "banned_s_ago": round(max(0, now - int(v["banned_ns"])) / 1e9, 3),
                "dropped": int(v["dropped"]),
                "active": expires > now,
            }
        )
    out.sort(key=lambda r: (not r["active"], str(r["ip"])))
    return out


def unban(fw: Firewall, ip: str) -> bool:
    """Lifts the ban covering `ip` (an IPv6 address: its /64's)."""
    return fw.maps["blacklist"].delete(ban_key(fw, _ban_target(ip)))


def _ban_target(text: str) -> IPAddress:
    """An address, or (as `blacklist list` prints IPv6 bans) an IPv6 /64 prefix."""
    addr, sep, plen = str(text).strip().partition("/")
    if sep:
        want = load_layout().const("IPV6_BAN_PLEN")
        ip = parse_ip(addr)
        if ip.version != 6 or plen != str(want):
            raise InvalidArgument(
                f"a ban is of one address or an IPv6 /{want}, got {str(text)[:80]!r}"
            )
        return ip
    return parse_ip(addr)


def ban(fw: Firewall, ip: str, vm: str | None, seconds: int) -> str:
    """Manual ban (operator or tests) of `ip` (an IPv6 address: its /64) towards every
    VM, recording `vm` (None: no VM, the ban stays on this host); returns what is
    banned as `blacklist list` shows it."""
    if seconds < 1:
        raise InvalidArgument("ban time must be at least 1 second")
    key = ban_key(fw, _ban_target(ip))
    vm_addr = ip_to_addr(vm) if vm is not None else np.zeros((), fw.maps["blacklist"].key_dtype)
    now = time.monotonic_ns()
    value = np.zeros(1, dtype=fw.maps["blacklist"].value_dtype)
    value["banned_ns"] = now
    value["expires_ns"] = now + seconds * 1_000_000_000
    value["vm"] = vm_addr
    fw.maps["blacklist"].update(key, value)
    fw.set_bans_hint(True)
    return ban_text(addr_to_ip(key[0]))


def gc(fw: Firewall, now_ns: int | None = None) -> dict[str, int]:
    now = np.uint64(now_ns if now_ns is not None else time.monotonic_ns())
    removed = {}
    keys, values = fw.maps["blacklist"].dump()
    dead = keys[values["expires_ns"] <= now]
    removed["blacklist"] = fw.maps["blacklist"].delete_many(dead) if len(dead) else 0
    # clear the datapath's hint, then look again: a ban inserted meanwhile
    # either shows up here or sets the hint itself after its insert
    fw.set_bans_hint(False)
    _, values = fw.maps["blacklist"].dump()
    if (values["expires_ns"] > np.uint64(time.monotonic_ns())).any():
        fw.set_bans_hint(True)
    keys, values = fw.maps["syn_counters"].dump()
    start = np.minimum(values["window_start_ns"], now)
    dead = keys[(now - start) > np.uint64(SYN_COUNTER_IDLE_NS)]
    removed["syn_counters"] = fw.maps["syn_counters"].delete_many(dead) if len(dead) else 0
    return removed
