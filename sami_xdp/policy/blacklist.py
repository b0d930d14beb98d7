"""Blacklist (banned sources) and the SYN counters that feed it.

The datapath bans a source whose SYN rate toward a VM crosses the limit and
records that VM, so bans travel with it on migration. Expiry is checked in
the datapath; `gc` removes entries that ended."""

from __future__ import annotations

import time

import numpy as np

from ..base.errors import InvalidArgument
from ..base.netutil import be32_to_ip, ip_to_be32
from ..loader.pinned import Firewall

# a SYN counter idle this long carries no information any more
SYN_COUNTER_IDLE_NS = 60 * 1_000_000_000


def read_blacklist(fw: Firewall) -> tuple[np.ndarray, np.ndarray]:
    return fw.maps["blacklist"].dump()


def blacklist_records(fw: Firewall, now_ns: int | None = None) -> list[dict[str, object]]:
    now = now_ns if now_ns is not None else time.monotonic_ns()
    keys, values = read_blacklist(fw)
    vm_only = fw.const("BL_F_VM_ONLY")
    out: list[dict[str, object]] = []
    for k, v in zip(keys, values, strict=True):
        expires = int(v["expires_ns"])
        out.append(
            {
                "ip": be32_to_ip(int(k)),
                "vm": be32_to_ip(int(v["vm"])),
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
    key = np.array([ip_to_be32(ip)], dtype=np.uint32)
    return fw.maps["blacklist"].delete(key)


def ban(fw: Firewall, ip: str, vm: str, seconds: int) -> None:
    """Manual ban (operator or tests)."""
    if seconds < 1:
        raise InvalidArgument("ban time must be at least 1 second")
    now = time.monotonic_ns()
    value = np.zeros(1, dtype=fw.maps["blacklist"].value_dtype)
    value["banned_ns"] = now
    value["expires_ns"] = now + seconds * 1_000_000_000
    value["vm"] = ip_to_be32(vm)
    fw.maps["blacklist"].update(np.array([ip_to_be32(ip)], np.uint32), value)
    fw.set_bans_hint(True)


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
