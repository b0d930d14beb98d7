"""Cutover without a human: the destination notices the VM's arrival.

While a migration to this host runs with `--until-cutover`, the agent arms an
`arrivals` entry for each of the VM's addresses (bpf/session_map.h, "cutover
detection") once the full copy is loaded. The datapath marks an entry seen at
the VM's first frame on an interface that leads to it (after the
anti-spoofing check: a frame from the uplink that claims the VM's address
arms nothing) and opens the VM's pickup window at once, so the sessions the
source created since its last delta are picked up until the final delta is
loaded. The agent polls the armed entries and asks the source for the final
delta (a signed `cutover` message to the source's agent, which tells the
running `migrate` to finish, as `migrate --final` does).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..loader.pinned import Firewall
from .vmset import VmAddrs


@dataclass(frozen=True)
class Arrival:
    """The first sign of the VM on this host."""

    vm: str
    ifindex: int
    how: str
    seen_ns: int


def key_of(fw: Firewall, ip: str) -> np.ndarray:
    """The `struct ip_addr` key of one address (arrivals and pickup share it)."""
    return _keys(fw, VmAddrs.parse([ip]))


def _keys(fw: Firewall, vms: VmAddrs) -> np.ndarray:
    keys = np.zeros(len(vms), dtype=fw.maps["arrivals"].key_dtype)
    keys[:] = vms.addrs
    return keys


def arm(fw: Firewall, vms: VmAddrs, pickup_s: float) -> None:
    """Watches for the VM's arrival; an earlier sighting is forgotten."""
    m = fw.maps["arrivals"]
    values = np.zeros(len(vms), dtype=m.value_dtype)
    values["pickup_ns"] = int(pickup_s * 1e9)
    m.update_many(_keys(fw, vms), values)


def disarm(fw: Firewall, vms: VmAddrs) -> list[Arrival]:
    """Stops watching; returns the sightings there were."""
    seen = arrivals(fw, vms)
    m = fw.maps["arrivals"]
    for i in range(len(vms)):
        m.delete(_keys(fw, vms)[i : i + 1])
    return seen


def arrivals(fw: Firewall, vms: VmAddrs) -> list[Arrival]:
    """The VM's addresses seen here since they were armed."""
    m = fw.maps["arrivals"]
    keys = _keys(fw, vms)
    how = fw.layout.names("ARRIVAL_")
    out = []
    for i, ip in enumerate(vms.ips):
        v = m.lookup(keys[i : i + 1])
        if v is not None and int(v["seen_ns"]):
            out.append(Arrival(ip, int(v["ifindex"]), how.get(int(v["how"]), "?").lower(),
                               int(v["seen_ns"])))
    return out


def clear(fw: Firewall) -> int:
    """Forgets every watch (an agent starting: whoever armed them is gone)."""
    m = fw.maps["arrivals"]
    keys = m.keys()
    return m.delete_many(keys) if len(keys) else 0
