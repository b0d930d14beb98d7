"""Undo records: what a round created, and the old values of what it overwrote or
deleted, for every map it touches. Rollback, abort and crash recovery all apply
them; applying one is idempotent (deleting absent keys and rewriting old values
again change nothing), so an interrupted undo can simply be run again.

A record is self-contained: it names the VM's addresses (`vms`), and holds each
address's pickup window and ACL rules as they were before the round."""

from __future__ import annotations

import numpy as np

from ..base.netutil import addrs_to_ips
from ..loader.pinned import Firewall
from ..policy.acl import restore_vm_rules
from .vmset import addr_isin

# the map writes of one round, in order (then the pickup windows, then the ACL)
MAP_ORDER = ("sessions", "unassured", "syn_counters", "blacklist")
UNDO_STEPS = (*MAP_ORDER, "pickup", "acl")


def undo_record(
    plans: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
    vms: np.ndarray,
    pickup_old: np.ndarray,
    pickup_had: np.ndarray,
    pickup_touched: bool,
    acl_old: np.ndarray | None,
) -> dict[str, np.ndarray]:
    """The undo file's arrays. `plans`: map name -> (keys created, keys overwritten
    or deleted, their old values); `vms`: the VM's addresses (`struct ip_addr`);
    `pickup_old`/`pickup_had`: each address's pickup deadline before the round and
    whether it had one; `acl_old`: the addresses' rule entries before the round,
    None when the round leaves the ACL alone."""
    rec: dict[str, np.ndarray] = {}
    for name, (created, old_keys, old_values) in plans.items():
        rec[f"{name}.created"] = created
        rec[f"{name}.old_keys"] = old_keys
        rec[f"{name}.old_values"] = old_values
    rec["vms"] = np.ascontiguousarray(vms)
    rec["pickup_touched"] = np.array([1 if pickup_touched else 0], np.uint8)
    rec["pickup_old"] = np.asarray(pickup_old, np.uint64)
    rec["pickup_had"] = np.asarray(pickup_had, np.uint8)
    rec["acl_touched"] = np.array([0 if acl_old is None else 1], np.uint8)
    if acl_old is not None:
        rec["acl_old"] = acl_old
    return rec


def _undo_pickup(fw: Firewall, undo: dict[str, np.ndarray]) -> None:
    m = fw.maps["pickup"]
    vms = undo["vms"]
    for i in range(len(vms)):
        key = np.zeros(1, dtype=m.key_dtype)
        key[0] = vms[i]
        if int(undo["pickup_had"][i]):
            m.update(key, undo["pickup_old"][i : i + 1])
        else:
            m.delete(key)


def _undo_acl(fw: Firewall, undo: dict[str, np.ndarray]) -> None:
    """Each address's rules as they were, the last address replaced first: a rule id an
    earlier address gave up may have gone to a later one's imported rules, and is free
    again once that address is restored."""
    vms = undo["vms"]
    old = undo["acl_old"]
    ips = addrs_to_ips(vms)
    for i in reversed(range(len(vms))):
        mine = addr_isin(old["dst_addr"], vms[i : i + 1]) if len(old) else np.zeros(0, bool)
        restore_vm_rules(fw, ips[i], old[mine])


def apply_undo(
    fw: Firewall, undo: dict[str, np.ndarray], steps: int | None = None
) -> tuple[dict[str, int], list[str]]:
    """Deletes created keys and restores old values; returns (counts, errors).

    `steps` limits the undo to the first N steps of UNDO_STEPS (rollback of a
    partial import); None undoes everything (abort). A step that fails does not
    stop the others."""
    counts: dict[str, int] = {}
    errors: list[str] = []
    todo = UNDO_STEPS if steps is None else UNDO_STEPS[:steps]
    for step in reversed(todo):
        try:
            if step == "acl":
                if int(undo.get("acl_touched", np.zeros(1))[0]):
                    _undo_acl(fw, undo)
                    counts["acl"] = 1
            elif step == "pickup":
                if int(undo.get("pickup_touched", np.zeros(1))[0]):
                    _undo_pickup(fw, undo)
            else:
                m = fw.maps[step]
                created = undo.get(f"{step}.created")
                if created is not None and len(created):
                    counts[f"{step}.removed"] = m.delete_many(created.astype(m.key_dtype))
                old_k = undo.get(f"{step}.old_keys")
                if old_k is not None and len(old_k):
                    old_v = undo[f"{step}.old_values"]
                    m.update_many(old_k.astype(m.key_dtype), old_v.astype(m.value_dtype))
                    counts[f"{step}.restored"] = len(old_k)
        except Exception as exc:  # keep undoing the other steps
            errors.append(f"{step}: {exc}")
    return counts, errors
