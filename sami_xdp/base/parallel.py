"""One way to fan work out over threads (bulk map I/O and NumPy conversions
release the GIL), shared so every caller gets the same safe teardown."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def run_parallel(
    n: int, fn: Callable[[int], T], on_error: Callable[[], None] | None = None
) -> list[T]:
    """Runs fn(i) for i in range(n): i = 0 on the calling thread, the rest on
    their own threads, and returns the results in order.

    Every thread is waited for, even when the wait itself is interrupted
    (Ctrl-C), so callers never clean up while a worker still runs. Then the
    failure is re-raised: an interruption wins over an error, else the first
    error. `on_error` runs at each failure (e.g. to stop the other workers)."""
    results: list[T | None] = [None] * n
    errors: list[BaseException] = []

    def fail(exc: BaseException) -> None:
        errors.append(exc)
        if on_error is not None:
            on_error()

    def run(i: int) -> None:
        try:
            results[i] = fn(i)
        except BaseException as exc:  # noqa: BLE001 - re-raised by the caller's thread
            fail(exc)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(1, n)]
    for th in threads:
        th.start()
    try:
        run(0)
    finally:
        for th in threads:
            while th.is_alive():
                try:
                    th.join()
                except BaseException as exc:  # noqa: BLE001 - keep waiting for the worker
                    fail(exc)
    if errors:
        raise next((e for e in errors if not isinstance(e, Exception)), errors[0])
    return results  # type: ignore[return-value]
