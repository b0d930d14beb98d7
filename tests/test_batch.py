"""Whole-map batch I/O against the kernel (loader/batch.py): a multi-threaded
filtered scan returns exactly what one sequential walk returns; threaded writes
land everything, and a failing writer stops the others before the caller sees it."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from sami_xdp.base.netutil import ip_to_addr, ipv4_addr_array
from sami_xdp.loader import batch

pytestmark = pytest.mark.needs_root


def _fill(fw, n: int) -> None:
    m = fw.maps["sessions"]
    i = np.arange(n, dtype=np.uint32)
    keys = np.zeros(n, dtype=m.key_dtype)
    keys["addr_lo"] = np.where(i % 7 == 0, ip_to_addr("10.1.1.1"), ip_to_addr("10.1.1.2"))
    keys["addr_hi"] = ipv4_addr_array(np.uint32(0xAC100000) + (i >> 8))
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
    vm = ip_to_addr("10.1.1.1")
    row = np.dtype((np.void, m.key_dtype.itemsize))

    def keep(k, _v):
        return k["addr_lo"] == vm

    got = batch.scan_batch(m.fd, m.info.type, m.info.max_entries, m.key_dtype,
                           m.value_dtype, keep=keep, workers=workers, chunk=8192)
    assert got.scanned == len(want_k) == 200_000
    mask = want_k["addr_lo"] == vm
    assert len(got.keys) == int(mask.sum())
    order_got = np.argsort(got.keys.view(row))
    order_want = np.argsort(want_k[mask].view(row))
    assert got.keys[order_got].tobytes() == want_k[mask][order_want].tobytes()
    assert got.values[order_got].tobytes() == want_v[mask][order_want].tobytes()
    everything = batch.scan_batch(m.fd, m.info.type, m.info.max_entries, m.key_dtype,
                                  m.value_dtype, workers=workers, chunk=8192)
    assert len(everything.keys) == 200_000
    assert len(np.unique(everything.keys.view(row))) == 200_000


def _keys_values(fw, n: int):
    m = fw.maps["sessions"]
    i = np.arange(n, dtype=np.uint32)
    keys = np.zeros(n, dtype=m.key_dtype)
    keys["addr_lo"] = ip_to_addr("10.1.1.1")
    keys["addr_hi"] = ipv4_addr_array(np.uint32(0xAC100000) + (i >> 8))
    keys["port_lo"] = (i & 255).astype(np.uint16)
    keys["proto"] = 6
    return keys, np.zeros(n, dtype=m.value_dtype)


def test_parallel_write_lands_everything(fw):
    keys, values = _keys_values(fw, batch.PARALLEL_WRITE_MIN + 1000)
    assert fw.maps["sessions"].update_many(keys, values) == len(keys)
    assert len(fw.maps["sessions"].dump()[0]) == len(keys)


@pytest.mark.parametrize("exc", [OSError("injected"), KeyboardInterrupt()])
def test_parallel_write_failure_stops_every_writer(fw, monkeypatch, exc):
    """One writer fails (an error, or Ctrl-C): every writer has stopped when the
    failure reaches the caller, so a rollback never races a writer."""
    keys, values = _keys_values(fw, 2 * batch.PARALLEL_WRITE_MIN)
    real = batch.update_all
    calls = {"n": 0}
    lock = threading.Lock()

    def flaky(fd, k, v, flags=0):
        with lock:
            calls["n"] += 1
            n = calls["n"]
        if n == 3:
            raise exc
        return real(fd, k, v, flags)

    monkeypatch.setattr(batch, "update_all", flaky)
    with pytest.raises(type(exc)):
        fw.maps["sessions"].update_many(keys, values)
    monkeypatch.setattr(batch, "update_all", real)
    landed = len(fw.maps["sessions"].dump()[0])
    time.sleep(0.2)  # nothing may still be writing after the call returned
    assert len(fw.maps["sessions"].dump()[0]) == landed < len(keys)
