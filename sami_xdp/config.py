"""Runtime configuration slots of the datapath (the `config` map).

Timeouts are per session state in seconds, conntrack-like by default; the
other slots are SYN accounting, the ban time, the live ACL generation and the
fragment policy. `samixdp config set NAME VALUE` changes them live.
"""

from __future__ import annotations

from .errors import InvalidArgument
from .layout import Layout

STATE_NAMES = {
    0: "NONE",
    1: "SYN_SENT",
    2: "SYN_RECV",
    3: "ESTABLISHED",
    4: "FIN_WAIT",
    5: "CLOSE_WAIT",
    6: "TIME_WAIT",
    7: "CLOSED",
    8: "UDP_NEW",
    9: "UDP_REPLIED",
    10: "ICMP",
}
STATE_BY_NAME = {v: k for k, v in STATE_NAMES.items()}

DEFAULT_TIMEOUTS_S = {
    "SYN_SENT": 120,
    "SYN_RECV": 60,
    "ESTABLISHED": 432000,
    "FIN_WAIT": 120,
    "CLOSE_WAIT": 60,
    "TIME_WAIT": 120,
    "CLOSED": 10,
    "UDP_NEW": 30,
    "UDP_REPLIED": 180,
    "ICMP": 30,
}

FRAG_POLICIES = {"track": 0, "pass": 1, "drop": 2}


def config_names(layout: Layout) -> dict[str, int]:
    """Operator-facing names -> slot index."""
    c = layout.consts
    names = {f"timeout.{s.lower()}": STATE_BY_NAME[s] for s in DEFAULT_TIMEOUTS_S}
    names.update(
        {
            "syn-rate": c["CFG_SYN_RATE"],
            "syn-window-ms": c["CFG_SYN_WINDOW_MS"],
            "ban": c["CFG_BAN_S"],
            "frag-policy": c["CFG_FRAG_POLICY"],
        }
    )
    return names


def default_config_slots(layout: Layout) -> list[int]:
    c = layout.consts
    slots = [0] * c["SAMIXDP_N_CONFIG"]
    for state, seconds in DEFAULT_TIMEOUTS_S.items():
        slots[STATE_BY_NAME[state]] = seconds
    slots[c["CFG_SYN_RATE"]] = 200
    slots[c["CFG_SYN_WINDOW_MS"]] = 1000
    slots[c["CFG_BAN_S"]] = 60
    slots[c["CFG_ACL_GEN"]] = 0
    slots[c["CFG_FRAG_POLICY"]] = FRAG_POLICIES["track"]
    return slots


def parse_config_value(name: str, value: str) -> int:
    if name == "frag-policy":
        if value not in FRAG_POLICIES:
            raise InvalidArgument(f"frag-policy must be one of {', '.join(FRAG_POLICIES)}")
        return FRAG_POLICIES[value]
    try:
        number = int(value)
    except ValueError as exc:
        raise InvalidArgument(f"{name} needs a whole number, got {value!r}") from exc
    if number < 0 or number > 2**32:
        raise InvalidArgument(f"{name} out of range: {value}")
    if name in ("syn-rate", "syn-window-ms") and number == 0:
        raise InvalidArgument(f"{name} must be at least 1")
    return number
