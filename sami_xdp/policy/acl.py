"""ACL rules: validation, the pinned rule table, and compilation to rule sets.

The operator's rules live in the pinned `acl_rules` map (id -> rule, priority,
destination). The datapath never scans that table: userspace compiles, for
every destination (a VM's address or a prefix), the ordered first-match list of all
rules whose destination covers it, into the LPM trie `acl_sets`. One LPM
lookup then yields the complete list for a packet's VM, so per-packet cost
depends on that VM's rules only, never on other VMs'.

Every change rebuilds the inactive generation of `acl_sets` and flips
CFG_ACL_GEN: a reload is atomic for the datapath.

Rules of both families share the tables: destinations and sources are `struct
ip_addr` (IPv4 as the IPv4-mapped address) and prefix lengths count in that
mapped space (an IPv4 /24 is a /120, a single VM of either family a /128). A
rule's source and VM are of one family.
"""

from __future__ import annotations

import ipaddress
import socket
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from ..base.errors import InvalidArgument
from ..base.layout import Layout
from ..base.netutil import (
    IPNetwork,
    addr_array,
    ip_to_addr,
    mapped_prefixlen,
    network_from_mapped,
    network_mask,
    parse_network,
    subnet_of,
)
from ..loader.batch import read_array_range
from ..loader.pinned import Firewall, possible_cpus
from .protect import list_protected

DEFAULT_PRIORITY = 1000
GEN_BITS = 32  # acl_key.gen: an LPM key's prefix length counts it before the address
MAX_RULE_FILE = 16 << 20


def protos(layout: Layout) -> dict[str, int]:
    """Protocol names a rule may name -> the number the datapath compares."""
    c = layout.consts
    return {
        "any": c["ACL_PROTO_ANY"],
        "icmp": c["PROTO_ICMP"],
        "icmpv6": c["PROTO_ICMPV6"],
        "tcp": c["PROTO_TCP"],
        "udp": c["PROTO_UDP"],
    }


# the ICMP of each address family; a rule naming the other one could never match
ICMP_OF_FAMILY = {4: "icmp", 6: "icmpv6"}


def host_prefixlen(layout: Layout) -> int:
    """The mapped prefix length of a single address (either family): all its bits."""
    return 8 * layout.sizeof("ip_addr")


def actions(layout: Layout) -> dict[str, int]:
    return {"allow": layout.const("ACL_ACT_ALLOW"), "deny": layout.const("ACL_ACT_DENY")}


@dataclass(frozen=True)
class AclRule:
    """One rule as the operator states it (before an id is assigned)."""

    dst: IPNetwork
    proto: str = "any"
    dport_lo: int = 0
    dport_hi: int = 65535
    src: IPNetwork | None = None  # None: any source
    vlan: int = 0
    ifindex: int = 0
    action: str = "allow"
    priority: int = DEFAULT_PRIORITY


class AclError(InvalidArgument):
    """A rule or rule file the operator gave cannot be installed."""


def parse_ports(text: str | int | None) -> tuple[int, int]:
    if text is None or text == "" or text == "any":
        return 0, 65535
    raw = str(text)
    lo_s, sep, hi_s = raw.partition("-")
    try:
        lo = int(lo_s)
        hi = int(hi_s) if sep else lo
    except ValueError as exc:
        raise AclError(f"bad port or range {raw!r}: use N or N-M") from exc
    if not (0 <= lo <= 65535 and 0 <= hi <= 65535):
        raise AclError(f"port out of range in {raw!r}: ports are 0-65535")
    if lo > hi:
        raise AclError(f"empty port range {raw!r}")
    return lo, hi


def resolve_iface(name: str | None) -> int:
    if not name:
        return 0
    try:
        return socket.if_nametoindex(name)
    except OSError as exc:
        raise AclError(f"no such interface: {name}") from exc


def make_rule(
    fw: Firewall,
    *,
    vm: str,
    proto: str = "any",
    dport: str | int | None = None,
    src: str | None = None,
    vlan: int | None = None,
    iface: str | None = None,
    action: str = "allow",
    priority: int | None = None,
) -> AclRule:
    """Validates operator input against this firewall's protected prefixes; raises
    AclError with a one-line reason."""
    return build_rule(
        fw.layout, list_protected(fw), vm=vm, proto=proto, dport=dport, src=src, vlan=vlan,
        iface=iface, action=action, priority=priority,
    )


