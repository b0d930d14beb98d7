"""The host config file, `<config-dir>/samixdp.toml` (default /etc/samixdp): what
this host's firewall should be, for `samixdp apply` (ops/apply.py) and the agent.

    [firewall]                 # sizes are fixed when the firewall is first loaded
    max_sessions = 1048576
    max_unassured = 262144
    protect = ["10.1.1.0/24", "2001:db8:1::/64"]
    acl = "acl.yaml"           # the ACL rule file, relative to this file's directory
    [settings]                 # `samixdp config set` names; absent ones are defaults
    syn-rate = 200
    [[interface]]              # one per interface; mode and role default to auto
    name = "eth0"
    mode = "auto"
    role = "uplink"
    [agent]                    # `samixdp agent`'s options
    listen = "0.0.0.0:7800"

The file is checked whole before anything uses it: every error is one line naming
the file, the key (`interface[2].mode`, counted from 1) and what is wanted. Unknown
keys are errors (a typo must not be silently ignored), and so are duplicate
interfaces or prefixes, bad prefixes and values out of range. The file and the
ACL file must be owned by root (or whoever runs samixdp) and writable by no one
else, as their directory: whoever can write them decides what the firewall lets in.
"""

from __future__ import annotations

import difflib
import os
import re
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from ..base.errors import InvalidArgument
from ..base.layout import load_layout
from ..base.netutil import IPNetwork, parse_network
from ..base.values import read_input, seconds, whole
from ..loader.attach import MODES
from ..loader.compile import Limits
from ..migrate.errors import TrustStoreError
from ..migrate.importer import DEFAULT_PICKUP_S, MAX_PICKUP_S
from ..migrate.keys import parse_address
from ..migrate.transport import DEFAULT_MAX_MESSAGE, DEFAULT_TIMEOUT_S
from ..policy.acl import AclError, AclRule, read_rule_file
from ..policy.config import (
    FRAG_POLICIES,
    MAX_SESSIONS,
    MAX_SETTING,
    MAX_UNASSURED,
    config_names,
    parse_config_value,
)
from ..policy.protect import check_protectable
from ..policy.roles import ROLES

CONFIG_FILE = "samixdp.toml"
MAX_CONFIG_FILE = 1 << 20
IFNAMSIZ = 16  # the kernel's, with its NUL
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


@dataclass(frozen=True)
class InterfaceSpec:
    """An `[[interface]]`: where the datapath runs, how, and what the link leads to."""

    name: str
    mode: str = "auto"  # loader/attach.py MODES
    role: str = "auto"  # policy/roles.py ROLES


@dataclass(frozen=True)
class FirewallSpec:
    """`[firewall]`: first-load sizes, protected prefixes, the ACL file."""

    max_sessions: int = Limits.max_sessions
    max_unassured: int = Limits.max_unassured
    protect: tuple[IPNetwork, ...] = ()
    acl: Path | None = None  # absolute (resolved against the config file's directory)


@dataclass(frozen=True)
class AgentSpec:
    """`[agent]`: the defaults of `samixdp agent` on this host."""

    listen: str = "0.0.0.0:7800"
    metrics: str | None = None  # HOST:PORT of the metrics endpoint, if any
    pickup_s: float = DEFAULT_PICKUP_S
    max_message: int = DEFAULT_MAX_MESSAGE
    timeout_s: float = DEFAULT_TIMEOUT_S
    idle_s: float = 60.0
    handshake_s: float = 10.0
    max_conns: int = 32
    max_pending_per_ip: int = 4
    max_bundles: int = 2


@dataclass(frozen=True)
class HostConfig:
    """A checked host config file."""

    path: Path
    firewall: FirewallSpec = field(default_factory=FirewallSpec)
    settings: Mapping[str, int] = field(default_factory=dict)  # as written; others default
    interfaces: tuple[InterfaceSpec, ...] = ()
    agent: AgentSpec = field(default_factory=AgentSpec)


# (TOML key, AgentSpec field, kind, low, high, low bound open)
_AGENT_NUMBERS: tuple[tuple[str, str, type, float, float, bool], ...] = (
    ("pickup", "pickup_s", float, 0, MAX_PICKUP_S, False),
    ("max_message", "max_message", int, 1024, 1 << 31, False),
    ("timeout", "timeout_s", float, 0, 3600, True),
    ("idle", "idle_s", float, 0, 86400, True),
    ("handshake_timeout", "handshake_s", float, 0, 600, True),
    ("max_conns", "max_conns", int, 1, 4096, False),
    ("max_pending_per_ip", "max_pending_per_ip", int, 1, 4096, False),
    ("max_bundles", "max_bundles", int, 1, 64, False),
)
_TOP = ("firewall", "settings", "interface", "agent")
_FIREWALL = ("max_sessions", "max_unassured", "protect", "acl")
_INTERFACE = ("name", "mode", "role")
_AGENT = ("listen", "metrics", *(k for k, *_ in _AGENT_NUMBERS))


