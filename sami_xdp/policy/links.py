"""The firewall on this host's interfaces: where it runs, in which mode, with which
role. One code path for `samixdp attach`/`detach` and for `samixdp apply`.

An interface's role is written before its program is attached, so the datapath
judges the first packet with it; a detach puts the role back to `auto`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..loader import attach as xdp
from ..loader.pinned import Firewall
from .roles import parse_role, role_of, set_role


@dataclass(frozen=True)
class Link:
    """One interface running the datapath."""

    ifname: str
    ifindex: int
    mode: str  # native, generic or tc
    role: str  # auto, vm or uplink


def attached_links(fw: Firewall) -> list[Link]:
    """The interfaces of this network namespace running our datapath."""
    return [
        Link(s.ifname, s.ifindex, str(s.mode), role_of(fw, s.ifindex))
        for s in xdp.list_attached(fw.programs())
    ]


def _with_role(
    fw: Firewall, ifname: str, role: str, do: Callable[[], xdp.XdpState]
) -> xdp.XdpState:
    idx = xdp.query(ifname).ifindex  # fails clearly for a missing interface
    before = role_of(fw, idx)
    set_role(fw, idx, parse_role(role))
    try:
        return do()
    except BaseException:
        set_role(fw, idx, before)
        raise


def attach_link(fw: Firewall, ifname: str, mode: str, role: str) -> xdp.XdpState:
    """Attaches in `mode` with `role` (on a link already running it in that mode, or
    with mode auto, only the role is set). Returns the mode obtained."""
    return _with_role(fw, ifname, role, lambda: xdp.attach(ifname, fw.programs(), mode))


def reattach_link(fw: Firewall, ifname: str, mode: str, role: str) -> xdp.XdpState:
    """Moves the link to `mode` with `role` (xdp.reattach: between TC and XDP the link
    is never unfiltered)."""
    return _with_role(fw, ifname, role, lambda: xdp.reattach(ifname, fw.programs(), mode))


def detach_link(fw: Firewall, ifname: str) -> xdp.XdpState:
    """Detaches (NotAttachedError if it does not run there); the role goes back to auto."""
    state = xdp.detach(ifname, fw.programs())
    set_role(fw, state.ifindex, "auto")
    return state
