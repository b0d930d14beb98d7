"""Map entries as NumPy rows, without a Python object per entry.

Whole-record copies: NumPy copies structured records field by field, so a copy,
selection or concatenation of map entries is several times faster on the same bytes
viewed as opaque records (results are identical). Key matching: a sorted index over
keys for vectorised membership tests (which of these keys does that map hold?).
"""

from __future__ import annotations

import numpy as np

# ---- whole-record copies --------------------------------------------------------------


def as_void(a: np.ndarray) -> np.ndarray:
    """Contiguous rows as opaque records of the same size."""
    return np.ascontiguousarray(a).view(np.dtype((np.void, a.dtype.itemsize)))


def take_rows(a: np.ndarray, sel: np.ndarray) -> np.ndarray:
    """a[sel] (a bool mask or indices) for structured rows."""
    if a.dtype.fields is None:
        return a[sel]
    idx = np.flatnonzero(sel) if sel.dtype == bool else sel
    return as_void(a).take(idx).view(a.dtype)


def concat_rows(parts: list[np.ndarray], dtype: np.dtype | None = None) -> np.ndarray:
    """np.concatenate of rows of one dtype (`dtype` is needed when `parts` may be
    empty); when at most one part has rows, that part itself (callers only read)."""
    full = [p for p in parts if len(p)]
    if len(full) <= 1:
        if full:
            return full[0]
        if parts:
            return parts[0]
        assert dtype is not None, "concat_rows of no parts needs a dtype"
        return np.zeros(0, dtype)
    if full[0].dtype.fields is None:
        return np.concatenate(full)
    return np.concatenate([as_void(p) for p in full]).view(full[0].dtype)


def copy_rows(a: np.ndarray) -> np.ndarray:
    if a.dtype.fields is None:
        return a.copy()
    return as_void(a).copy().view(a.dtype)


# ---- key matching ----------------------------------------------------------------------


def _mix64(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> np.uint64(33))
    x *= np.uint64(0xFF51AFD7ED558CCD)
    x ^= x >> np.uint64(33)
    x *= np.uint64(0xC4CEB9FE1A85EC53)
    x ^= x >> np.uint64(33)
    return x


def _words(keys: np.ndarray) -> np.ndarray:
    """Keys as rows of little-endian u64 words (zero padded to a multiple of 8 bytes)."""
    keys = np.ascontiguousarray(keys)
    size = keys.dtype.itemsize
    n = len(keys)
    if size % 8 == 0:
        return keys.view("<u8").reshape(n, size // 8)
    words = -(-size // 8)
    padded = np.zeros((n, words * 8), dtype=np.uint8)
    padded[:, :size] = keys.view(np.uint8).reshape(n, size)
    return padded.view("<u8").reshape(n, words)


def key_u64(keys: np.ndarray) -> tuple[np.ndarray, bool]:
    """A u64 per key: the key itself when it fits in 8 bytes (exact), else a hash."""
    w = _words(keys)
    if w.shape[1] == 1:
        return np.ascontiguousarray(w[:, 0]), True
    with np.errstate(over="ignore"):
        h = w[:, 0].copy()
        for i in range(1, w.shape[1]):
            h ^= w[:, i] * np.uint64(0x9E3779B97F4A7C15)
            h = _mix64(h)
    return h, False


class KeyIndex:
    """Sorted index over a set of map keys, for vectorised membership tests."""

    def __init__(self, keys: np.ndarray) -> None:
        self.keys = np.ascontiguousarray(keys)
        h, self.exact = key_u64(self.keys)
        self.order = np.argsort(h)
        self.sorted = h[self.order]
        self._words = _words(self.keys)

    def __len__(self) -> int:
        return len(self.keys)

    def find(self, want: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found mask, index into self.keys) for each key of `want`.

        Hash collisions are resolved by comparing the key words, scanning the
        run of equal hashes; a run longer than one is astronomically rare."""
        want = np.ascontiguousarray(want, dtype=self.keys.dtype)
        n = len(want)
        if n == 0 or len(self.keys) == 0:
            return np.zeros(n, dtype=bool), np.zeros(n, dtype=np.int64)
        h, _ = key_u64(want)
        # searching sorted queries is an order of magnitude faster (cache)
        q = np.argsort(h)
        pos = np.empty(n, dtype=np.int64)
        pos[q] = np.searchsorted(self.sorted, h[q])
        np.minimum(pos, len(self.sorted) - 1, out=pos)
        cand = self.sorted[pos] == h
        idx = self.order[pos]
        if self.exact:
            return cand, idx
        ww = _words(want)
        same = cand.copy()
        for i in range(ww.shape[1]):
            same &= self._words[idx, i] == ww[:, i]
        odd = np.nonzero(cand & ~same)[0]
        for r in odd.tolist():  # equal hash, different key: look along the run
            j = int(pos[r]) + 1
            while j < len(self.sorted) and self.sorted[j] == h[r]:
                k = self.order[j]
                if (self._words[k] == ww[r]).all():
                    same[r] = True
                    idx[r] = k
                    break
                j += 1
        return same, idx

    def contains(self, want: np.ndarray) -> np.ndarray:
        return self.find(want)[0]


def unique_rows(a: np.ndarray) -> np.ndarray:
    """The distinct rows of a structured array (byte-wise), in no particular order."""
    if len(a) < 2:
        return copy_rows(a)
    v = np.unique(as_void(np.ascontiguousarray(a)))
    return v.view(a.dtype).reshape(len(v))
