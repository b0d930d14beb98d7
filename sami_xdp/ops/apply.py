"""`samixdp apply`: make this host's firewall what its host config file says.

A plan is the list of changes between the file and the running state, in the order
they are made: create the firewall (when nothing is loaded), protect the new
prefixes, settings, the ACL, unprotect the old prefixes, detach the interfaces the
file no longer names, then re-attach (mode changed), set roles and attach. The
file, its ACL file and every interface it names are checked, and the plan made,
before the first change: a bad file changes nothing. A run on a host already in
sync changes nothing (`Plan.changes` is empty); `check` only plans.

Applies are serialised by an flock on the bpffs directory (which a migration's
dirty-log slot claims also take) and hold the import lock while they change
anything, so an import's ACL reload and ours never interleave; an import that a
crash interrupted is recovered first, as by every state-changing command.

Which ACL rules are the file's: all of them but the rules written for exactly one
VM address (its /32 or /128) that a migration imported here (an import recorded in
the state dir and not aborted) and that the file does not name. Those belong to
the VM: they came with it and leave with it, and an apply keeps them, ids, hit
counters and all. A VM address the file names has exactly the file's rules. The
decision is made by address and import record, never by rule id (ids restart when
rules are reloaded).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from ..base.errors import InterfaceError, InvalidArgument
from ..base.layout import Layout, load_layout
from ..base.netutil import IPNetwork, canonical_ip
from ..loader import attach as xdp
from ..loader import bpffs as bpffs_mod
from ..loader.compile import Limits
from ..loader.pinned import Firewall
from ..migrate.journal import ImportRecords, import_lock
from ..migrate.recovery import Recovery, needs_recovery, recover_locked
from ..policy import acl, protect
from ..policy.config import (
    create_firewall,
    default_settings,
    read_settings,
    show_setting,
    write_settings,
)
from ..policy.links import Link, attach_link, attached_links, detach_link, reattach_link
from ..policy.roles import set_role
from .hostconfig import HostConfig, InterfaceSpec, load_acl, load_host_config

# the order changes are made in (and printed)
KINDS = ("create", "protect", "setting", "acl", "unprotect", "detach", "reattach", "role",
         "attach")


@dataclass(frozen=True)
class Change:
    """One difference between the file and the host, and what apply does about it."""

    kind: str  # one of KINDS
    subject: str  # the interface, prefix or setting; "firewall", "acl"
    before: str | int | None
    after: str | int | None
    text: str  # "attach eth1 (tc, role vm)", "set syn-rate 200 -> 500"

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class Plan:
    """What apply would change, from the file at `cfg.path` and the running state."""

    cfg: HostConfig
    rules: list[acl.AclRule]
    changes: list[Change] = field(default_factory=list)
    acl_keep: np.ndarray | None = None  # imported VM rules (entries) an ACL reload keeps

    @property
    def in_sync(self) -> bool:
        return not self.changes

    def as_dict(self, check: bool) -> dict[str, object]:
        return {
            "file": str(self.cfg.path),
            "check": check,
            "in_sync": self.in_sync,
            "changes": [c.as_dict() for c in self.changes],
        }


@dataclass
class Applied:
    """What one apply did."""

    plan: Plan  # the changes as made (modes as obtained)
    recovery: Recovery


# ---- the running state ---------------------------------------------------------------


@dataclass
class _Running:
    loaded: bool
    sizes: tuple[int, int] = (0, 0)
    protected: list[IPNetwork] = field(default_factory=list)
    links: dict[str, Link] = field(default_factory=dict)
    settings: dict[str, int] = field(default_factory=dict)
    acl_owned: np.ndarray | None = None  # the rules the file stands for
    acl_keep: np.ndarray | None = None  # imported VM rules the file does not name
    xdp_id: int = 0


def imported_vms(state_dir: Path) -> set[str]:
    """VM addresses a migration imported here (recorded in the state dir, not aborted)."""
    out: set[str] = set()
    for meta in ImportRecords(state_dir).list():
        if meta.get("status") != "aborted":
            out.update(canonical_ip(v) for v in meta.get("vms", []))
    return out


def named_vms(rules: list[acl.AclRule]) -> set[str]:
    """VM addresses the file's rules are written for exactly."""
    return {canonical_ip(r.dst.network_address) for r in rules if r.dst.num_addresses == 1}


def _running(fw: Firewall | None, layout: Layout, keep_vms: set[str]) -> _Running:
    if fw is None:
        return _Running(loaded=False, settings=default_settings(layout))
    meta = fw.meta()
    entries = acl.read_rules(fw)
    keep = acl.vm_rule_mask(layout, entries, keep_vms)
    return _Running(
        loaded=True,
        sizes=(int(meta["max_sessions"]), int(meta["max_unassured"])),
        protected=protect.list_protected(fw),
        links={link.ifname: link for link in attached_links(fw)},
        settings=read_settings(fw),
        acl_owned=entries[~keep],
        acl_keep=entries[keep],
        xdp_id=fw.prog_id(),
    )


