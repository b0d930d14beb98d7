"""The sending side of one round: select the VM's state from the maps (a full
snapshot or the delta since the previous round) and encode it as a signed bundle."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Literal

from ..base.errors import InvalidArgument
from ..base.netutil import in_networks
from ..loader.pinned import Firewall
from ..policy.protect import list_protected
from .bundle import DEFAULT_VALIDITY_S, FLAG_DELTA, FLAG_FINAL, encode_bundle
from .dirty import DirtyLog
from .keys import HostIdentity, validate_host_id
from .select import ExportState, VmState, delta_since, dirty_state, export_vm_state
from .vmset import VmAddrs

Kind = Literal["full", "delta", "final"]
KINDS: tuple[Kind, ...] = ("full", "delta", "final")


def as_vms(vms: VmAddrs | str | Sequence[str]) -> VmAddrs:
    """A VM given as its address, its addresses, or already parsed."""
    return vms if isinstance(vms, VmAddrs) else VmAddrs.parse(vms)


def require_protected(fw: Firewall, vms: VmAddrs | str | Sequence[str]) -> VmAddrs:
    """Only a VM behind this host has state here to send: every one of its addresses
    must lie in a protected prefix."""
    vm = as_vms(vms)
    protected = list_protected(fw)
    inside = in_networks(vm.addrs, protected)
    if not inside.all():
        shown = ", ".join(map(str, protected)) or "none"
        ip = vm.ips[int((~inside).argmax())]
        raise InvalidArgument(f"{ip} is not in a protected prefix here (protected: {shown})")
    return vm


def build_bundle(
    fw: Firewall,
    vms: VmAddrs | str | Sequence[str],
    audience: str,
    seq: int,
    migration_id: bytes,
    kind: Kind = "full",
    since_state: ExportState | None = None,
    *,
    identity: HostIdentity,
    validity_s: float = DEFAULT_VALIDITY_S,
    compression: str = "none",
    include_acl: bool = True,
    timings: dict[str, float] | None = None,
    dirty: DirtyLog | None = None,
    selected: VmState | None = None,
) -> bytes:
    """Selects the VM's state from `fw` and returns a signed bundle for `audience`.
    `vms`: the VM's address, or all of them (one bundle holds them all).

    kind "full": every live entry. "delta": what changed since `since_state`
    (which must hold a previous round). "final": the cutover round, a delta
    if `since_state` holds a previous round, else a full snapshot. When given,
    `since_state` is advanced in place to this round. `dirty`: the VM's dirty
    log (started before the full round): a delta reads only the sessions it
    names, unless the log overflowed (then the tables are scanned). `selected`: a
    full round's state read already."""
    if kind not in KINDS:
        raise ValueError("kind must be full, delta or final")
    validate_host_id(audience)
    vm = require_protected(fw, vms)
    t0 = time.perf_counter()
    has_prev = since_state is not None and since_state.rounds > 0
    if kind == "delta" and not has_prev:
        raise ValueError("a delta needs since_state from a previous round")
    is_delta = kind == "delta" or (kind == "final" and has_prev)
    changed = dirty.cut() if dirty is not None and is_delta else None
    gone = None
    if changed is not None:
        full, gone = dirty_state(fw, vm, changed, include_acl=include_acl)
    elif selected is not None and kind == "full":
        full = selected
    else:
        full = export_vm_state(fw, vm, include_acl=include_acl)
    flags = 0
    state: VmState = full
    if is_delta:
        assert since_state is not None
        state = delta_since(since_state, full, dirty_gone=gone)
        flags |= FLAG_DELTA
    if kind == "final":
        flags |= FLAG_FINAL
    t1 = time.perf_counter()
    sections = state.sections()
    t2 = time.perf_counter()
    tm: dict[str, float] = {}
    data = encode_bundle(
        sections,
        identity=identity,
        vms=state.vms.addrs,
        audience=audience,
        seq=seq,
        migration_id=migration_id,
        layout_version=fw.const("SAMIXDP_LAYOUT_VERSION"),
        flags=flags,
        acl_digest=state.acl_digest,
        validity_s=validity_s,
        compression=compression,
        timings=tm,
    )
    if since_state is not None:
        since_state.advance(state, full, sessions_whole=gone is None)
    if timings is not None:
        timings.update(full.timings)
        timings["delta_s"] = t1 - t0 - sum(full.timings.values())
        timings["to_wire_s"] = t2 - t1
        timings.update(tm)
        timings["total_s"] = time.perf_counter() - t0
    return data
