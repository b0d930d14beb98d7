"""How ACL rules get into and out of a bundle: a small interface to the ACL owner.

The ACL module (sami_xdp.acl) owns the rules; migration only needs the VM's
effective, ordered rule list out on the source and in on the destination.
`AclHooks` is that interface:

    export(fw, vm_ip)            -> rules | blob | None   the VM's rules (None: no section)
    replace(fw, vm_ip, rules)    -> None                  the VM's rules become exactly these
    snapshot(fw, vm_ip)          -> token                 (for rollback/abort; default: export)
    restore(fw, vm_ip, token)    -> None                  (default: replace with the token)
    check(fw, vm_ip, rules)      -> None                  optional: raise if they cannot fit

`rules` is a NumPy structured array of `acl_records_dtype()` (the fields of
struct acl_rule plus `priority` and `hits`), or an opaque `bytes` blob that the
bundle carries unchanged (`ruleset digest` covers it either way). A token
must be an array, bytes or None (it is saved in the state dir for abort).

`default_acl_hooks()` uses `sami_xdp.acl.migration_hooks()` if the ACL module
provides one, else `AclModuleHooks`, an adapter over its public functions
(vm_entries, read_rules, compile_sets, replace_rules, hits).
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..layout import Layout, load_layout
from ..loader.pinned import Firewall, possible_cpus
from ..netutil import ip_to_be32
from .wire import ACL_WF_WAS_IFACE_BOUND, ACL_WIRE

AclRules = np.ndarray | bytes
AclToken = np.ndarray | bytes | None


def acl_records_dtype(layout: Layout | None = None) -> np.dtype:
    """struct acl_rule + priority (lower first) + hits."""
    base = (layout or load_layout()).dtype("acl_rule")
    fields = [(n, base[n]) for n in base.names or ()]
    return np.dtype(fields + [("priority", "<u4"), ("hits", "<u8")])


@dataclass
class AclHooks:
    export: Callable[[Firewall, str], AclRules | None]
    replace: Callable[[Firewall, str, AclRules], None]
    snapshot: Callable[[Firewall, str], AclToken] | None = None
    restore: Callable[[Firewall, str, AclToken], None] | None = None
    name: str = "custom"
    check: Callable[[Firewall, str, AclRules], None] | None = None  # raise if it cannot fit

    def take_snapshot(self, fw: Firewall, vm: str) -> AclToken:
        fn = self.snapshot or self.export
        return fn(fw, vm)

    def put_back(self, fw: Firewall, vm: str, token: AclToken) -> None:
        if self.restore is not None:
            self.restore(fw, vm, token)
            return
        self.replace(fw, vm, token if token is not None else empty_rules())


def empty_rules() -> np.ndarray:
    return np.zeros(0, dtype=acl_records_dtype())


# ---- records <-> wire -------------------------------------------------------------


def rules_to_wire(rules: np.ndarray) -> np.ndarray:
    """Ordered wire records of the VM's rules.

    Interface-bound rules cannot be mapped to the destination's interfaces.
    Migration never widens what reaches the VM: an interface-bound allow rule
    is dropped (it would never match there), an interface-bound deny rule is
    kept for every interface (flag ACL_WF_WAS_IFACE_BOUND)."""
    names = rules.dtype.names or ()
    prio = rules["priority"] if "priority" in names else np.arange(len(rules), dtype=np.uint32)
    order = np.argsort(prio, kind="stable")
    r = rules[order]
    bound = r["ifindex"] != 0 if "ifindex" in names else np.zeros(len(r), bool)
    keep = ~(bound & (r["action"] != 2))  # ACL_ACT_DENY = 2
    r, bound, prio = r[keep], bound[keep], np.asarray(prio)[order][keep]
    out = np.zeros(len(r), dtype=ACL_WIRE)
    out["priority"] = prio
    for f in ("src_addr", "src_mask", "dport_lo", "dport_hi", "vlan", "proto", "action"):
        out[f] = r[f]
    out["flags"] = np.where(bound, ACL_WF_WAS_IFACE_BOUND, 0)
    if "hits" in names:
        out["hits"] = r["hits"]
    return out


def wire_to_rules(wire: np.ndarray) -> np.ndarray:
    out = np.zeros(len(wire), dtype=acl_records_dtype())
    for f in (
        "priority",
        "src_addr",
        "src_mask",
        "dport_lo",
        "dport_hi",
        "vlan",
        "proto",
        "action",
        "hits",
    ):
        out[f] = wire[f]
    return out  # id and ifindex 0: the destination's ACL owner assigns ids


def ruleset_digest(section: bytes) -> bytes:
    """16-byte digest of the ACL section as it travels (records or blob)."""
    return hashlib.sha256(b"samixdp-acl\0" + section).digest()[:16]


# ---- the ACL module (sami_xdp.acl) ----------------------------------------------------


class AclModuleHooks:
    """Adapter to sami_xdp.acl: the VM's /32 rules in the pinned `acl_rules` table.

    What migrates is what `acl.vm_entries` calls the VM's own rules (rules
    whose destination is exactly the VM); rules for prefixes that cover
    several VMs are host configuration, present on both hosts. Replacing
    rebuilds the rule set once (one atomic generation flip); new rules get
    fresh ids (never the VM's previous ids, so a restore keeps their hit
    counters) and start their hit counters at the migrated values."""

    name = "sami_xdp.acl"

    def __init__(self, mod: object) -> None:
        self.acl = mod

    def _mine(self, entries: np.ndarray, vm: str) -> np.ndarray:
        addr = ip_to_be32(vm)
        return (entries["dst_addr"] == addr) & (entries["dst_prefixlen"] == 32)

    def export(self, fw: Firewall, vm: str) -> np.ndarray:
        e = self.acl.vm_entries(fw, vm)  # type: ignore[attr-defined]
        out = np.zeros(len(e), dtype=acl_records_dtype(fw.layout))
        for f in e["rule"].dtype.names:
            out[f] = e["rule"][f]
        out["priority"] = e["priority"]
        if len(e):
            counts = self.acl.hits(fw, e["rule"]["id"])  # type: ignore[attr-defined]
            out["hits"] = [counts[int(i)] for i in e["rule"]["id"]]
        return out

    def snapshot(self, fw: Firewall, vm: str) -> np.ndarray:
        entries = self.acl.read_rules(fw)  # type: ignore[attr-defined]
        return entries[self._mine(entries, vm)].copy()

    def _entries(self, fw: Firewall, vm: str, rules: np.ndarray, ids: list[int]) -> np.ndarray:
        e = np.zeros(len(rules), dtype=fw.maps["acl_rules"].value_dtype)
        have = rules.dtype.names or ()
        for f in e["rule"].dtype.names or ():
            if f in have:
                e["rule"][f] = rules[f]
        e["rule"]["id"] = ids
        e["rule"]["ifindex"] = 0
        e["priority"] = rules["priority"]
        e["dst_addr"] = ip_to_be32(vm)
        e["dst_prefixlen"] = 32
        return e

    def _free_ids(self, fw: Firewall, taken: np.ndarray, count: int) -> list[int]:
        limit = fw.const("SAMIXDP_ACL_MAX_RULE_ID")
        used = set(int(i) for i in taken)
        out = [i for i in range(1, min(limit, len(used) + count + 1)) if i not in used][:count]
        if len(out) < count:
            raise ValueError(f"no free ACL rule ids (at most {limit - 1} rules)")
        return out

    def _planned(self, fw: Firewall, vm: str, rules: AclRules) -> tuple[np.ndarray, list[int]]:
        if isinstance(rules, bytes):
            raise TypeError("sami_xdp.acl takes rule records, not an opaque blob")
        current = self.acl.read_rules(fw)  # type: ignore[attr-defined]
        keep = current[~self._mine(current, vm)]
        ids = self._free_ids(fw, current["rule"]["id"], len(rules))
        new = self._entries(fw, vm, rules, ids)
        return np.concatenate([keep, new]), ids

    def check(self, fw: Firewall, vm: str, rules: AclRules) -> None:
        """Raises if the rules cannot be installed (compiles, writes nothing)."""
        entries, _ = self._planned(fw, vm, rules)
        self.acl.compile_sets(fw, entries)  # type: ignore[attr-defined]

    def replace(self, fw: Firewall, vm: str, rules: AclRules) -> None:
        entries, ids = self._planned(fw, vm, rules)
        self.acl.replace_rules(fw, entries)  # type: ignore[attr-defined]
        assert isinstance(rules, np.ndarray)
        hits = fw.maps["acl_hits"]
        cpus = possible_cpus()
        for rule_id, n in zip(ids, rules["hits"].tolist(), strict=True):
            value = np.zeros(cpus, dtype=np.uint64)
            value[0] = n
            hits.update(np.array([rule_id], np.uint32), value)

    def restore(self, fw: Firewall, vm: str, token: AclToken) -> None:
        current = self.acl.read_rules(fw)  # type: ignore[attr-defined]
        keep = current[~self._mine(current, vm)]
        old = np.asarray(token) if token is not None else current[:0]
        clash = np.isin(old["rule"]["id"], keep["rule"]["id"])
        if clash.any():  # ids taken meanwhile by other rules: give those new ids
            old = old.copy()
            taken = np.concatenate([keep["rule"]["id"], old["rule"]["id"]])
            old["rule"]["id"][clash] = self._free_ids(fw, taken, int(clash.sum()))
        self.acl.replace_rules(fw, np.concatenate([keep, old]))  # type: ignore[attr-defined]

    def hooks(self) -> AclHooks:
        return AclHooks(
            self.export, self.replace, self.snapshot, self.restore, name=self.name, check=self.check
        )


def _no_acl_export(fw: Firewall, vm: str) -> None:
    return None


def _no_acl_replace(fw: Firewall, vm: str, rules: AclRules) -> None:
    raise RuntimeError("this host has no ACL module (sami_xdp.acl) to install ACL rules")


def default_acl_hooks() -> AclHooks:
    """sami_xdp.acl's own `migration_hooks()` if it has one, else the adapter to its
    rule table; without the module, bundles carry no ACL section."""
    try:
        mod = importlib.import_module("sami_xdp.acl")
    except ModuleNotFoundError as exc:
        if exc.name != "sami_xdp.acl":
            raise
        return AclHooks(_no_acl_export, _no_acl_replace, name="none")
    if hasattr(mod, "migration_hooks"):
        hooks = mod.migration_hooks()
        if isinstance(hooks, AclHooks):
            return hooks
        return AclHooks(
            export=hooks.export,
            replace=hooks.replace,
            snapshot=getattr(hooks, "snapshot", None),
            restore=getattr(hooks, "restore", None),
            check=getattr(hooks, "check", None),
            name="sami_xdp.acl",
        )
    return AclModuleHooks(mod).hooks()
