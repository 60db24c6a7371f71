"""Capacity tiers: how one MoE layer's routed tokens are cut into static-shape expert launches.

Expert compute runs through graphs compiled for a fixed shape, one graph per tier, so at run time
each expert's tokens must be packed into slots of a tier's capacity and the slots launched in
groups of that tier's size. This module is the single definition of that packing: the runtime
launch loop and the calibration cost (`app.calibrate`) both call `plan_launches`.

Dimensions:
    E  experts in the layer (router width)
    n  load: tokens the router sent to one expert in this step (top-k over T tokens)
    C  tier capacity: token rows per slot of the tier's graph
    G  tier group: slots per launch of the tier's graph, i.e. graph input [G, C, H]
    H  hidden size
    m  pieces assigned to a tier in one step; that tier then takes ceil(m / G) launches

Dispatch rule: an expert with load n > C_max (the largest capacity) is cut into full pieces of
C_max tokens for the largest tier until at most C_max tokens remain; the remainder r > 0 goes to
the smallest tier with capacity >= r. No token is dropped; padding fills unused slot rows.
"""
from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


@dataclass(frozen=True)
class Tier:
    """One compiled expert-group graph shape: G slots of C tokens each."""

    capacity: int
    group: int

    def __post_init__(self) -> None:
        for name in ("capacity", "group"):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise ValueError(f"Tier {name} must be a positive integer, got {value!r} in {self}")
            object.__setattr__(self, name, int(value))

    @property
    def slot_tokens(self) -> int:
        """Token rows one launch computes, padded or not (G * C)."""
        return self.capacity * self.group


@dataclass(frozen=True)
class TierSet:
    """Tiers sorted by strictly increasing capacity; index 0 is the smallest."""

    tiers: tuple[Tier, ...]

    def __post_init__(self) -> None:
        tiers = tuple(self.tiers)
        if not tiers:
            raise ValueError("TierSet needs at least one tier, got an empty list")
        for i, tier in enumerate(tiers):
            if not isinstance(tier, Tier):
                raise TypeError(f"TierSet entry {i} is {tier!r}, expected a Tier")
        for i in range(1, len(tiers)):
            prev, cur = tiers[i - 1].capacity, tiers[i].capacity
            if cur == prev:
                raise ValueError(f"TierSet has duplicate capacity {cur} (entries {i - 1} and {i})")
            if cur < prev:
                raise ValueError(
                    f"TierSet capacities must be sorted ascending: entry {i} has capacity {cur} "
                    f"after {prev}"
                )
        object.__setattr__(self, "tiers", tiers)

    def __len__(self) -> int:
        return len(self.tiers)

    def __getitem__(self, index: int) -> Tier:
        return self.tiers[index]

    def __iter__(self) -> Iterator[Tier]:
        return iter(self.tiers)

    @property
    def capacities(self) -> tuple[int, ...]:
        return tuple(t.capacity for t in self.tiers)

    @property
    def max_capacity(self) -> int:
        return self.tiers[-1].capacity

    def index_for(self, count: int) -> int:
        """Index of the smallest tier whose capacity holds `count` tokens (1 <= count <= C_max)."""
        if not 1 <= count <= self.max_capacity:
            raise ValueError(
                f"count {count} outside 1..{self.max_capacity} for tiers {self.capacities}"
            )
        return bisect.bisect_left(self.capacities, count)


@dataclass(frozen=True)
class Piece:
    """Tokens [start, start + count) of one expert's routed-token list, computed in one slot."""

    expert: int
    start: int
    count: int


@dataclass(frozen=True)
class Launch:
    """One call of tier `tier_index`'s graph with up to G pieces; remaining slots are padding."""

    tier_index: int
    pieces: tuple[Piece, ...]


def split_load(load: int, max_capacity: int) -> tuple[int, int]:
    """(number of full C_max pieces, remainder in 1..C_max) for a load >= 1: the overflow rule."""
    full = (load - 1) // max_capacity
    return full, load - full * max_capacity