def key_name(prefix: str, name: str) -> str:
    """A key as TOML writes it: `settings."timeout.established"`, `firewall.acl`."""
    shown = name if _BARE_KEY.fullmatch(name) else f'"{name}"'
    return f"{prefix}.{shown}" if prefix else shown


class _File:
    """Errors that name this file and a key."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, key: str, what: str) -> NoReturn:
        raise InvalidArgument(f"{self.path}: {key}: {what}")

    def table(self, value: object, key: str, known: tuple[str, ...]) -> dict[str, object]:
        if not isinstance(value, dict):
            self.fail(key, f"must be a table, got {_kind(value)}")
        for name in value:
            if name not in known:
                guess = difflib.get_close_matches(name, known, n=1)
                hint = f"did you mean {guess[0]!r}? " if guess else ""
                self.fail(key_name(key, name), f"unknown key ({hint}known: {', '.join(known)})")
        return value

    def integer(self, value: object, key: str, lo: int, hi: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(key, f"must be a whole number, got {_kind(value)}")
        return whole(f"{self.path}: {key}", value, lo, hi)

    def number(self, value: object, key: str, lo: float, hi: float, lo_open: bool) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.fail(key, f"must be a number of seconds, got {_kind(value)}")
        return seconds(f"{self.path}: {key}", float(value), lo, hi, lo_open)

    def text(self, value: object, key: str) -> str:
        if not isinstance(value, str):
            self.fail(key, f"must be a string, got {_kind(value)}")
        return value

    def choice(self, value: object, key: str, choices: tuple[str, ...]) -> str:
        text = self.text(value, key)
        if text not in choices:
            self.fail(key, f"must be one of {', '.join(choices)}, got {text!r}")
        return text

    def address(self, value: object, key: str) -> str:
        text = self.text(value, key)
        try:
            parse_address(text)
        except TrustStoreError as exc:
            self.fail(key, str(exc))
        return text


def _kind(value: object) -> str:
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string",
             list: "an array", dict: "a table"}
    return names.get(type(value), type(value).__name__)


def _trusted(path: Path, what: str) -> None:
    """Refuses a file (or its directory) that someone other than root or us may write."""
    me = os.geteuid()
    for p, kind in ((path, what), (path.parent, f"the directory of the {what}")):
        try:
            st = p.stat()
        except OSError as exc:
            raise InvalidArgument(f"cannot read {p}: {exc.strerror or exc}") from exc
        if st.st_uid not in (0, me):
            raise InvalidArgument(
                f"refusing {p}: {kind} is owned by uid {st.st_uid}, not root "
                "(whoever can write it decides what the firewall lets in)"
            )
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise InvalidArgument(
                f"refusing {p}: {kind} is writable by group or others (chmod go-w {p})"
            )


def _read(path: Path, what: str) -> str:
    raw = read_input(path, what, MAX_CONFIG_FILE)
    _trusted(path, what)
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise InvalidArgument(f"{path}: not UTF-8 text") from None


def _firewall(f: _File, value: object) -> FirewallSpec:
    t = f.table(value, "firewall", _FIREWALL)
    spec = FirewallSpec()
    sessions = spec.max_sessions
    if "max_sessions" in t:
        sessions = f.integer(t["max_sessions"], "firewall.max_sessions", 1, MAX_SESSIONS)
    unassured = spec.max_unassured
    if "max_unassured" in t:
        unassured = f.integer(t["max_unassured"], "firewall.max_unassured", 1, MAX_UNASSURED)
    nets: list[IPNetwork] = []
    protect = t.get("protect", [])
    if not isinstance(protect, list):
        f.fail("firewall.protect", f"must be an array of prefixes, got {_kind(protect)}")
    for n, item in enumerate(protect, start=1):
        key = f"firewall.protect[{n}]"
        text = f.text(item, key)
        try:
            net = check_protectable(parse_network(text))
        except InvalidArgument as exc:
            f.fail(key, str(exc))
        if net in nets:
            f.fail(key, f"{net} is listed twice (also firewall.protect[{nets.index(net) + 1}])")
        nets.append(net)
    acl = None
    if "acl" in t:
        text = f.text(t["acl"], "firewall.acl")
        if not text:
            f.fail("firewall.acl", "must name the ACL rule file")
        acl = f.path.parent / text
    return FirewallSpec(sessions, unassured, tuple(nets), acl)


def _flat(f: _File, value: object) -> dict[str, object]:
    """[settings] with dotted keys read as written: `timeout.established = 5` (a
    nested table to TOML) and `"timeout.established" = 5` both name that setting."""
    if not isinstance(value, dict):
        f.fail("settings", f"must be a table, got {_kind(value)}")
    out: dict[str, object] = {}
    for name, item in value.items():
        inner = _flat(f, item) if isinstance(item, dict) else {"": item}
        for sub, v in inner.items():
            full = f"{name}.{sub}" if sub else name
            if full in out:
                f.fail(key_name("settings", full), "given twice")
            out[full] = v
    return out


def _settings(f: _File, value: object) -> dict[str, int]:
    names = tuple(config_names(load_layout()))
    t = f.table(_flat(f, value), "settings", names)
    out = {}
    for name, raw in t.items():
        key = key_name("settings", name)
        if name == "frag-policy":
            text = f.choice(raw, key, tuple(FRAG_POLICIES))
        else:
            text = str(f.integer(raw, key, 0, MAX_SETTING))
        try:
            out[name] = parse_config_value(name, text)
        except InvalidArgument as exc:
            f.fail(key, str(exc))
    return out


def _interface_name(f: _File, value: object, key: str) -> str:
    name = f.text(value, key)
    if (
        not name
        or len(name) >= IFNAMSIZ
        or name in (".", "..")
        or any(c in name for c in "/:") or any(c.isspace() for c in name)
    ):
        f.fail(key, f"not an interface name: {name[:40]!r} (1-15 characters, no / : or space)")
    return name


def _interfaces(f: _File, value: object) -> tuple[InterfaceSpec, ...]:
    if isinstance(value, dict):
        f.fail("interface", "must be [[interface]] tables (an array of them), got one [interface]")
    if not isinstance(value, list):
        f.fail("interface", f"must be [[interface]] tables, got {_kind(value)}")
    out: list[InterfaceSpec] = []
    for n, item in enumerate(value, start=1):
        key = f"interface[{n}]"
        t = f.table(item, key, _INTERFACE)
        if "name" not in t:
            f.fail(f"{key}.name", "missing: every [[interface]] names its interface")
        name = _interface_name(f, t["name"], f"{key}.name")
        seen = [i for i, spec in enumerate(out, start=1) if spec.name == name]
        if seen:
            f.fail(f"{key}.name", f"{name} is configured twice (also interface[{seen[0]}])")
        mode = f.choice(t.get("mode", "auto"), f"{key}.mode", MODES)
        role = f.choice(t.get("role", "auto"), f"{key}.role", ROLES)
        out.append(InterfaceSpec(name, mode, role))
    return tuple(out)


def _agent(f: _File, value: object) -> AgentSpec:
    t = f.table(value, "agent", _AGENT)
    kw: dict[str, object] = {}
    if "listen" in t:
        kw["listen"] = f.address(t["listen"], "agent.listen")
    if "metrics" in t:
        kw["metrics"] = f.address(t["metrics"], "agent.metrics")
    for name, attr, kind, lo, hi, lo_open in _AGENT_NUMBERS:
        if name not in t:
            continue
        key = f"agent.{name}"
        if kind is int:
            kw[attr] = f.integer(t[name], key, int(lo), int(hi))
        else:
            kw[attr] = f.number(t[name], key, lo, hi, lo_open)
    return AgentSpec(**kw)  # type: ignore[arg-type]


def parse_host_config(text: str, path: Path) -> HostConfig:
    """A host config from its text (`path` names it in errors and anchors `acl`)."""
    f = _File(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidArgument(f"{path}: not valid TOML: {' '.join(str(exc).split())}") from None
    f.table(data, "", _TOP)
    return HostConfig(
        path=path,
        firewall=_firewall(f, data.get("firewall", {})),
        settings=_settings(f, data.get("settings", {})),
        interfaces=_interfaces(f, data.get("interface", [])),
        agent=_agent(f, data.get("agent", {})),
    )


def load_host_config(path: Path) -> HostConfig:
    """Reads and checks the host config file (InvalidArgument, one line, if it is bad).
    The ACL file it names is read by `load_acl`."""
    return parse_host_config(_read(path, "host config file"), path)


def load_acl(cfg: HostConfig) -> list[AclRule]:
    """The rules of the config's ACL file (none without one), checked against the
    config's protected prefixes: every rule's VM must lie inside one of them."""
    if cfg.firewall.acl is None:
        return []
    path = cfg.firewall.acl
    try:
        if path.exists():  # (a missing one: read_rule_file says so)
            _trusted(path, "ACL file")
        return read_rule_file(load_layout(), list(cfg.firewall.protect), path)
    except AclError as exc:
        raise AclError(f"{cfg.path}: firewall.acl: {exc}") from None
    except InvalidArgument as exc:
        raise InvalidArgument(f"{cfg.path}: firewall.acl: {exc}") from None
