"""The sending side of one round: select the VM's state from the maps (a full
snapshot or the delta since the previous round) and encode it as a signed bundle."""

from __future__ import annotations

import time
from typing import Literal

from ..base.errors import InvalidArgument
from ..loader.pinned import Firewall
from ..policy.protect import is_protected, list_protected
from .bundle import DEFAULT_VALIDITY_S, FLAG_DELTA, FLAG_FINAL, encode_bundle
from .keys import HostIdentity, validate_host_id
from .select import ExportState, VmState, delta_since, export_vm_state

Kind = Literal["full", "delta", "final"]
KINDS: tuple[Kind, ...] = ("full", "delta", "final")


def require_protected(fw: Firewall, vm: str) -> None:
    """Only a VM behind this host has state here to send."""
    if not is_protected(fw, vm):
        shown = ", ".join(map(str, list_protected(fw))) or "none"
        raise InvalidArgument(f"{vm} is not in a protected prefix here (protected: {shown})")


def build_bundle(
    fw: Firewall,
    vm: str,
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
) -> bytes:
    """Selects the VM's state from `fw` and returns a signed bundle for `audience`.

    kind "full": every live entry. "delta": what changed since `since_state`
    (which must hold a previous round). "final": the cutover round, a delta
    if `since_state` holds a previous round, else a full snapshot. When given,
    `since_state` is advanced in place to this round."""
    if kind not in KINDS:
        raise ValueError("kind must be full, delta or final")
    validate_host_id(audience)
    require_protected(fw, vm)
    t0 = time.perf_counter()
    full = export_vm_state(fw, vm, include_acl=include_acl)
    has_prev = since_state is not None and since_state.rounds > 0
    flags = 0
    state: VmState = full
    if kind == "delta" and not has_prev:
        raise ValueError("a delta needs since_state from a previous round")
    if kind == "delta" or (kind == "final" and has_prev):
        assert since_state is not None
        state = delta_since(since_state, full)
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
        vm=state.vm,
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
        since_state.advance(state, full)
    if timings is not None:
        timings.update(full.timings)
        timings["delta_s"] = t1 - t0 - sum(full.timings.values())
        timings["to_wire_s"] = t2 - t1
        timings.update(tm)
        timings["total_s"] = time.perf_counter() - t0
    return data
