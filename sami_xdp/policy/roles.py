"""Interface roles for anti-spoofing: what an attached interface leads to.

By default (`auto`) the datapath decides per packet with a route lookup: a
protected source is accepted only on the interface through which this host
routes to it (strict reverse path). Where routing cannot tell (a bridge port, an
asymmetric setup), the operator says it: `vm` (protected sources may arrive
here) or `uplink` (they never do)."""

from __future__ import annotations

import numpy as np

from ..base.errors import InvalidArgument
from ..loader.pinned import Firewall

ROLES = ("auto", "vm", "uplink")


def parse_role(text: str) -> str:
    if text not in ROLES:
        raise InvalidArgument(f"--role must be one of {', '.join(ROLES)}, got {text!r}")
    return text


def set_role(fw: Firewall, ifindex: int, role: str) -> None:
    """`auto` removes any role the interface had."""
    m = fw.maps["iface_roles"]
    key = np.array([ifindex], np.uint32)
    if parse_role(role) == "auto":
        m.delete(key)
        return
    value = fw.const("ROLE_VM") if role == "vm" else fw.const("ROLE_UPLINK")
    m.update(key, np.array([value], np.uint32))


def role_of(fw: Firewall, ifindex: int) -> str:
    value = fw.maps["iface_roles"].lookup(np.array([ifindex], np.uint32))
    if value is None:
        return "auto"
    return "vm" if int(value) == fw.const("ROLE_VM") else "uplink"
