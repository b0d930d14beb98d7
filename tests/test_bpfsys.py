"""The raw batch layer against the kernel: a multi-threaded filtered scan
returns exactly what one sequential batch walk returns."""

from __future__ import annotations

import numpy as np
import pytest

from sami_xdp.loader import bpfsys
from sami_xdp.netutil import ip_to_be32

pytestmark = pytest.mark.needs_root


def _fill(fw, n: int) -> None:
    m = fw.maps["sessions"]
    i = np.arange(n, dtype=np.uint32)
    keys = np.zeros(n, dtype=m.key_dtype)
    keys["addr_lo"] = np.where(i % 7 == 0, ip_to_be32("10.1.1.1"), ip_to_be32("10.1.1.2"))
    keys["addr_hi"] = (np.uint32(0xAC100000) + (i >> 8)).byteswap()
    keys["port_lo"] = (i & 255).astype(np.uint16)
    keys["proto"] = 6
    vals = np.zeros(n, dtype=m.value_dtype)
    vals["state"] = 3
    vals["packets"][:, 0] = i
    m.update_many(keys, vals)


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_threaded_scan_equals_sequential_walk(fw, workers):
    _fill(fw, 200_000)
    m = fw.maps["sessions"]
    want_k, want_v = m.dump()
    vm = np.uint32(ip_to_be32("10.1.1.1"))

    def keep(k, _v):
        return k["addr_lo"] == vm

    got = bpfsys.scan_batch(m.fd, m.info.type, m.info.max_entries, m.key_dtype,
                            m.value_dtype, keep=keep, workers=workers, chunk=8192)
    assert got.scanned == len(want_k) == 200_000
    mask = want_k["addr_lo"] == vm
    assert len(got.keys) == int(mask.sum())
    order_got = np.argsort(got.keys.view(np.void(16)))
    order_want = np.argsort(want_k[mask].view(np.void(16)))
    assert got.keys[order_got].tobytes() == want_k[mask][order_want].tobytes()
    assert got.values[order_got].tobytes() == want_v[mask][order_want].tobytes()
    everything = bpfsys.scan_batch(m.fd, m.info.type, m.info.max_entries, m.key_dtype,
                                   m.value_dtype, workers=workers, chunk=8192)
    assert len(everything.keys) == 200_000
    assert len(np.unique(everything.keys.view(np.void(16)))) == 200_000
