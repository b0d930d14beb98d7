"""Undo records: what a round created, and the old values of what it overwrote or
deleted, for every map it touches. Rollback, abort and crash recovery all apply
them; applying one is idempotent (deleting absent keys and rewriting old values
again change nothing), so an interrupted undo can simply be run again."""

from __future__ import annotations

import numpy as np

from ..base.netutil import be32_to_ip
from ..loader.pinned import Firewall
from ..policy.acl import restore_vm_rules

# the map writes of one round, in order (then the pickup window, then the ACL)
MAP_ORDER = ("sessions", "unassured", "syn_counters", "blacklist")
UNDO_STEPS = (*MAP_ORDER, "pickup", "acl")


def undo_record(
    plans: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
    pickup_old: np.ndarray | None,
    pickup_touched: bool,
    acl_old: np.ndarray | None,
) -> dict[str, np.ndarray]:
    """The undo file's arrays. `plans`: map name -> (keys created, keys overwritten
    or deleted, their old values); `acl_old`: the VM's rule entries before the
    round, None when the round leaves the ACL alone."""
    rec: dict[str, np.ndarray] = {}
    for name, (created, old_keys, old_values) in plans.items():
        rec[f"{name}.created"] = created
        rec[f"{name}.old_keys"] = old_keys
        rec[f"{name}.old_values"] = old_values
    rec["pickup_touched"] = np.array([1 if pickup_touched else 0], np.uint8)
    rec["pickup_old"] = pickup_old if pickup_old is not None else np.zeros(0, np.uint64)
    rec["acl_touched"] = np.array([0 if acl_old is None else 1], np.uint8)
    if acl_old is not None:
        rec["acl_old"] = acl_old
    return rec


def apply_undo(
    fw: Firewall, vm: int, undo: dict[str, np.ndarray], steps: int | None = None
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
                    restore_vm_rules(fw, be32_to_ip(vm), undo["acl_old"])
                    counts["acl"] = 1
            elif step == "pickup":
                if int(undo.get("pickup_touched", np.zeros(1))[0]):
                    key = np.array([vm], dtype=np.uint32)
                    old = undo["pickup_old"]
                    if len(old):
                        fw.maps["pickup"].update(key, old[:1])
                    else:
                        fw.maps["pickup"].delete(key)
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