def _load_items(loads: Mapping[int, int] | np.ndarray) -> list[tuple[int, int]]:
    """(expert, load) pairs with load > 0, sorted by expert; rejects negative or non-int loads."""
    if isinstance(loads, np.ndarray):
        if loads.ndim != 1:
            raise ValueError(
                f"loads array must be 1-D (one load per expert), got shape {loads.shape}"
            )
        if not np.issubdtype(loads.dtype, np.integer):
            raise TypeError(f"loads array must have an integer dtype, got {loads.dtype}")
        items = [(int(e), int(n)) for e, n in enumerate(loads)]
    else:
        items = []
        for e, n in loads.items():
            if not _is_int(e) or not _is_int(n):
                raise TypeError(f"loads must map int expert -> int load, got {e!r}: {n!r}")
            items.append((int(e), int(n)))
    for e, n in items:
        if n < 0:
            raise ValueError(f"expert {e} has negative load {n}")
    return sorted((e, n) for e, n in items if n > 0)


def plan_launches(loads: Mapping[int, int] | np.ndarray, tiers: TierSet) -> list[Launch]:
    """Launches for one layer step: pieces per tier ordered by (expert, start), chunked by G.

    `loads` is either a mapping expert -> load or an array indexed by expert id; zero loads are
    inactive experts. Launches come ordered by tier index, then by their first piece.
    """
    c_max = tiers.max_capacity
    per_tier: list[list[Piece]] = [[] for _ in tiers]
    for expert, load in _load_items(loads):
        full, remainder = split_load(load, c_max)
        for k in range(full):
            per_tier[-1].append(Piece(expert, k * c_max, c_max))
        per_tier[tiers.index_for(remainder)].append(Piece(expert, full * c_max, remainder))
    launches = []
    for index, pieces in enumerate(per_tier):
        pieces.sort(key=lambda p: (p.expert, p.start))
        g = tiers[index].group
        launches.extend(Launch(index, tuple(pieces[i : i + g])) for i in range(0, len(pieces), g))
    return launches


def decode_plan(top_k: int, tiers: TierSet) -> list[Launch]:
    """The launches of one layer of a decode token: `top_k` experts with one row each."""
    return plan_launches({expert: 1 for expert in range(top_k)}, tiers)


def padding(launches: Iterable[Launch], tiers: TierSet) -> int:
    """Padded slot-tokens over `launches`: sum of G * C minus the tokens actually carried."""
    return sum(
        tiers[launch.tier_index].slot_tokens - sum(p.count for p in launch.pieces)
        for launch in launches
    )


def from_config(
    entries: Sequence[Mapping[str, int] | int], default_group: int | None = None
) -> TierSet:
    """TierSet from Hydra config: `[{capacity: 1, group: 8}, ...]` or bare capacities `[1, 16]`.

    Bare capacities, and dicts without `group`, take `default_group`; entries must already be
    sorted by capacity (an unsorted config is an error rather than silently reordered).
    """
    tiers = []
    for i, entry in enumerate(entries):
        if isinstance(entry, Mapping):
            unknown = set(entry) - {"capacity", "group"}
            if unknown:
                raise ValueError(
                    f"tier entry {i} has unknown keys {sorted(unknown)}: {dict(entry)}"
                )
            if "capacity" not in entry:
                raise ValueError(f"tier entry {i} has no capacity: {dict(entry)}")
            capacity, group = entry["capacity"], entry.get("group", default_group)
        elif _is_int(entry):
            capacity, group = entry, default_group
        else:
            raise TypeError(f"tier entry {i} must be a mapping or an int capacity, got {entry!r}")
        if group is None:
            raise ValueError(
                f"tier entry {i} (capacity {capacity}) has no group and no default_group"
            )
        tiers.append(Tier(capacity, group))
    return TierSet(tuple(tiers))
