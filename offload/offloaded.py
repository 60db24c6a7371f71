"""Routed experts served from a fixed pool of device slots, streamed from the host store on demand.

Legend: S slots, G experts of a launch; a key is `(layer, expert)`.

The pool is the device's (`offload.device.ExpertPool`, allocated once, at start, in the memory model
the device config names): S slots in the artifact's block format, which the expert-launch graphs read
by slot index. Streaming an expert is `ExpertPool.fill`: in `shared` one read of the block's bytes
into its slot, in `apart` one read into a staging buffer and, before the next launch, the slot-write
graph's copy into the pool. `SlotPool` decides which key lives in which slot and what to evict; this
class asks the pool to copy, counts, and makes the prefetcher's background copies safe:

- every pool operation runs under one lock; a prefetch only *reserves* its slot under the lock
  and copies after releasing it, so launches are not held up by copies they do not need;
- each slot has a ready event, cleared while a prefetch copy into it is in flight; a launch waits
  for the events of its own slots (that wait is stall time), and a demand copy into a slot whose
  prefetch is still in flight waits for it first;
- the pool pins the keys of the launch in progress, so no prefetch overwrites a slot being read.

Why a thread and `threading.Event`s rather than MindSpore's streams: in MindSpore 2.10 on the CPU
backend, `mindspore.runtime.Stream()` hands back the one CPU stream (logging "CPU device is not
supported"), `Event()` is not supported, and `Tensor.pin_memory()` fails without the Ascend plugin.
A `pread` releases the GIL, so the thread reads while a graph runs. On Ascend, the same ordering
would be a copy stream plus an event per slot, from pinned staging (see `offload.device`).

Belady's policy needs the future request sequence: `record_requests=True` keeps the keys each
launch requested (what the pool saw), to replay in a second run.
"""
from __future__ import annotations

import threading
import time
from typing import Sequence

import numpy as np

from offload.counters import OffloadCounters
from offload.device import BlockSource, DeviceMemory
from offload.policies import EvictionPolicy, Key
from offload.slots import SlotPool


class _Observed(EvictionPolicy):
    """Passes everything to `inner` and reports evictions, so unused prefetches are counted per layer."""

    def __init__(self, inner: EvictionPolicy, on_evicted):
        self.inner, self.name, self._on_evicted = inner, inner.name, on_evicted

    def record_access(self, key: Key, step: int) -> None:
        self.inner.record_access(key, step)

    def inserted(self, key: Key, step: int) -> None:
        self.inner.inserted(key, step)

    def evicted(self, key: Key) -> None:
        self.inner.evicted(key)
        self._on_evicted(key)

    def choose_victim(self, candidates, step: int) -> Key:
        return self.inner.choose_victim(candidates, step)


class OffloadedExperts:
    """`ExpertWeights` provider over `num_slots` device slots filled from `store`."""

    def __init__(self, store: BlockSource, num_slots: int, policy: EvictionPolicy,
                 counters: OffloadCounters | None = None, record_requests: bool = False,
                 device: DeviceMemory | None = None):
        self.store = store
        self.device = device or DeviceMemory()
        self.num_slots = num_slots
        self.block_bytes = store.block_bytes
        self.counters = counters or OffloadCounters.create(store.num_layers, ())
        self.requests: list[Key] | None = [] if record_requests else None
        self.device_pool = self.device.expert_pool(store, num_slots)
        self._lock = threading.Lock()
        self._ready = [threading.Event() for _ in range(num_slots)]
        for event in self._ready:
            event.set()
        self._resident: set[Key] = set()
        self._pending: set[Key] = set()  # prefetched, not used by a launch yet
        self._prefetching = False
        self._reserved: int | None = None
        self._demand_s = 0.0
        self._error: BaseException | None = None
        self.pool = SlotPool(num_slots, _Observed(policy, self._evicted), self._load)

    # --- the provider interface -----------------------------------------------------------------

    def launch_slots(self, layer: int, experts: Sequence[int]) -> np.ndarray:
        """The pool slots [G] int32 of one launch's experts, each block in its slot once this returns."""
        keys = [(layer, int(e)) for e in experts]
        unique = list(dict.fromkeys(keys))
        counts = self.counters.layers[layer]
        with self._lock:
            self._raise_if_failed()
            hits, misses = self.pool.counters.hits, self.pool.counters.misses
            self._demand_s = 0.0
            slots = self.pool.acquire(unique)
            counts.hits += self.pool.counters.hits - hits
            counts.misses += self.pool.counters.misses - misses
            for key in unique:
                if key in self._pending:
                    self._pending.discard(key)
                    counts.prefetch_hits += 1
            if self.requests is not None:
                self.requests.extend(unique)
            stall = self._demand_s
        for key in unique:
            ready = self._ready[slots[key]]
            if not ready.is_set():  # a prefetch copy into this slot is still running
                start = time.perf_counter()
                ready.wait()
                stall += time.perf_counter() - start
        counts.stall_s += stall
        self._raise_if_failed()
        self.device_pool.commit()  # apart: the slot writes of every block staged so far, before the launch reads them
        return np.array([slots[key] for key in keys], np.int32)

    def is_resident(self, layer: int, expert: int) -> bool:
        """In a slot (or being copied into one by a prefetch)."""
        return (layer, expert) in self._resident

    # --- prefetch (called from the prefetcher's thread) -------------------------------------------

    def prefetch(self, layer: int, experts: Sequence[int]) -> int:
        """Stream `experts` of `layer` into slots ahead of their launch; returns copies issued.

        Stops at the first expert the pool has no room for (every slot held by the launch in
        progress or by unused prefetches): later ones would not fit either.
        """
        issued = 0
        for expert in experts:
            key = (layer, int(expert))
            with self._lock:
                if key in self._resident or self._error is not None:
                    continue
                self._prefetching, self._reserved = True, None
                try:
                    loaded = self.pool.prefetch(key)
                finally:
                    self._prefetching = False
                if not loaded:
                    break
                slot = self._reserved
                self._pending.add(key)
                self.counters.layers[layer].prefetch_issued += 1
            try:
                self._copy(key, slot)
            except BaseException as err:  # the launch that needs this slot re-raises it
                self._error = err
            finally:
                self._ready[slot].set()
            issued += 1
        return issued

    # --- pool callbacks (run under the lock) ------------------------------------------------------

    def _load(self, key: Key, slot: int) -> None:
        self._ready[slot].wait()  # a prefetch copy into this slot, of the key just evicted, may still run
        if self._prefetching:
            self._ready[slot].clear()
            self._reserved = slot
        else:
            start = time.perf_counter()
            self._copy(key, slot)
            self._demand_s += time.perf_counter() - start
        self._resident.add(key)
        self.counters.layers[key[0]].bytes_streamed += self.block_bytes

    def _evicted(self, key: Key) -> None:
        self._resident.discard(key)
        if key in self._pending:
            self._pending.discard(key)
            self.counters.layers[key[0]].prefetch_wasted += 1

    def _copy(self, key: Key, slot: int) -> None:
        self.device_pool.fill(slot, *key)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"a prefetch copy failed: {self._error!r}") from self._error

    def check_invariants(self) -> None:
        """Pool bookkeeping (see `SlotPool.check_invariants`) plus: what is resident is in a slot."""
        with self._lock:
            self.pool.check_invariants()
            if self._resident != set(self.pool.resident()):
                raise AssertionError(f"resident set {sorted(self._resident)} differs from the pool's")