def build_rule(
    layout: Layout,
    protected: list[IPNetwork],
    *,
    vm: str,
    proto: str = "any",
    dport: str | int | None = None,
    src: str | None = None,
    vlan: int | None = None,
    iface: str | None = None,
    action: str = "allow",
    priority: int | None = None,
) -> AclRule:
    """Validates operator input for a firewall of `layout` that protects `protected`
    (which need not exist yet: a host config is checked before it is applied)."""
    for name, value, types in (
        ("vm", vm, (str,)),
        ("proto", proto, (str,)),
        ("dport", dport, (str, int, type(None))),
        ("src", src, (str, type(None))),
        ("vlan", vlan, (int, type(None))),
        ("iface", iface, (str, type(None))),
        ("action", action, (str,)),
        ("priority", priority, (int, type(None))),
    ):
        if isinstance(value, bool) or not isinstance(value, types):
            raise AclError(f"{name} has the wrong type ({type(value).__name__})")
    try:
        dst = parse_network(vm)
        src_net = parse_network(src) if src else None
    except InvalidArgument as exc:
        raise AclError(str(exc)) from exc
    if src_net is not None and src_net.version != dst.version:
        raise AclError(
            f"source {src_net} is IPv{src_net.version} but VM {dst} is IPv{dst.version}: "
            "a rule's source and VM must be of one family"
        )
    if src_net is not None and src_net.prefixlen == 0:
        src_net = None  # every source of the VM's family: any source
    proto = proto.lower()
    if proto not in protos(layout):
        raise AclError(f"unknown protocol {proto!r}: use tcp, udp, icmp, icmpv6 or any")
    icmp_here = ICMP_OF_FAMILY[dst.version]
    if proto in ICMP_OF_FAMILY.values() and proto != icmp_here:
        raise AclError(f"{proto} never reaches IPv{dst.version} VM {dst}: use {icmp_here}")
    if action not in actions(layout):
        raise AclError(f"unknown action {action!r}: use allow or deny")
    lo, hi = parse_ports(dport)
    if (lo, hi) != (0, 65535) and proto not in ("tcp", "udp"):
        raise AclError("--dport needs --proto tcp or udp")
    if vlan is not None and not 1 <= vlan <= 4094:
        raise AclError(f"VLAN {vlan} out of range 1-4094")
    prio = DEFAULT_PRIORITY if priority is None else priority
    if not 0 <= prio < 2**32:
        raise AclError(f"priority {prio} out of range")
    if not any(subnet_of(dst, p) for p in protected):
        shown = ", ".join(map(str, protected)) or "none"
        raise AclError(f"{dst} is not inside a protected prefix (protected: {shown})")
    return AclRule(
        dst=dst,
        proto=proto,
        dport_lo=lo,
        dport_hi=hi,
        src=src_net,
        vlan=vlan or 0,
        ifindex=resolve_iface(iface),
        action=action,
        priority=prio,
    )


# ---- the rule table --------------------------------------------------------


def read_rules(fw: Firewall) -> np.ndarray:
    """All rules (struct acl_entry) sorted by (priority, id)."""
    keys, values = fw.maps["acl_rules"].dump()
    if not len(keys):
        return values
    order = np.lexsort((values["rule"]["id"], values["priority"]))
    return values[order]


