"""One pass over the maps for every VM migrating at the moment (a host drain).

Each migration thread of a drain asks for its VM's state with `select`. Asked
one by one, 50 migrations scan a 400k-entry session table 50 times; a
`SharedScan` gathers the requests that arrive close together into a batch and
serves the whole batch with one `export_vm_states` pass.

A batch opens with its first caller, who waits until no other request joined
for `gather_s` (a drain's requests arrive spread over a few hundred
milliseconds, as its connections and threads start), at most `max_gather_s` in
all, or less if `expect(n)` said how many requests to wait for and that many
have arrived; then that caller runs the pass for the batch and hands each
member its state. Callers arriving while a pass runs open the next batch, which
does not wait for the running pass (it may overlap it): nobody waits longer than
`max_gather_s` plus one pass.
An exception of a pass is raised in every caller of its batch.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from ..base.errors import InvalidArgument
from ..loader.pinned import Firewall
from .select import VmState, export_vm_states
from .vmset import VmAddrs

GATHER_S = 0.02  # a batch closes once no request joined it for this long ...
MAX_GATHER_S = 0.25  # ... or once it has been open this long


@dataclass(eq=False)
class _Batch:
    """The requests one pass serves, and its outcome."""

    vms: list[VmAddrs]
    arrived: list[float]  # perf_counter of each request
    states: list[VmState] | None = None
    error: BaseException | None = None
    done: bool = False
    started: float = 0.0  # perf_counter when the pass began


class SharedScan:
    """Thread-safe batcher of state selections over one firewall's maps.

    `passes` counts the passes run (failed ones included): with N threads
    selecting at once it stays well below N. `expect(n)` (or `member()` around
    each migration) tells a batch how many requests to wait for: a batch that
    has them starts at once instead of at the end of its window; 0 (the
    default) means unknown, so every batch waits its whole window."""

    def __init__(self, fw: Firewall, gather_s: float = GATHER_S, include_acl: bool = True,
                 max_gather_s: float = MAX_GATHER_S):
        if not gather_s >= 0:
            raise InvalidArgument(f"gather window of {gather_s} s: it must be 0 or more")
        self.fw = fw
        self.gather_s = gather_s
        self.max_gather_s = max(max_gather_s, gather_s)
        self.include_acl = include_acl
        self.passes = 0
        self._expected = 0
        self._cond = threading.Condition()
        self._open: _Batch | None = None  # the batch still gathering, if any

    @property
    def expected(self) -> int:
        return self._expected

    def expect(self, n: int) -> None:
        """How many requests a batch waits for (the migrations under way); the
        runner raises and lowers it as migrations start and end."""
        if n < 0:
            raise InvalidArgument(f"expected requests {n}: it must be 0 or more")
        with self._cond:
            self._expected = n
            self._cond.notify_all()  # a gathering batch may be complete now

    @contextmanager
    def member(self) -> Iterator[SharedScan]:
        """One more expected request while the block runs (one migration's life)."""
        with self._cond:
            self._expected += 1
        try:
            yield self
        finally:
            with self._cond:
                self._expected = max(self._expected - 1, 0)
                self._cond.notify_all()

    def _complete(self, batch: _Batch) -> bool:
        return 0 < self._expected <= len(batch.vms)

    def _gather(self, batch: _Batch) -> None:
        """The first caller's wait for others to join (the lock held)."""
        first = batch.arrived[0]
        while not self._complete(batch):
            deadline = min(batch.arrived[-1] + self.gather_s, first + self.max_gather_s)
            left = deadline - time.perf_counter()
            if left <= 0:
                return
            self._cond.wait(left)

    def select(self, vms: VmAddrs) -> VmState:
        """The VM's live state (as `export_vm_state`), from a pass shared with the
        requests of other threads close in time. Its timings add `gather_s`, the
        time this request waited before the pass began."""
        arrived = time.perf_counter()
        with self._cond:
            batch = self._open
            lead = batch is None
            if batch is None:
                batch = self._open = _Batch([vms], [arrived])
                slot = 0
                try:
                    self._gather(batch)
                except BaseException as e:  # interrupted: the members must not wait on
                    batch.error, batch.done = e, True
                    raise
                finally:
                    self._open = None  # later requests open the next batch
                    self._cond.notify_all()
            else:
                slot = len(batch.vms)
                batch.vms.append(vms)
                batch.arrived.append(arrived)
                self._cond.notify_all()  # the leader counts the requests
                while not batch.done:
                    self._cond.wait()
        if lead:
            self._run(batch)
        if batch.error is not None:
            raise batch.error
        assert batch.states is not None
        state = batch.states[slot]
        state.timings = {"gather_s": batch.started - arrived, **state.timings}
        return state

    def _run(self, batch: _Batch) -> None:
        """The pass for `batch`, run by its first caller outside the lock; its
        outcome goes to every member."""
        batch.started = time.perf_counter()
        states: list[VmState] | None = None
        error: BaseException | None = None
        try:
            states = export_vm_states(self.fw, batch.vms, include_acl=self.include_acl)
        except BaseException as e:  # noqa: BLE001 - handed to every caller, then raised
            error = e
        with self._cond:
            self.passes += 1
            batch.states, batch.error, batch.done = states, error, True
            self._cond.notify_all()