# ---- planning ------------------------------------------------------------------------


def _sizes(cfg: HostConfig, run: _Running) -> Change | None:
    want = (cfg.firewall.max_sessions, cfg.firewall.max_unassured)
    if not run.loaded:
        return Change("create", "firewall", None, None,
                      f"create the firewall (max_sessions {want[0]}, max_unassured {want[1]})")
    for key, have, wanted in zip(("max_sessions", "max_unassured"), run.sizes, want,
                                 strict=True):
        if have != wanted:
            raise InvalidArgument(
                f"{cfg.path}: firewall.{key} is {wanted} but the loaded firewall has {have}: "
                "sizes are fixed when it is first loaded (edit the file, or detach everywhere, "
                "`samixdp reset --yes` and apply again: all state is lost)"
            )
    return None


def _settings(cfg: HostConfig, run: _Running, layout: Layout) -> list[Change]:
    want = {**default_settings(layout), **cfg.settings}
    out = []
    for name, value in want.items():
        have = run.settings[name]
        if have != value:
            old, new = show_setting(name, have), show_setting(name, value)
            default = "" if name in cfg.settings else " (the default)"
            out.append(Change("setting", name, old, new, f"set {name} {old} -> {new}{default}"))
    return out


def _acl(plan: Plan, run: _Running, layout: Layout) -> list[Change]:
    rules = acl.in_evaluation_order(plan.rules)
    wanted = acl.to_entries(layout, rules, [0] * len(rules))
    keep = run.acl_keep if run.acl_keep is not None else wanted[:0]
    acl.check_rules(layout, np.concatenate([keep, wanted]))  # fits beside what stays
    plan.acl_keep = keep
    owned = run.acl_owned if run.acl_owned is not None else wanted[:0]
    if acl.rule_contents(owned) == acl.rule_contents(wanted):
        return []
    source = plan.cfg.firewall.acl
    what = (f"load {len(rules)} ACL rules from {source.name}" if source is not None
            else "remove the ACL rules (no ACL file)")
    notes = [f"replacing {len(owned)}"] if len(owned) else []
    if len(keep):
        notes.append(f"{len(keep)} imported VM rules kept")
    text = what + (f" ({'; '.join(notes)})" if notes else "")
    return [Change("acl", "acl", len(owned), len(rules), text)]


def _protect(cfg: HostConfig, run: _Running) -> tuple[list[Change], list[Change]]:
    add = [Change("protect", str(n), None, str(n), f"protect {n}")
           for n in cfg.firewall.protect if n not in run.protected]
    drop = [Change("unprotect", str(n), str(n), None, f"unprotect {n}")
            for n in run.protected if n not in cfg.firewall.protect]
    return add, drop


def _wanted_modes(spec: InterfaceSpec) -> tuple[str, ...]:
    return xdp.auto_modes(spec.name) if spec.mode == "auto" else (spec.mode,)


def _links(cfg: HostConfig, run: _Running) -> list[Change]:
    out: list[Change] = []
    named = {spec.name for spec in cfg.interfaces}
    for name, running in run.links.items():
        if name not in named:
            out.append(Change("detach", name, running.mode, None, f"detach {name}"))
    later: list[Change] = []
    for spec in cfg.interfaces:
        found = xdp.query(spec.name)  # InterfaceError: no such interface
        modes = _wanted_modes(spec)
        if modes[0] != "tc" and found.prog_id and found.prog_id != run.xdp_id:
            raise InterfaceError(
                f"{spec.name} already has another XDP program (id {found.prog_id}); "
                "remove it first, sami-xdp will not replace it"
            )
        link = run.links.get(spec.name)
        if link is None:
            later.append(Change("attach", spec.name, None, modes[0],
                                f"attach {spec.name} ({modes[0]}, role {spec.role})"))
        elif link.mode not in modes:
            role = f", role {link.role} -> {spec.role}" if link.role != spec.role else ""
            out.append(Change("reattach", spec.name, link.mode, modes[0],
                              f"re-attach {spec.name} ({link.mode} -> {modes[0]}{role})"))
        elif link.role != spec.role:
            out.append(Change("role", spec.name, link.role, spec.role,
                              f"set the role of {spec.name} {link.role} -> {spec.role}"))
    return out + later


