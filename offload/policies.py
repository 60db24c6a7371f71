"""Eviction policies for the expert slot pool.

A key is `(layer, expert)`. A *step* is the pool's request counter: it starts at 0 and grows by one
for every distinct key of every launch the pool serves (hit or miss), so step `s` is the index of
that request in the flattened request sequence (`RoutingTrace.requests()`). Prefetches are not
requests: they see the step of the next request and do not advance it. Policies only rank keys;
the pool decides when to evict and passes as candidates the resident keys it may give up.
"""
from __future__ import annotations

import bisect
import math
from abc import ABC, abstractmethod
from collections import defaultdict
from typing import Iterable, Sequence

Key = tuple[int, int]


class EvictionPolicy(ABC):
    """What the pool tells a policy, and the one question it asks."""

    name: str

    @abstractmethod
    def record_access(self, key: Key, step: int) -> None:
        """`key` was requested by a launch at `step` (a hit, or a miss right after `inserted`)."""

    def inserted(self, key: Key, step: int) -> None:
        """`key` became resident at `step`, by a miss or by a prefetch."""

    def evicted(self, key: Key) -> None:
        """`key` left the pool."""

    @abstractmethod
    def choose_victim(self, candidates: Sequence[Key], step: int) -> Key:
        """One of `candidates` (non-empty) to evict before serving or prefetching at `step`."""


class LRU(EvictionPolicy):
    """Evict the key least recently requested (or inserted, for a prefetch not yet used)."""

    name = "lru"

    def __init__(self) -> None:
        self._last: dict[Key, int] = {}

    def record_access(self, key: Key, step: int) -> None:
        self._last[key] = step

    def inserted(self, key: Key, step: int) -> None:
        self._last[key] = step

    def evicted(self, key: Key) -> None:
        del self._last[key]

    def choose_victim(self, candidates: Sequence[Key], step: int) -> Key:
        return min(candidates, key=self._last.__getitem__)


class LFU(EvictionPolicy):
    """Evict the key requested least often since it became resident; ties go to the least recent.

    Counts restart at every insertion (in-cache LFU), so an expert that was popular long ago does
    not squat a slot forever; `DecayedFrequency` is the variant that keeps history.
    """

    name = "lfu"

    def __init__(self) -> None:
        self._count: dict[Key, int] = {}
        self._last: dict[Key, int] = {}

    def record_access(self, key: Key, step: int) -> None:
        self._count[key] += 1
        self._last[key] = step

    def inserted(self, key: Key, step: int) -> None:
        self._count[key] = 0
        self._last[key] = step

    def evicted(self, key: Key) -> None:
        del self._count[key], self._last[key]

    def choose_victim(self, candidates: Sequence[Key], step: int) -> Key:
        return min(candidates, key=lambda k: (self._count[k], self._last[k]))


class DecayedFrequency(EvictionPolicy):
    """Evict the key with the lowest exponentially decayed request frequency.

    The router tells us, at every layer, which experts the tokens want; expert popularity in MoE
    models is skewed and drifts with the text. Each request adds 1 to the key's score and the score
    halves every `half_life` steps (requests; the full Qwen3.6 model makes 40 x 8 = 320 per decoded
    token), so the score tracks recent popularity without LRU's forgetting after one cold stretch
    nor LFU's loyalty to a stale favourite. Scores survive eviction: an expert reloaded after a
    short absence keeps its standing. `hot` is an optional set of keys that calibration found
    popular overall; they are evicted only when every candidate is hot. Ties go to the least
    recently requested key.
    """

    name = "decay"

    def __init__(self, half_life: float = 1024.0, hot: Iterable[Key] = ()) -> None:
        if not half_life > 0:
            raise ValueError(f"DecayedFrequency: half_life must be positive, got {half_life}")
        self.half_life = float(half_life)
        self.hot = frozenset(hot)
        self._rank: dict[Key, float] = {}  # log2(score) + step/half_life: orders keys at any step
        self._at: dict[Key, int] = {}

    def score(self, key: Key, step: int) -> float:
        """The decayed request count of `key` as seen at `step`."""
        return math.exp2(self._rank.get(key, -math.inf) - step / self.half_life)

    def record_access(self, key: Key, step: int) -> None:
        self._rank[key] = math.log2(self.score(key, step) + 1.0) + step / self.half_life
        self._at[key] = step

    def choose_victim(self, candidates: Sequence[Key], step: int) -> Key:
        return min(candidates, key=lambda k: (k in self.hot, self._rank.get(k, -math.inf), self._at.get(k, -1)))


class Belady(EvictionPolicy):
    """The offline optimum: evict the candidate whose next request is farthest in the future.

    `trace` is the full request sequence the pool will serve (`RoutingTrace.requests()`); keys
    never requested again go first. Used as the lower bound that online policies are measured
    against. Each request is checked against the trace, so a replay that drifts fails loudly.
    """

    name = "belady"

    def __init__(self, trace: Sequence[Key]) -> None:
        self.trace = [tuple(k) for k in trace]
        self._positions: dict[Key, list[int]] = defaultdict(list)
        for step, key in enumerate(self.trace):
            self._positions[key].append(step)

    def next_use(self, key: Key, step: int) -> float:
        """Step of the first request of `key` at or after `step`; infinity if none."""
        positions = self._positions.get(key, [])
        i = bisect.bisect_left(positions, step)
        return positions[i] if i < len(positions) else math.inf

    def record_access(self, key: Key, step: int) -> None:
        expected = self.trace[step] if step < len(self.trace) else None
        if expected != key:
            raise ValueError(
                f"Belady: request {key} at step {step} does not follow the trace "
                f"(expected {expected}, trace length {len(self.trace)})"
            )

    def choose_victim(self, candidates: Sequence[Key], step: int) -> Key:
        return max(candidates, key=lambda k: self.next_use(k, step))


POLICIES: dict[str, type[EvictionPolicy]] = {cls.name: cls for cls in (LRU, LFU, DecayedFrequency, Belady)}
# what a placement that names no policy evicts by, everywhere (conf/placement/*.yaml say it too): decayed
# frequency streamed least on learned routing (bench/routing.py)
DEFAULT_POLICY = "decay"


def make_policy(name: str, **kwargs) -> EvictionPolicy:
    """Build a policy by its config name; `belady` needs `trace=`, `decay` takes `half_life`, `hot`."""
    if name not in POLICIES:
        raise ValueError(f"unknown eviction policy '{name}'; valid names: {', '.join(sorted(POLICIES))}")
    try:
        return POLICIES[name](**kwargs)
    except TypeError as err:
        raise TypeError(f"eviction policy '{name}': {err}") from None
