"""Attach/detach the pinned program to interfaces over netlink (pyroute2).

Detach only removes a program whose id is ours, so another tool's XDP program
on the same interface is never touched."""

from __future__ import annotations

from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from ..base.errors import InterfaceError, InvalidArgument, NotAttachedError

XDP_FLAGS_UPDATE_IF_NOEXIST = 1
XDP_FLAGS_SKB_MODE = 2
XDP_FLAGS_DRV_MODE = 4
XDP_FLAGS_REPLACE = 16

MODES = ("auto", "native", "generic")
_ATTACHED_MODE = {1: "native", 2: "generic", 3: "offload", 4: "multi"}


@dataclass(frozen=True)
class XdpState:
    ifname: str
    ifindex: int
    prog_id: int
    mode: str | None


def _index(ipr: IPRoute, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise InterfaceError(f"no such interface: {ifname}")
    return int(found[0])


def _xdp_of(msg: object) -> tuple[int, str | None]:
    xdp = msg.get_attr("IFLA_XDP")  # type: ignore[attr-defined]
    if not xdp:
        return 0, None
    mode = xdp.get_attr("IFLA_XDP_ATTACHED") or 0
    prog_id = (
        xdp.get_attr("IFLA_XDP_PROG_ID")
        or xdp.get_attr("IFLA_XDP_DRV_PROG_ID")
        or xdp.get_attr("IFLA_XDP_SKB_PROG_ID")
        or 0
    )
    if isinstance(mode, str):  # pyroute2 may map the value to a name
        mode = {"xdp": 1, "xdpgeneric": 2, "xdpoffload": 3, "xdpmulti": 4}.get(mode, 0)
    return int(prog_id), _ATTACHED_MODE.get(int(mode)) if mode else None


def query(ifname: str) -> XdpState:
    with IPRoute() as ipr:
        idx = _index(ipr, ifname)
        msg = ipr.get_links(idx)[0]
        prog_id, mode = _xdp_of(msg)
        return XdpState(ifname, idx, prog_id, mode)


def list_attached(prog_id: int) -> list[XdpState]:
    """Interfaces of this network namespace running program `prog_id`."""
    out = []
    with IPRoute() as ipr:
        for msg in ipr.get_links():
            pid, mode = _xdp_of(msg)
            if pid == prog_id and pid != 0:
                out.append(XdpState(msg.get_attr("IFLA_IFNAME"), int(msg["index"]), pid, mode))
    return out


def _set(ipr: IPRoute, idx: int, fd: int, flags: int, expected_fd: int | None = None) -> None:
    attrs: list[tuple[str, int]] = [("IFLA_XDP_FD", fd), ("IFLA_XDP_FLAGS", flags)]
    if expected_fd is not None:
        attrs.append(("IFLA_XDP_EXPECTED_FD", expected_fd))
    ipr.link("set", index=idx, xdp={"attrs": attrs})


def attach(ifname: str, prog_fd: int, prog_id: int, mode: str = "auto") -> XdpState:
    """Attaches; `auto` tries native first, then generic. Returns what we got."""
    if mode not in MODES:
        raise InvalidArgument(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    with IPRoute() as ipr:
        idx = _index(ipr, ifname)
        cur_id, cur_mode = _xdp_of(ipr.get_links(idx)[0])
        if cur_id == prog_id:
            if mode in ("auto", cur_mode):
                return XdpState(ifname, idx, cur_id, cur_mode)
            raise InvalidArgument(
                f"{ifname} already runs sami-xdp in {cur_mode} mode: detach it first"
            )
        if cur_id:
            raise InterfaceError(
                f"{ifname} already has another XDP program (id {cur_id}); "
                "remove it first, sami-xdp will not replace it"
            )
        tries = {"auto": ("native", "generic"), "native": ("native",), "generic": ("generic",)}
        last_err = ""
        for m in tries[mode]:
            flag = XDP_FLAGS_DRV_MODE if m == "native" else XDP_FLAGS_SKB_MODE
            try:
                _set(ipr, idx, prog_fd, flag | XDP_FLAGS_UPDATE_IF_NOEXIST)
            except NetlinkError as exc:
                last_err = f"{m}: {exc.args[1] if len(exc.args) > 1 else exc}"
                continue
            got_id, got_mode = _xdp_of(ipr.get_links(idx)[0])
            return XdpState(ifname, idx, got_id, got_mode)
        raise InterfaceError(f"cannot attach XDP to {ifname} ({last_err})")


def detach(ifname: str, prog_fd: int, prog_id: int) -> XdpState:
    with IPRoute() as ipr:
        idx = _index(ipr, ifname)
        cur_id, cur_mode = _xdp_of(ipr.get_links(idx)[0])
        if cur_id != prog_id or not cur_id:
            raise NotAttachedError(f"sami-xdp is not attached to {ifname}")
        flag = XDP_FLAGS_DRV_MODE if cur_mode == "native" else XDP_FLAGS_SKB_MODE
        try:
            _set(ipr, idx, -1, flag | XDP_FLAGS_REPLACE, expected_fd=prog_fd)
        except NetlinkError as exc:
            raise InterfaceError(f"cannot detach from {ifname}: {exc}") from exc
        return XdpState(ifname, idx, prog_id, cur_mode)