def to_entries(layout: Layout, rules: list[AclRule], ids: list[int]) -> np.ndarray:
    """The table entries (struct acl_entry) of `rules` with ids `ids`, built column-wise."""
    e = np.zeros(len(rules), dtype=layout.dtype("acl_entry"))
    r = e["rule"]
    r["id"] = ids
    sources = [(i, rule.src) for i, rule in enumerate(rules) if rule.src is not None]
    if sources:  # the others stay all zero: any source
        where = [i for i, _ in sources]
        r["src_addr"][where] = addr_array(net.network_address for _, net in sources)
        masks = b"".join(network_mask(net).tobytes() for _, net in sources)
        r["src_mask"][where] = np.frombuffer(masks, dtype=r["src_mask"].dtype)
    r["ifindex"] = [rule.ifindex for rule in rules]
    r["dport_lo"] = [rule.dport_lo for rule in rules]
    r["dport_hi"] = [rule.dport_hi for rule in rules]
    r["vlan"] = [rule.vlan for rule in rules]
    proto_nums, action_nums = protos(layout), actions(layout)
    r["proto"] = [proto_nums[rule.proto] for rule in rules]
    r["action"] = [action_nums[rule.action] for rule in rules]
    e["priority"] = [rule.priority for rule in rules]
    e["dst_addr"] = addr_array(rule.dst.network_address for rule in rules)
    e["dst_prefixlen"] = [mapped_prefixlen(rule.dst) for rule in rules]
    return e


def _free_ids(fw: Firewall, taken: np.ndarray, count: int) -> list[int]:
    """`count` rule ids not in `taken`, lowest first."""
    limit = fw.const("SAMIXDP_ACL_MAX_RULE_ID")
    used = set(int(i) for i in taken)
    out = [i for i in range(1, min(limit, len(used) + count + 1)) if i not in used][:count]
    if len(out) < count:
        raise AclError(f"no free ACL rule ids (at most {limit - 1} rules)")
    return out


# A destination as the LPM trie keys it: (address as a 128-bit number of the mapped
# space, prefix length in that space).
Dest = tuple[int, int]


def _mapped_ints(addrs: np.ndarray) -> list[int]:
    """`struct ip_addr` values as 128-bit numbers (IPv4 as ::ffff:a.b.c.d)."""
    raw = np.ascontiguousarray(addrs).view(np.uint8).reshape(-1, 16)
    hi = raw[:, :8].copy().view(">u8").reshape(-1).tolist()
    lo = raw[:, 8:].copy().view(">u8").reshape(-1).tolist()
    return [(h << 64) | low for h, low in zip(hi, lo, strict=True)]


