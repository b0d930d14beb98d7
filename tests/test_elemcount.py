"""Entry counts from the kernel's own counters (loader/elemcount.py) against what a
full read of the same map finds: the preflight's capacity check trusts them."""

from __future__ import annotations

import numpy as np
import pytest

from sami_xdp.loader import batch
from sami_xdp.loader.elemcount import elem_count, kfunc_btf_id
from sami_xdp.loader.pinned import Firewall

pytestmark = pytest.mark.needs_root


def _rows(fw: Firewall, name: str, n: int, salt: int) -> tuple[np.ndarray, np.ndarray]:
    m = fw.maps[name]
    keys = np.zeros(n, dtype=m.key_dtype)
    keys["addr_lo"]["w"][:, 3] = np.arange(n, dtype=np.uint32) + salt
    keys["proto"] = 6
    values = np.zeros(n, dtype=m.value_dtype)
    values["state"] = 3
    return keys, values


@pytest.mark.parametrize("name", ["sessions", "unassured"])
def test_kernel_count_follows_inserts_and_deletes(fw: Firewall, name: str) -> None:
    if kfunc_btf_id() is None:
        pytest.skip("this kernel has no bpf_map_sum_elem_count (Linux < 6.6)")
    m = fw.maps[name]
    assert elem_count(m.fd) == 0 == len(m.dump()[0])
    n = min(3000, m.info.max_entries // 2)  # below any LRU eviction
    keys, values = _rows(fw, name, n, 1)
    m.update_many(keys, values)
    assert elem_count(m.fd) == n == m.count()
    m.delete_many(keys[:1234])
    assert elem_count(m.fd) == n - 1234 == len(m.dump()[0])
    m.update_many(keys[1234:2000], values[1234:2000])  # overwrites: no new entries
    assert m.count() == n - 1234


def test_lru_evictions_are_counted(fw: Firewall) -> None:
    """An LRU map full to the brim evicts on insert: the count stays what a read finds."""
    if kfunc_btf_id() is None:
        pytest.skip("this kernel has no bpf_map_sum_elem_count (Linux < 6.6)")
    m = fw.maps["unassured"]
    keys, values = _rows(fw, "unassured", m.info.max_entries + 3000, 7)
    for i in range(0, len(keys), 4096):  # in chunks: a batch may not hold more than the map
        m.update_many(keys[i : i + 4096], values[i : i + 4096])
    assert elem_count(m.fd) == len(m.dump()[0]) <= m.info.max_entries


@pytest.mark.parametrize("name", ["sessions", "unassured"])
def test_bulk_lookups_match_one_by_one(fw: Firewall, name: str) -> None:
    """The lookup program (a frame of LOOKUP_SLOTS keys per PROG_TEST_RUN) reads what
    one bpf(2) lookup per key reads, present and absent keys, across frames."""
    m = fw.maps[name]
    assert m.lookup_prog_fd >= 0
    keys, values = _rows(fw, name, 100, 1000)
    values["packets"][:, 0] = np.arange(100) * 3 + 1
    m.update_many(keys[::2], values[::2])  # every other key present
    want = np.concatenate([keys, _rows(fw, name, 7, 5000)[0]])  # 107: 8 full frames and a bit
    found, got = m.lookup_keys(want)
    one_found, one_got = batch.lookup_keys(m.fd, want, m.value_dtype)
    assert found.tolist() == one_found.tolist()
    assert found.sum() == 50 and found[:100:2].all() and not found[1:100:2].any()
    assert got[found].tobytes() == one_got[one_found].tobytes()
    assert got["packets"][:100:2, 0].tolist() == (np.arange(0, 100, 2) * 3 + 1).tolist()
