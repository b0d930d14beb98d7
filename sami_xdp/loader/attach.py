"""Attach/detach the pinned programs to interfaces over netlink (pyroute2).

Three ways to run the one datapath: XDP in the driver (`native`), XDP in the
stack (`generic`), or as a TC ingress classifier (`tc`, clsact, direct action).
`auto` picks by device: native XDP on NIC drivers, TC on virtual devices
(veth, tap, bridges...: anything with a link kind). On veth, native XDP takes
GSO/TSO away from the peer (every 64 KiB send becomes ~45 frames) and generic
XDP copies every GSO packet to linearise it; a TC program sees the GSO packet
as it is, so TCP runs at the speed it has without a filter.

Detach only removes a program whose id is ours, so another tool's XDP program
or TC filter on the same interface is never touched."""

from __future__ import annotations

import errno
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from ..base.errors import InterfaceError, InvalidArgument, NotAttachedError

XDP_FLAGS_UPDATE_IF_NOEXIST = 1
XDP_FLAGS_SKB_MODE = 2
XDP_FLAGS_DRV_MODE = 4
XDP_FLAGS_REPLACE = 16

MODES = ("auto", "native", "generic", "tc")
_ATTACHED_MODE = {1: "native", 2: "generic", 3: "offload", 4: "multi"}
TC_INGRESS = 0xFFFFFFF2  # clsact's ingress hook
TC_PRIO = 1  # first among the ingress filters: a firewall judges before the others
TC_NAME = "samixdp"  # filters are named samixdp:<program id> (pyroute2 does not decode TCA_BPF_ID)


@dataclass(frozen=True)
class Programs:
    """The datapath's entry points: the XDP program and the TC one."""

    xdp_fd: int
    xdp_id: int
    tc_fd: int
    tc_id: int


@dataclass(frozen=True)
class XdpState:
    """Where the datapath runs on one interface; `mode` native/generic/tc, None if not."""

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


def _tc_filters(ipr: IPRoute, idx: int) -> list[tuple[int, int, str]]:
    """(prio, handle, name) of the bpf filters on the ingress hook (none without clsact)."""
    try:
        msgs = ipr.get_filters(index=idx, parent=TC_INGRESS)
    except NetlinkError as exc:
        if exc.code in (errno.EINVAL, errno.ENOENT):
            return []
        raise
    out = []
    for m in msgs:
        opts = m.get_attr("TCA_OPTIONS")
        if m.get_attr("TCA_KIND") != "bpf" or not opts:
            continue
        out.append((int(m["info"]) >> 16, int(m["handle"]), str(opts.get_attr("TCA_BPF_NAME"))))
    return out


def _tc_of(ipr: IPRoute, idx: int, tc_id: int) -> tuple[int, int] | None:
    """(prio, handle) of our TC filter for program `tc_id`, if attached."""
    for prio, handle, name in _tc_filters(ipr, idx):
        if name == f"{TC_NAME}:{tc_id}":
            return prio, handle
    return None


def _state(ipr: IPRoute, idx: int, ifname: str, progs: Programs) -> XdpState:
    """Where our datapath runs on `idx` (prog_id 0 and mode None: nowhere)."""
    xdp_id, xdp_mode = _xdp_of(ipr.get_links(idx)[0])
    if xdp_id and xdp_id == progs.xdp_id:
        return XdpState(ifname, idx, xdp_id, xdp_mode)
    if _tc_of(ipr, idx, progs.tc_id):
        return XdpState(ifname, idx, progs.tc_id, "tc")
    return XdpState(ifname, idx, 0, None)


def query(ifname: str) -> XdpState:
    """The interface's XDP program, whoever's it is (fails for a missing interface)."""
    with IPRoute() as ipr:
        idx = _index(ipr, ifname)
        msg = ipr.get_links(idx)[0]
        prog_id, mode = _xdp_of(msg)
        return XdpState(ifname, idx, prog_id, mode)


def list_attached(progs: Programs) -> list[XdpState]:
    """Interfaces of this network namespace running our datapath, in any mode."""
    out = []
    with IPRoute() as ipr:
        for msg in ipr.get_links():
            idx = int(msg["index"])
            st = _state(ipr, idx, msg.get_attr("IFLA_IFNAME"), progs)
            if st.mode is not None:
                out.append(st)
    return out


def auto_mode(ifname: str) -> str:
    """What `auto` picks for the interface: tc on a virtual device, native XDP on
    a NIC driver (generic when the driver has no XDP)."""
    with IPRoute() as ipr:
        return _auto_mode(ipr, _index(ipr, ifname))


def _auto_mode(ipr: IPRoute, idx: int) -> str:
    info = ipr.get_links(idx)[0].get_attr("IFLA_LINKINFO")
    return "tc" if info and info.get_attr("IFLA_INFO_KIND") else "native"


def _attach_tc(ipr: IPRoute, idx: int, progs: Programs) -> None:
    try:
        ipr.tc("add", "clsact", idx)
    except NetlinkError as exc:
        if exc.code != errno.EEXIST:
            raise
    ipr.tc(
        "add-filter", "bpf", idx, fd=progs.tc_fd, name=f"{TC_NAME}:{progs.tc_id}",
        parent=TC_INGRESS, prio=TC_PRIO, direct_action=True,
    )


def _detach_tc(ipr: IPRoute, idx: int, prio: int, handle: int) -> None:
    ipr.tc("del-filter", "bpf", idx, handle, parent=TC_INGRESS, prio=prio)
    if not _tc_filters(ipr, idx):
        try:  # the clsact qdisc was ours, unless another filter still uses it
            ipr.tc("del", "clsact", idx)
        except NetlinkError:
            pass