def _dest_net(layout: Layout, dest: Dest) -> IPNetwork:
    addr, plen = dest
    return network_from_mapped(addr.to_bytes(host_prefixlen(layout) // 8, "big"), plen)


def _compile(layout: Layout, entries: np.ndarray) -> dict[Dest, np.ndarray]:
    """`compile_sets`, keyed by destination as the trie keys it (AclError: too many)."""
    per_set = layout.const("SAMIXDP_ACL_MAX_RULES_PER_SET")
    max_sets = layout.const("SAMIXDP_ACL_MAX_SETS")
    bits = host_prefixlen(layout)
    addrs = _mapped_ints(entries["dst_addr"])
    plens = np.asarray(entries["dst_prefixlen"], dtype=np.int64).tolist()
    groups: dict[Dest, list[int]] = {}
    for idx, dest in enumerate(zip(addrs, plens, strict=True)):
        groups.setdefault(dest, []).append(idx)
    if len(groups) > max_sets:
        raise AclError(f"rules name {len(groups)} VMs or prefixes; at most {max_sets}")
    plens_present = sorted({p for _, p in groups})
    out = {}
    for addr, plen in groups:
        chosen: list[int] = []
        for anc in plens_present:
            if anc > plen:
                break
            mask = ((1 << anc) - 1) << (bits - anc)
            chosen.extend(groups.get((addr & mask, anc), ()))
        if len(chosen) > per_set:
            raise AclError(
                f"{len(chosen)} rules apply to {_dest_net(layout, (addr, plen))}; "
                f"at most {per_set} per VM or prefix"
            )
        chosen.sort()
        out[(addr, plen)] = entries["rule"][chosen]
    return out


def compile_sets(fw: Firewall, entries: np.ndarray) -> dict[IPNetwork, np.ndarray]:
    """Destination -> ordered rules (struct acl_rule) that apply to it.

    Prefixes nest or are disjoint, so the rules for destination D are those
    whose destination contains D (D's ancestors, at most 129 prefix lengths of
    the mapped space); the most specific D wins in the LPM trie. `entries` is in
    (priority, id) order, and index order preserves it."""
    return {
        _dest_net(fw.layout, dest): rules for dest, rules in _compile(fw.layout, entries).items()
    }


def _build_inactive(fw: Firewall, compiled: dict[Dest, np.ndarray]) -> int:
    """Writes the compiled sets into the generation the datapath is not using."""
    sets_map = fw.maps["acl_sets"]
    new = (fw.read_config()[fw.const("CFG_ACL_GEN")] & 1) ^ 1
    existing = sets_map.keys()
    for key in existing[existing["gen"] == new]:  # leftovers of an interrupted reload
        sets_map.delete(key)
    width = host_prefixlen(fw.layout) // 8
    keys = np.zeros(len(compiled), dtype=sets_map.key_dtype)
    keys["prefixlen"] = [GEN_BITS + plen for _, plen in compiled]
    keys["gen"] = new
    raw = b"".join(addr.to_bytes(width, "big") for addr, _ in compiled)
    keys["addr"] = np.frombuffer(raw, dtype=keys["addr"].dtype)
    value = np.zeros(1, dtype=sets_map.value_dtype)
    for i, rules in enumerate(compiled.values()):
        value[0] = 0
        value["n_rules"] = len(rules)
        value["rules"][0, : len(rules)] = rules
        sets_map.update(keys[i : i + 1], value)
    return new


def _flip(fw: Firewall, new: int) -> None:
    """Makes generation `new` live, then drops the old one."""
    fw.set_config(fw.const("CFG_ACL_GEN"), new)
    sets_map = fw.maps["acl_sets"]
    existing = sets_map.keys()
    for key in existing[existing["gen"] != new]:
        sets_map.delete(key)


def _zero_hits(fw: Firewall, ids: Iterable[int]) -> None:
    m = fw.maps["acl_hits"]
    for i in ids:
        m.update(np.array([i], np.uint32), np.zeros(possible_cpus(), np.uint64))


def replace_rules(fw: Firewall, entries: np.ndarray) -> None:
    """Makes `entries` (struct acl_entry, ids assigned) the whole rule set.

    Order of work: validate and build the inactive generation (nothing live
    changes if that fails), update the rule table (restored on failure), and
    only then flip the live generation."""
    if len(entries):
        entries = entries[np.lexsort((entries["rule"]["id"], entries["priority"]))]
    new_gen = _build_inactive(fw, _compile(fw.layout, entries))
    table = fw.maps["acl_rules"]
    old_keys, old_values = table.dump()
    new_ids = entries["rule"]["id"].astype(np.uint32)
    try:
        if len(entries):
            table.update_many(new_ids, entries)
        stale = np.setdiff1d(old_keys, new_ids).astype(np.uint32)
        if len(stale):
            table.delete_many(stale)
    except Exception:
        now_keys, _ = table.dump()
        if len(now_keys):
            table.delete_many(now_keys)
        if len(old_keys):
            table.update_many(old_keys, old_values)
        raise
    _flip(fw, new_gen)


def add_rules(fw: Firewall, rules: list[AclRule]) -> list[int]:
    current = read_rules(fw)
    ids = _free_ids(fw, current["rule"]["id"], len(rules))
    added = to_entries(fw.layout, rules, ids)
    replace_rules(fw, np.concatenate([current, added]))
    _zero_hits(fw, ids)
    return ids


def delete_rules(fw: Firewall, ids: Iterable[int]) -> int:
    current = read_rules(fw)
    drop = np.isin(current["rule"]["id"], np.array(list(ids), dtype=np.uint32))
    if not drop.any():
        return 0
    replace_rules(fw, current[~drop])
    return int(drop.sum())


def load_rules(fw: Firewall, rules: list[AclRule]) -> list[int]:
    """Replaces the whole rule set (ids restart at 1)."""
    ids = list(range(1, len(rules) + 1))
    if len(rules) >= fw.const("SAMIXDP_ACL_MAX_RULE_ID"):
        raise AclError("too many rules")
    replace_rules(fw, to_entries(fw.layout, rules, ids))
    _zero_hits(fw, ids)
    return ids


def load_rules_beside(fw: Firewall, rules: list[AclRule], keep: np.ndarray) -> list[int]:
    """Replaces every rule except `keep` (entries as `read_rules` gives them: they keep
    their ids and hit counters) by `rules`, in their order, with the lowest ids `keep`
    leaves free: one atomic reload. With nothing kept, ids restart at 1 as in
    `load_rules`."""
    ids = _free_ids(fw, keep["rule"]["id"], len(rules))
    replace_rules(fw, np.concatenate([keep, to_entries(fw.layout, rules, ids)]))
    _zero_hits(fw, ids)
    return ids


def check_rules(layout: Layout, entries: np.ndarray) -> None:
    """Raises AclError if `entries` could not be loaded as one rule set (too many
    rules for one VM or prefix, too many VMs and prefixes); writes nothing."""
    if len(entries) >= layout.const("SAMIXDP_ACL_MAX_RULE_ID"):
        raise AclError("too many rules")
    _compile(layout, entries)


def rule_contents(entries: np.ndarray) -> list[bytes]:
    """What each rule is, whatever id it has: its entry's bytes with the id zeroed,
    in the order given. Two rule lists with equal contents evaluate alike."""
    plain = np.array(entries, copy=True)
    plain["rule"]["id"] = 0
    return [row.tobytes() for row in plain]


def in_evaluation_order(rules: list[AclRule]) -> list[AclRule]:
    """`rules` in the order the datapath would try them once loaded in this order
    (priority, then the ids given in list order)."""
    return sorted(rules, key=lambda r: r.priority)


def vm_rule_mask(layout: Layout, entries: np.ndarray, vms: Iterable[str]) -> np.ndarray:
    """Which entries are written for exactly one of `vms` (its /32 or /128)."""
    out = np.zeros(len(entries), dtype=bool)
    ips = list(vms)
    if not ips or not len(entries):
        return out
    single = entries["dst_prefixlen"] == host_prefixlen(layout)
    targets = addr_array(ips)
    for target in targets:
        out |= single & (entries["dst_addr"] == target)
    return out


def vm_entries(fw: Firewall, vm: str) -> np.ndarray:
    """The rules written for exactly this VM (its /32 or /128): what migrates with it."""
    entries = read_rules(fw)
    return entries[_is_vm_rule(fw, entries, vm)]


def _is_vm_rule(fw: Firewall, entries: np.ndarray, vm: str) -> np.ndarray:
    return (entries["dst_addr"] == ip_to_addr(vm)) & (
        entries["dst_prefixlen"] == host_prefixlen(fw.layout)
    )


# ---- a VM's own rules, as a whole (what migration moves) ----------------------------
#
# A VM's own rules are those written for exactly its address; rules for prefixes
# covering several VMs are host configuration, present on both hosts. They move as
# records of `vm_rules_dtype` (struct acl_rule + priority + hits): ids are local to a
# host, so new rules get fresh ids (never the VM's previous ones, so a restore keeps
# their hit counters) and start their hit counters at the given values.


def vm_rules_dtype(layout: Layout) -> np.dtype:
    """struct acl_rule + priority (lower first) + hits."""
    base = layout.dtype("acl_rule")
    fields = [(n, base[n]) for n in base.names or ()]
    return np.dtype(fields + [("priority", "<u4"), ("hits", "<u8")])


def export_vm_rules(fw: Firewall, vm: str) -> np.ndarray:
    """The VM's own rules with their hit counters, in evaluation order."""
    e = vm_entries(fw, vm)
    out = np.zeros(len(e), dtype=vm_rules_dtype(fw.layout))
    for f in e["rule"].dtype.names or ():
        out[f] = e["rule"][f]
    out["priority"] = e["priority"]
    if len(e):
        counts = hits(fw, e["rule"]["id"])
        out["hits"] = [counts[int(i)] for i in e["rule"]["id"]]
    return out


def snapshot_vm_rules(fw: Firewall, vm: str) -> np.ndarray:
    """The VM's own rule table entries as they are (for `restore_vm_rules`)."""
    return vm_entries(fw, vm).copy()


def _with_vm_rules(fw: Firewall, vm: str, rules: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Every rule of the host with the VM's own rules replaced by `rules` (new ids)."""
    current = read_rules(fw)
    keep = current[~_is_vm_rule(fw, current, vm)]
    ids = _free_ids(fw, current["rule"]["id"], len(rules))
    new = np.zeros(len(rules), dtype=fw.maps["acl_rules"].value_dtype)
    have = rules.dtype.names or ()
    for f in new["rule"].dtype.names or ():
        if f in have:
            new["rule"][f] = rules[f]
    new["rule"]["id"] = ids
    new["rule"]["ifindex"] = 0
    new["priority"] = rules["priority"]
    new["dst_addr"] = ip_to_addr(vm)
    new["dst_prefixlen"] = host_prefixlen(fw.layout)
    return np.concatenate([keep, new]), ids


def check_vm_rules(fw: Firewall, vm: str, rules: np.ndarray) -> None:
    """Raises AclError if `rules` could not become the VM's rules (writes nothing)."""
    entries, _ = _with_vm_rules(fw, vm, rules)
    _compile(fw.layout, entries)


def replace_vm_rules(fw: Firewall, vm: str, rules: np.ndarray) -> None:
    """The VM's own rules become exactly `rules` (one atomic reload)."""
    entries, ids = _with_vm_rules(fw, vm, rules)
    replace_rules(fw, entries)
    m = fw.maps["acl_hits"]
    for rule_id, n in zip(ids, rules["hits"].tolist(), strict=True):
        value = np.zeros(possible_cpus(), dtype=np.uint64)
        value[0] = n
        m.update(np.array([rule_id], np.uint32), value)


def restore_vm_rules(fw: Firewall, vm: str, snapshot: np.ndarray) -> None:
    """Puts back the VM's rules of `snapshot_vm_rules`, ids and all where still free."""
    current = read_rules(fw)
    keep = current[~_is_vm_rule(fw, current, vm)]
    old = snapshot
    clash = np.isin(old["rule"]["id"], keep["rule"]["id"])
    if clash.any():  # ids taken meanwhile by other rules: give those new ids
        old = old.copy()
        taken = np.concatenate([keep["rule"]["id"], old["rule"]["id"]])
        old["rule"]["id"][clash] = _free_ids(fw, taken, int(clash.sum()))
    replace_rules(fw, np.concatenate([keep, old]))


def delete_vm_rules(fw: Firewall, vm: str) -> int:
    ids = vm_entries(fw, vm)["rule"]["id"]
    return delete_rules(fw, [int(i) for i in ids]) if len(ids) else 0


def hits(fw: Firewall, ids: np.ndarray) -> dict[int, int]:
    m = fw.maps["acl_hits"]
    out = {}
    for i in ids:
        v = m.lookup(np.array([i], np.uint32))
        out[int(i)] = int(v.sum()) if v is not None else 0
    return out


def all_hits(fw: Firewall, ids: np.ndarray) -> np.ndarray:
    """Hits of each rule in `ids` (summed over CPUs), read in one batch call of the
    per-CPU counters from index 0 to the largest id."""
    ids = np.asarray(ids, dtype=np.int64)
    if not len(ids):
        return np.zeros(0, dtype=np.uint64)
    per_cpu = np.dtype((np.uint64, possible_cpus()))
    values = read_array_range(fw.maps["acl_hits"].fd, per_cpu, 0, int(ids.max()) + 1)
    return values.sum(axis=1, dtype=np.uint64)[ids]


def _net_text(net: IPNetwork) -> str:
    """A prefix in canonical form; a single address without its /32 or /128."""
    return str(net.network_address) if net.num_addresses == 1 else str(net)


def _rule_source(rule: np.void, vm: IPNetwork) -> IPNetwork:
    """A rule's source prefix; any source (mask all zero) as the VM family's /0."""
    mask = np.asarray(rule["src_mask"]).tobytes()
    plen = sum(bin(b).count("1") for b in mask)
    if plen == 0:
        return ipaddress.ip_network(f"{vm.network_address}/0", strict=False)
    return network_from_mapped(rule["src_addr"], plen)


def describe(fw: Firewall, entries: np.ndarray) -> list[dict[str, object]]:
    counts = hits(fw, entries["rule"]["id"])
    action_names = {v: k for k, v in actions(fw.layout).items()}
    proto_names = {v: k for k, v in protos(fw.layout).items()}
    names = {}
    for ifname_idx in socket.if_nameindex():
        names[ifname_idx[0]] = ifname_idx[1]
    out = []
    for e in entries:
        r = e["rule"]
        vm_net = network_from_mapped(e["dst_addr"], int(e["dst_prefixlen"]))
        lo, hi = int(r["dport_lo"]), int(r["dport_hi"])
        out.append(
            {
                "id": int(r["id"]),
                "priority": int(e["priority"]),
                "action": action_names.get(int(r["action"]), "?"),
                "vm": _net_text(vm_net),
                "proto": proto_names.get(int(r["proto"]), str(int(r["proto"]))),
                "dport": "any"
                if (lo, hi) == (0, 65535)
                else (str(lo) if lo == hi else f"{lo}-{hi}"),
                "src": str(_rule_source(r, vm_net)),
                "vlan": int(r["vlan"]) or None,
                "iface": names.get(int(r["ifindex"])) if int(r["ifindex"]) else None,
                "hits": counts[int(r["id"])],
            }
        )
    return out


# ---- rule files ------------------------------------------------------------


def parse_rule_file(fw: Firewall, path: Path) -> list[AclRule]:
    """TOML or YAML: a top-level `rules` list of tables/maps (see README)."""
    return read_rule_file(fw.layout, list_protected(fw), path)


def read_rule_file(layout: Layout, protected: list[IPNetwork], path: Path) -> list[AclRule]:
    """`parse_rule_file` for a firewall of `layout` protecting `protected`."""
    try:
        if not path.is_file():
            raise AclError(f"{path} is not a readable regular file")
        if path.stat().st_size > MAX_RULE_FILE:
            raise AclError(f"{path} is larger than {MAX_RULE_FILE} bytes")
        text = path.read_text()
    except OSError as exc:
        raise AclError(f"cannot read {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise AclError(f"{path} is not UTF-8 text") from exc
    data: object
    try:
        if path.suffix.lower() == ".toml":
            data = tomllib.loads(text)
        else:
            data = yaml.safe_load(text)
    except Exception as exc:  # both parsers raise their own error types
        kind = path.suffix.lstrip(".") or "YAML"
        raise AclError(f"{path}: not valid {kind}: {' '.join(str(exc).split())}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("rules", []), list):
        raise AclError(f"{path}: expected a top-level 'rules' list")
    default = data.get("default", "drop")
    if default != "drop":
        raise AclError(f"{path}: only 'default = drop' is supported for inbound traffic")
    rules = []
    allowed = {"vm", "proto", "dport", "src", "vlan", "iface", "action", "priority"}
    for n, item in enumerate(data.get("rules", []), start=1):
        if not isinstance(item, dict) or "vm" not in item:
            raise AclError(f"{path}: rule {n} needs at least 'vm'")
        unknown = set(item) - allowed
        if unknown:
            names = ", ".join(sorted(map(str, unknown)))
            raise AclError(f"{path}: rule {n} has unknown keys {names}")
        for key in ("vm", "src"):
            if isinstance(item.get(key), int) and not isinstance(item.get(key), bool):
                raise AclError(
                    f"{path}: rule {n}: {key} is a number, not an address "
                    "(quote IPv6 addresses: YAML reads 1:2:3 as base 60)"
                )
        try:
            rules.append(
                build_rule(
                    layout,
                    protected,
                    vm=str(item["vm"]),
                    proto=item.get("proto", "any"),
                    dport=item.get("dport"),
                    src=item.get("src"),
                    vlan=item.get("vlan"),
                    iface=item.get("iface"),
                    action=item.get("action", "allow"),
                    priority=item.get("priority"),
                )
            )
        except AclError as exc:
            raise AclError(f"{path}: rule {n}: {exc}") from exc
    return rules
