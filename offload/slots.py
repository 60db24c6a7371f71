"""Bookkeeping of the fixed pool of device expert slots.

The caller allocates the slots once (a graph takes expert weights as inputs, so any slot can hold
any expert) and hands over a `load(key, slot)` callback that copies one expert block into a slot.
The pool decides which key lives where, when to copy and what to evict, and counts what happened.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Collection, Sequence

from offload.policies import EvictionPolicy, Key

LoadFn = Callable[[Key, int], None]


@dataclass
class PoolCounters:
    """Event counts. `hits` includes `prefetch_hits`; `loads` = misses + prefetches that copied."""

    hits: int = 0
    misses: int = 0
    loads: int = 0
    evictions: int = 0
    prefetches: int = 0
    prefetch_hits: int = 0
    prefetch_wasted: int = 0

    @property
    def requests(self) -> int:
        return self.hits + self.misses

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requests if self.requests else 0.0


class SlotPool:
    """Which `(layer, expert)` key occupies which of `num_slots` device slots.

    The keys of the launch in progress (the last `acquire`) are pinned: neither a later miss of the
    same launch nor a prefetch may evict them, since the launch reads their slots.
    """

    def __init__(self, num_slots: int, policy: EvictionPolicy, load: LoadFn) -> None:
        if not isinstance(num_slots, int) or num_slots <= 0:
            raise ValueError(f"SlotPool: num_slots must be a positive int, got {num_slots!r}")
        self.num_slots = num_slots
        self.policy = policy
        self.counters = PoolCounters()
        self._load_fn = load
        self._slot_of: dict[Key, int] = {}
        self._free: list[int] = list(range(num_slots - 1, -1, -1))  # pop() hands out slot 0 first
        self._step = 0
        self._pinned: frozenset[Key] = frozenset()
        self._pending: set[Key] = set()  # prefetched, not requested yet
        self._last: dict[Key, int] = {}

    @property
    def step(self) -> int:
        """Requests served so far, i.e. the step of the next request."""
        return self._step

    def resident(self) -> dict[Key, int]:
        return dict(self._slot_of)

    def acquire(self, keys: Sequence[Key]) -> dict[Key, int]:
        """Make every key of one launch resident and return key -> slot.

        Duplicate keys count once; distinct keys are served in the given order, one step each.
        """
        launch = list(dict.fromkeys(keys))
        if len(launch) > self.num_slots:
            raise ValueError(f"launch needs {len(launch)} slots, pool has {self.num_slots}")
        self._pinned = frozenset(launch)
        self._last = {}
        slots: dict[Key, int] = {}
        for key in launch:
            step = self._step
            self._step += 1
            slot = self._slot_of.get(key)
            if slot is None:
                self.counters.misses += 1
                slot = self._load(key, step, self._pinned)
            else:
                self.counters.hits += 1
                if key in self._pending:
                    self._pending.discard(key)
                    self.counters.prefetch_hits += 1
            self.policy.record_access(key, step)
            slots[key] = slot
        self._last = slots
        return dict(slots)

    def prefetch(self, key: Key) -> bool:
        """Load `key` ahead of its request; True if a copy was issued.

        Gives up (False) when the key is resident already or every slot is held by the launch in
        progress or by an earlier unused prefetch, so prefetches never evict each other.
        """
        if key in self._slot_of:
            return False
        slot = self._load(key, self._step, self._pinned | self._pending)
        if slot is None:
            return False
        self._pending.add(key)
        self.counters.prefetches += 1
        return True

    def _load(self, key: Key, step: int, protected: Collection[Key]) -> int | None:
        """Copy `key` into a free slot or one freed by eviction; None if only protected keys remain."""
        if self._free:
            slot = self._free.pop()
        else:
            candidates = [k for k in self._slot_of if k not in protected]
            if not candidates:
                return None
            victim = self.policy.choose_victim(candidates, step)
            if victim not in candidates:
                raise RuntimeError(f"policy '{self.policy.name}' chose {victim}, which is not an eviction candidate")
            slot = self._evict(victim)
        try:
            self._load_fn(key, slot)
        except BaseException:
            self._free.append(slot)
            raise
        self._slot_of[key] = slot
        self.counters.loads += 1
        self.policy.inserted(key, step)
        return slot

    def _evict(self, key: Key) -> int:
        slot = self._slot_of.pop(key)
        self.counters.evictions += 1
        if key in self._pending:
            self._pending.discard(key)
            self.counters.prefetch_wasted += 1
        self.policy.evicted(key)
        return slot

    def check_invariants(self) -> None:
        """Raise AssertionError naming the first broken rule of the bookkeeping."""
        held = list(self._slot_of.values())
        if len(held) > self.num_slots:
            raise AssertionError(f"{len(held)} resident keys in a pool of {self.num_slots} slots")
        if len(set(held)) != len(held):
            shared = sorted({s for s in held if held.count(s) > 1})
            raise AssertionError(f"slots {shared} are held by more than one key")
        if sorted(held + self._free) != list(range(self.num_slots)):
            raise AssertionError(f"held slots {sorted(held)} and free slots {sorted(self._free)} are not a partition")
        for key, slot in self._last.items():
            if self._slot_of.get(key) != slot:
                raise AssertionError(f"last acquire gave {key} slot {slot}, it is now in {self._slot_of.get(key)}")
        if not self._pending <= self._slot_of.keys():
            raise AssertionError(f"prefetched keys {sorted(self._pending - self._slot_of.keys())} are not resident")
