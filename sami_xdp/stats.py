"""Verdict counters, summed over CPUs, by reason name."""

from __future__ import annotations

import numpy as np

from .loader.pinned import Firewall

REASON_NAMES = {
    "REASON_PASS_SESSION": "pass-session",
    "REASON_PASS_OUTBOUND": "pass-outbound",
    "REASON_PASS_ACL": "pass-acl",
    "REASON_PASS_TRANSIT": "pass-transit",
    "REASON_PASS_NON_IP": "pass-non-ip",
    "REASON_PASS_RELATED": "pass-related",
    "REASON_PASS_FRAGMENT": "pass-fragment",
    "REASON_PASS_PICKUP": "pass-pickup",
    "REASON_DROP_BLACKLIST": "drop-blacklist",
    "REASON_DROP_NO_SESSION": "drop-no-session",
    "REASON_DROP_ACL_DENY": "drop-acl-deny",
    "REASON_DROP_ACL_DEFAULT": "drop-acl-default",
    "REASON_DROP_TABLE_FULL": "drop-table-full",
    "REASON_DROP_MALFORMED": "drop-malformed",
    "REASON_DROP_SYN_RATE": "drop-syn-rate",
    "REASON_DROP_FRAGMENT": "drop-fragment",
    "REASON_DROP_INVALID": "drop-invalid",
}


def reason_names(fw: Firewall) -> list[str]:
    names = [""] * fw.const("SAMIXDP_N_REASONS")
    for const, name in REASON_NAMES.items():
        names[fw.const(const)] = name
    return names


def read_verdicts(fw: Firewall) -> dict[str, dict[str, int]]:
    """{reason: {"packets": n, "bytes": n}} summed over CPUs."""
    names = reason_names(fw)
    m = fw.maps["verdicts"]
    out = {}
    for idx, name in enumerate(names):
        per_cpu = m.lookup(np.array([idx], dtype=np.uint32))
        assert per_cpu is not None
        out[name] = {
            "packets": int(per_cpu["packets"].sum()),
            "bytes": int(per_cpu["bytes"].sum()),
        }
    return out


def verdict_packets(fw: Firewall) -> dict[str, int]:
    return {k: v["packets"] for k, v in read_verdicts(fw).items()}