def _set(ipr: IPRoute, idx: int, fd: int, flags: int, expected_fd: int | None = None) -> None:
    attrs: list[tuple[str, int]] = [("IFLA_XDP_FD", fd), ("IFLA_XDP_FLAGS", flags)]
    if expected_fd is not None:
        attrs.append(("IFLA_XDP_EXPECTED_FD", expected_fd))
    ipr.link("set", index=idx, xdp={"attrs": attrs})


def auto_modes(ifname: str) -> tuple[str, ...]:
    """The modes `auto` may end in on the interface: tc on a virtual device; native,
    or generic where the driver has no XDP, on a NIC."""
    return ("tc",) if auto_mode(ifname) == "tc" else ("native", "generic")


def _attach_xdp(ipr: IPRoute, idx: int, ifname: str, progs: Programs, mode: str) -> XdpState:
    """XDP in `mode` (native, generic, or auto: native falling back to generic)."""
    cur_id, _ = _xdp_of(ipr.get_links(idx)[0])
    if cur_id:
        raise InterfaceError(
            f"{ifname} already has another XDP program (id {cur_id}); "
            "remove it first, sami-xdp will not replace it"
        )
    tries = ("native", "generic") if mode == "auto" else (mode,)
    last_err = ""
    for m in tries:
        flag = XDP_FLAGS_DRV_MODE if m == "native" else XDP_FLAGS_SKB_MODE
        try:
            _set(ipr, idx, progs.xdp_fd, flag | XDP_FLAGS_UPDATE_IF_NOEXIST)
        except NetlinkError as exc:
            last_err = f"{m}: {exc.args[1] if len(exc.args) > 1 else exc}"
            continue
        return _state(ipr, idx, ifname, progs)
    raise InterfaceError(f"cannot attach XDP to {ifname} ({last_err})")


def _attach_new(ipr: IPRoute, idx: int, ifname: str, progs: Programs, mode: str) -> XdpState:
    """Attaches where our datapath does not run yet."""
    want = _auto_mode(ipr, idx) if mode == "auto" else mode
    if want == "tc":
        try:
            _attach_tc(ipr, idx, progs)
        except NetlinkError as exc:
            raise InterfaceError(f"cannot attach the TC program to {ifname} ({exc})") from exc
        return _state(ipr, idx, ifname, progs)
    return _attach_xdp(ipr, idx, ifname, progs, "auto" if mode == "auto" else want)


def _remove(ipr: IPRoute, idx: int, cur: XdpState, progs: Programs) -> None:
    """Takes our datapath off in the mode `cur` says it runs in."""
    try:
        if cur.mode == "tc":
            found = _tc_of(ipr, idx, progs.tc_id)
            if found:
                _detach_tc(ipr, idx, *found)
        else:
            flag = XDP_FLAGS_DRV_MODE if cur.mode == "native" else XDP_FLAGS_SKB_MODE
            _set(ipr, idx, -1, flag | XDP_FLAGS_REPLACE, expected_fd=progs.xdp_fd)
    except NetlinkError as exc:
        raise InterfaceError(f"cannot detach from {cur.ifname}: {exc}") from exc


def attach(ifname: str, progs: Programs, mode: str = "auto") -> XdpState:
    """Attaches in `mode` (auto: see auto_mode; native falls back to generic when
    the driver has no XDP). Returns what we got."""
    if mode not in MODES:
        raise InvalidArgument(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    with IPRoute() as ipr:
        idx = _index(ipr, ifname)
        cur = _state(ipr, idx, ifname, progs)
        if cur.mode is not None:
            if mode in ("auto", cur.mode):
                return cur
            raise InvalidArgument(
                f"{ifname} already runs sami-xdp in {cur.mode} mode: detach it first"
            )
        return _attach_new(ipr, idx, ifname, progs, mode)


def reattach(ifname: str, progs: Programs, mode: str) -> XdpState:
    """Moves our datapath on `ifname` to `mode` (attaches it if it runs nowhere there).

    Between TC and XDP the new attachment is made before the old one is removed, so
    the link is never unfiltered (for that instant a packet may meet both, which
    judge it alike on the same maps). Between native and generic XDP the kernel
    holds one XDP program per link: the old one goes first, and packets arriving in
    between (the time of two netlink calls) are not filtered."""
    if mode not in MODES:
        raise InvalidArgument(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    with IPRoute() as ipr:
        idx = _index(ipr, ifname)
        cur = _state(ipr, idx, ifname, progs)
        if cur.mode is None:
            return _attach_new(ipr, idx, ifname, progs, mode)
        want = _auto_mode(ipr, idx) if mode == "auto" else mode
        if cur.mode == want or (mode == "auto" and want == "native" and cur.mode == "generic"):
            return cur
        if want == "tc" or cur.mode == "tc":
            _attach_new(ipr, idx, ifname, progs, mode)
            _remove(ipr, idx, cur, progs)
            return _state(ipr, idx, ifname, progs)
        _remove(ipr, idx, cur, progs)
        return _attach_xdp(ipr, idx, ifname, progs, mode)


def detach(ifname: str, progs: Programs) -> XdpState:
    with IPRoute() as ipr:
        idx = _index(ipr, ifname)
        cur = _state(ipr, idx, ifname, progs)
        if cur.mode is None:
            raise NotAttachedError(f"sami-xdp is not attached to {ifname}")
        _remove(ipr, idx, cur, progs)
        return cur
