"""Runtime configuration slots of the datapath (the `config` map).

Timeouts are per session state in seconds, conntrack-like by default; the
other slots are SYN accounting, the ban time, the live ACL generation, the
fragment policy and the event rate. `samixdp config set NAME VALUE` changes them live. Slot
indices and state names come from the header (CFG_*, ST_*).
"""

from __future__ import annotations

from pathlib import Path

from ..base.errors import InvalidArgument
from ..base.layout import Layout, load_layout
from ..loader.compile import Limits
from ..loader.pinned import Firewall

# conntrack's defaults; unassured UDP (one request, one answer) expires as fast as
# unanswered UDP, only a flow that keeps talking (UDP_ASSURED) lives long
DEFAULT_TIMEOUTS_S = {
    "SYN_SENT": 120,
    "SYN_SENT2": 120,
    "SYN_RECV": 60,
    "ESTABLISHED": 432000,
    "FIN_WAIT": 120,
    "CLOSE_WAIT": 60,
    "LAST_ACK": 30,
    "TIME_WAIT": 120,
    "CLOSED": 10,
    "UDP_NEW": 30,
    "UDP_REPLIED": 30,
    "UDP_ASSURED": 180,
    "ICMP": 30,
}
DEFAULT_SYN_RATE = 200
DEFAULT_SYN_WINDOW_MS = 1000
DEFAULT_BAN_S = 60
# events per second and CPU into the event ring (`samixdp events`); 0 turns them off
DEFAULT_EVENT_RATE = 1000

FRAG_POLICIES = {"track": 0, "pass": 1, "drop": 2}

MAX_SETTING = 2**32  # the largest value a numeric setting takes (config slots are u64)
MAX_SESSIONS = 1 << 24  # 2.3 GiB of session map
MAX_UNASSURED = 1 << 22


def state_names(layout: Layout) -> dict[int, str]:
    """ST_* value -> name, e.g. 3 -> "ESTABLISHED"."""
    return layout.names("ST_")


def config_names(layout: Layout) -> dict[str, int]:
    """Operator-facing names -> slot index."""
    c = layout.consts
    names = {f"timeout.{s.lower()}": c[f"ST_{s}"] for s in DEFAULT_TIMEOUTS_S}
    names.update(
        {
            "syn-rate": c["CFG_SYN_RATE"],
            "syn-window-ms": c["CFG_SYN_WINDOW_MS"],
            "ban": c["CFG_BAN_S"],
            "frag-policy": c["CFG_FRAG_POLICY"],
            "tcp-liberal": c["CFG_TCP_LIBERAL"],
            "events-rate": c["CFG_EVENT_RATE"],
        }
    )
    return names


def default_config_slots(layout: Layout) -> list[int]:
    c = layout.consts
    slots = [0] * c["SAMIXDP_N_CONFIG"]
    for state, seconds in DEFAULT_TIMEOUTS_S.items():
        slots[c[f"ST_{state}"]] = seconds
    slots[c["CFG_SYN_RATE"]] = DEFAULT_SYN_RATE
    slots[c["CFG_SYN_WINDOW_MS"]] = DEFAULT_SYN_WINDOW_MS
    slots[c["CFG_BAN_S"]] = DEFAULT_BAN_S
    slots[c["CFG_ACL_GEN"]] = 0
    slots[c["CFG_FRAG_POLICY"]] = FRAG_POLICIES["track"]
    slots[c["CFG_EVENT_RATE"]] = DEFAULT_EVENT_RATE
    return slots


def default_settings(layout: Layout) -> dict[str, int]:
    """Every operator-facing setting -> its value in a new firewall."""
    slots = default_config_slots(layout)
    return {name: slots[idx] for name, idx in config_names(layout).items()}


def read_settings(fw: Firewall) -> dict[str, int]:
    """Every operator-facing setting -> its live value."""
    slots = fw.read_config()
    return {name: slots[idx] for name, idx in config_names(fw.layout).items()}


def write_settings(fw: Firewall, values: dict[str, int]) -> None:
    """Sets the named settings in one write of the config word (the other slots,
    the live ACL generation among them, are written back as they were read)."""
    names = config_names(fw.layout)
    slots = fw.read_config()
    for name, value in values.items():
        slots[names[name]] = value
    fw.write_config(slots)


def show_setting(name: str, value: int) -> str:
    """A setting's value as the operator writes it (frag-policy by name)."""
    if name == "frag-policy":
        return next((k for k, v in FRAG_POLICIES.items() if v == value), str(value))
    return str(value)


def create_firewall(path: Path, limits: Limits) -> Firewall:
    """The host's firewall at `path`: reopened if pinned, else compiled and pinned
    with the default settings."""
    return Firewall.create(path, limits, default_config_slots(load_layout()))


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
    if name == "tcp-liberal" and number > 1:
        raise InvalidArgument("tcp-liberal is 0 (window checks) or 1 (out-of-window TCP passes)")
    return number