def _plan(cfg: HostConfig, rules: list[acl.AclRule], fw: Firewall | None,
          state_dir: Path) -> Plan:
    layout = fw.layout if fw is not None else load_layout()
    keep_vms = imported_vms(state_dir) - named_vms(rules) if fw is not None else set()
    run = _running(fw, layout, keep_vms)
    plan = Plan(cfg, rules)
    create = _sizes(cfg, run)
    add, drop = _protect(cfg, run)
    changes = [create] if create else []
    changes += add + _settings(cfg, run, layout) + _acl(plan, run, layout) + drop
    changes += _links(cfg, run)
    plan.changes = sorted(changes, key=lambda c: KINDS.index(c.kind))  # stable
    return plan


def _open(bpffs: Path) -> Firewall | None:
    return Firewall.open(bpffs) if Firewall.exists(bpffs) else None


def load(path: Path) -> tuple[HostConfig, list[acl.AclRule]]:
    """The file and its ACL, checked (InvalidArgument, one line)."""
    cfg = load_host_config(path)
    return cfg, load_acl(cfg)


def _plan_now(cfg: HostConfig, rules: list[acl.AclRule], bpffs: Path, state_dir: Path) -> Plan:
    fw = _open(bpffs)
    try:
        return _plan(cfg, rules, fw, state_dir)
    finally:
        if fw is not None:
            fw.close()


def check(path: Path, bpffs: Path, state_dir: Path) -> Plan:
    """The plan for the file at `path`; changes nothing (not even a mount)."""
    bpffs_mod.require_root()
    cfg, rules = load(path)
    return _plan_now(cfg, rules, bpffs, state_dir)


# ---- applying ------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(bpffs: Path, state_dir: Path) -> Iterator[None]:
    """One apply at a time per firewall (the bpffs directory's flock), and no import
    meanwhile (the state dir's import lock)."""
    bpffs_mod.ensure(bpffs)
    fd = os.open(bpffs, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with import_lock(state_dir):
            yield
    finally:
        os.close(fd)


def _execute(fw: Firewall, plan: Plan, report: Callable[[Change], None]) -> list[Change]:
    """Makes the plan's changes (the firewall exists by now) in order, reporting each
    once made."""
    cfg, done = plan.cfg, []
    specs = {spec.name: spec for spec in cfg.interfaces}
    want = {**default_settings(fw.layout), **cfg.settings}
    settings = {c.subject: want[c.subject] for c in plan.changes if c.kind == "setting"}
    for change in plan.changes:
        if change.kind == "protect":
            protect.add_protected(fw, change.subject)
        elif change.kind == "unprotect":
            protect.remove_protected(fw, change.subject)
        elif change.kind == "setting" and settings:
            write_settings(fw, settings)  # all of them in one write of the config word
            settings = {}
        elif change.kind == "acl":
            keep = plan.acl_keep if plan.acl_keep is not None else acl.read_rules(fw)[:0]
            acl.load_rules_beside(fw, acl.in_evaluation_order(plan.rules), keep)
        elif change.kind == "detach":
            detach_link(fw, change.subject)
        elif change.kind in ("reattach", "attach"):
            spec = specs[change.subject]
            do = reattach_link if change.kind == "reattach" else attach_link
            state = do(fw, spec.name, spec.mode, spec.role)
            if state.mode != change.after:  # auto on a NIC whose driver has no XDP
                text = change.text.replace(f"{change.after}, role", f"{state.mode}, role")
                change = replace(change, after=state.mode, text=text)
        elif change.kind == "role":
            set_role(fw, xdp.query(change.subject).ifindex, specs[change.subject].role)
        done.append(change)
        report(change)
    return done


def apply(path: Path, bpffs: Path, state_dir: Path,
          report: Callable[[Change], None] = lambda c: None) -> Applied:
    """Makes the host what the file at `path` says; `report` hears of each change as
    it is made. Everything is checked (and planned) before the first change; a
    failure of the kernel afterwards (an interface refusing the program) stops the
    run there: the changes reported are made, and a second run does the rest."""
    bpffs_mod.require_root()
    cfg, rules = load(path)
    _plan_now(cfg, rules, bpffs, state_dir)  # every check, before the lock (it may mount)
    with _locked(bpffs, state_dir):
        fw = _open(bpffs)
        try:
            recovery = Recovery()
            if fw is not None and state_dir.is_dir() and needs_recovery(state_dir):
                recovery = recover_locked(fw, state_dir)
            plan = _plan(cfg, rules, fw, state_dir)  # again: the host may have changed
            done = []
            if fw is None:
                fw = create_firewall(bpffs, Limits(max_sessions=cfg.firewall.max_sessions,
                                                   max_unassured=cfg.firewall.max_unassured))
                done.append(plan.changes[0])
                report(plan.changes[0])
            done += _execute(fw, replace(plan, changes=plan.changes[len(done):]), report)
        finally:
            if fw is not None:
                fw.close()
    return Applied(replace(plan, changes=done), recovery)
