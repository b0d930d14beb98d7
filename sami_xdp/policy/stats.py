"""Verdict counters, summed over CPUs, by reason name.

A reason's printed name is its header constant's: REASON_DROP_ACL_DEFAULT is
"drop-acl-default"."""

from __future__ import annotations

import numpy as np

from ..base.layout import Layout
from ..loader.pinned import Firewall


def reason_names(layout: Layout) -> list[str]:
    """Printed name of each verdict reason, indexed by its value."""
    names = [""] * layout.const("SAMIXDP_N_REASONS")
    for value, name in layout.names("REASON_").items():
        names[value] = name.lower().replace("_", "-")
    return names


def read_verdicts(fw: Firewall) -> dict[str, dict[str, int]]:
    """{reason: {"packets": n, "bytes": n}} summed over CPUs."""
    m = fw.maps["verdicts"]
    out = {}
    for idx, name in enumerate(reason_names(fw.layout)):
        per_cpu = m.lookup(np.array([idx], dtype=np.uint32))
        assert per_cpu is not None
        out[name] = {
            "packets": int(per_cpu["packets"].sum()),
            "bytes": int(per_cpu["bytes"].sum()),
        }
    return out


def verdict_packets(fw: Firewall) -> dict[str, int]:
    return {k: v["packets"] for k, v in read_verdicts(fw).items()}
