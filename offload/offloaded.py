"""Routed experts served from a fixed pool of device slots, streamed from the host store on demand.

Legend: S slots, H hidden, I expert width; a key is `(layer, expert)`.

The slots are allocated once, at start: one page-aligned buffer `[S, stride]` of bytes, each row
one block in the artifact's block format (`artifact.store`: the parts of one slot of the
expert-group graph for the store's dtype, fp32, fp16 or int8 with its scales, at their offsets),
and each part of each slot wrapped once as a MindSpore tensor (`Tensor.from_numpy` shares the
buffer, and graphs read whatever the buffer holds when they run). Streaming an expert is one read
of its block's bytes into its slot (`BlockSource.read_into`); nothing is converted, nothing is
allocated per token. `SlotPool` decides which key
lives in which slot and what to evict; this class does the copies, counts, and makes the
prefetcher's background copies safe:

- every pool operation runs under one lock; a prefetch only *reserves* its slot under the lock
  and copies after releasing it, so launches are not held up by copies they do not need;
- each slot has a ready event, cleared while a prefetch copy into it is in flight; a launch waits
  for the events of its own slots (that wait is stall time), and a demand copy into a slot whose
  prefetch is still in flight waits for it first;
- the pool pins the keys of the launch in progress, so no prefetch overwrites a slot being read.

Why a thread and `threading.Event`s rather than MindSpore's streams: in MindSpore 2.10 on the CPU
backend, `mindspore.runtime.Stream()` hands back the one CPU stream (logging "CPU device is not
supported"), `Event()` is not supported, and `Tensor.pin_memory()` fails without the Ascend plugin.
A `pread` releases the GIL, so the thread copies while a graph runs. On Ascend, the same
ordering would be a copy stream plus an event per slot, from pinned host blocks.

Belady's policy needs the future request sequence: `record_requests=True` keeps the keys each
launch requested (what the pool saw), to replay in a second run.
"""
from __future__ import annotations

import math
import threading
import time
from typing import Protocol, Sequence

import numpy as np
import mindspore as ms

from offload.counters import OffloadCounters
from offload.crossings import Crossings
from offload.policies import EvictionPolicy, Key
from offload.slots import SlotPool

PAGE = 4096


class BlockSource(Protocol):
    """Where streamed blocks come from: the artifact's expert store (`artifact.reader.ExpertStoreReader`).

    `parts` are `artifact.manifest.BlockPart`s (name, dtype, shape, offset): one slot's inputs of the
    expert-group graph, in the order the graph takes them."""

    parts: tuple
    block_bytes: int
    num_layers: int
    num_experts: int

    def read_into(self, layer: int, expert: int, out: np.ndarray) -> None: ...


def aligned_empty(shape: Sequence[int], dtype: str = "float32", align: int = PAGE) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on an `align`-byte boundary."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + align, np.uint8)
    start = -raw.ctypes.data % align
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def slot_buffers(source: BlockSource, count: int) -> tuple[np.ndarray, list[tuple[np.ndarray, ...]]]:
    """`count` page-aligned block buffers [count, stride] and, per slot, its parts as array views."""
    stride = -(-source.block_bytes // PAGE) * PAGE
    buffer = aligned_empty((count, stride), "uint8")
    views = [tuple(buffer[s, p.offset : p.offset + p.nbytes].view(p.dtype).reshape(p.shape) for p in source.parts)
             for s in range(count)]
    return buffer, views


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
                 crossings: Crossings | None = None):
        self.store = store
        self.crossings = crossings or Crossings()
        self.num_slots = num_slots
        self.block_bytes = store.block_bytes
        self.parts = len(store.parts)
        self.counters = counters or OffloadCounters.create(store.num_layers, ())
        self.requests: list[Key] | None = [] if record_requests else None
        self.buffer, self._slot_arrays = slot_buffers(store, num_slots)
        self.buffer.fill(0)  # fault every page in now rather than during the first streams
        self._slot_tensors = [tuple(ms.Tensor.from_numpy(a) for a in arrays) for arrays in self._slot_arrays]
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

    def launch_weights(self, layer: int, experts: Sequence[int]) -> tuple:
        """Slot tensors for one launch, part by part: G gate_up, G down (int8: then G of each scale)."""
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
        per_slot = [self._slot_tensors[slots[key]] for key in keys]
        return tuple(tensors[a] for a in range(self.parts) for tensors in per_slot)

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
        self.store.read_into(key[0], key[1], self.buffer[slot])
        self.crossings.copied("expert block", self.block_bytes)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"a prefetch copy failed: {self._error!r}") from self._error

    def check_invariants(self) -> None:
        """Pool bookkeeping (see `SlotPool.check_invariants`) plus: what is resident is in a slot."""
        with self._lock:
            self.pool.check_invariants()
            if self._resident != set(self.pool.resident()):
                raise AssertionError(f"resident set {sorted(self._resident)} differs from the pool's")
