"""Choosing capacity tiers from recorded routing loads, and scoring tier sets against them.

A tier set trades launches against padding: few large tiers pad small experts heavily, many small
tiers multiply launches (and compiled graphs). The score is the expected time of the expert
launches a layer step would make, with the launches planned by `offload.tiers.plan_launches` so
that calibration and runtime agree on the dispatch rule.

Dimensions follow `offload.tiers`: S recorded steps, E experts per step, n a load, C a capacity,
G a group, D the number of candidate capacities.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from offload.tiers import Tier, TierSet, padding, plan_launches


@dataclass(frozen=True)
class LaunchCost:
    """Time model of one expert-group launch: launch_s + slot_token_s * G * C.

    Every slot-token is computed whether it carries a token or padding, hence G * C.
    """

    launch_s: float
    slot_token_s: float

    def __post_init__(self) -> None:
        for name in ("launch_s", "slot_token_s"):
            value = getattr(self, name)
            if not value >= 0:
                raise ValueError(f"LaunchCost.{name} must be >= 0, got {value!r}")

    def of(self, tier: Tier) -> float:
        """Seconds for one launch of `tier`'s graph."""
        return self.launch_s + self.slot_token_s * tier.slot_tokens


# Ascend 310P3 from its specs, not measured: ~22 TFLOPS FP16 peak, ~10 us per graph launch.
# One slot-token is one token through a SwiGLU expert of hidden H=2048, intermediate I=512:
# three [H x I] matmuls at 2 flops per multiply-add = 2 * 3 * I * H flops (~6.3 MFLOP, ~0.29 us).
ASCEND_310P3_COST = LaunchCost(launch_s=10e-6, slot_token_s=2 * 3 * 512 * 2048 / 22e12)


@dataclass(frozen=True)
class TierReport:
    """How a tier set does on recorded loads; means are over steps."""

    padding_fraction: float  # padded slot-tokens / all slot-tokens, summed over all steps
    launches_per_step: float
    cost_per_step_s: float


def _steps(load_samples: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Validated per-step load arrays (1-D, integer, non-negative)."""
    steps = [np.asarray(step) for step in load_samples]
    if not steps:
        raise ValueError("load_samples is empty: need at least one step of per-expert loads")
    for i, step in enumerate(steps):
        if step.ndim != 1:
            raise ValueError(
                f"load_samples step {i} must be 1-D (one load per expert), got shape {step.shape}"
            )
        if step.size and not np.issubdtype(step.dtype, np.integer):
            raise TypeError(
                f"load_samples step {i} must hold integer loads, got dtype {step.dtype}"
            )
        if step.size and step.min() < 0:
            raise ValueError(
                f"load_samples step {i} has a negative load at expert {int(step.argmin())}"
            )
    return [step.astype(np.int64) for step in steps]


def report(load_samples: Sequence[np.ndarray], tiers: TierSet, cost: LaunchCost) -> TierReport:
    """Padding fraction, launches and cost per step of `tiers` on `load_samples`."""
    steps = _steps(load_samples)
    launches = slot_tokens = padded = 0
    total_s = 0.0
    for step in steps:
        planned = plan_launches(step, tiers)
        launches += len(planned)
        slot_tokens += sum(tiers[launch.tier_index].slot_tokens for launch in planned)
        padded += padding(planned, tiers)
        total_s += sum(cost.of(tiers[launch.tier_index]) for launch in planned)
    return TierReport(
        padding_fraction=padded / slot_tokens if slot_tokens else 0.0,
        launches_per_step=launches / len(steps),
        cost_per_step_s=total_s / len(steps),
    )


def expected_cost(load_samples: Sequence[np.ndarray], tiers: TierSet, cost: LaunchCost) -> float:
    """Mean over steps of the summed launch cost of `plan_launches(step, tiers)`."""
    return report(load_samples, tiers, cost).cost_per_step_s


def _ceil_div(a: np.ndarray, b: int) -> np.ndarray:
    return -(-a // b)


def choose_tiers(
    load_samples: Sequence[np.ndarray],
    cost: LaunchCost,
    max_tiers: int,
    group_for_capacity: Callable[[int], int],
) -> TierSet:
    """The set of at most `max_tiers` capacities, drawn from the distinct positive loads seen,
    with the least expected cost; exact over that candidate set.

    The largest capacity decides how loads split (full pieces plus a remainder), so it is
    enumerated; for each choice the smaller tiers partition the remainders into intervals
    (c_prev, c], whose cost per step is ceil(pieces / G) launches, and a DP over sorted
    candidates picks the cheapest partition. Ties go to the smaller largest
    capacity, then to fewer tiers.
    """
    if not isinstance(max_tiers, int) or max_tiers < 1:
        raise ValueError(f"max_tiers must be a positive int, got {max_tiers!r}")
    steps = _steps(load_samples)
    loads = np.zeros((len(steps), max(step.size for step in steps)), dtype=np.int64)
    for i, step in enumerate(steps):
        loads[i, : step.size] = step
    candidates = np.unique(loads[loads > 0])
    if candidates.size == 0:
        raise ValueError("load_samples has no positive load: no capacity to calibrate for")
    tiers = [Tier(int(c), group_for_capacity(int(c))) for c in candidates]
    groups = [t.group for t in tiers]
    launch_s = np.array([cost.of(t) for t in tiers])

    best_total, best_indices = np.inf, ()
    for top in range(candidates.size):
        total, indices = _best_below(loads, candidates, groups, launch_s, top, max_tiers - 1)
        if total < best_total:
            best_total, best_indices = total, indices
    return TierSet(tuple(tiers[i] for i in best_indices))


def _best_below(
    loads: np.ndarray,
    candidates: np.ndarray,
    groups: list[int],
    launch_s: np.ndarray,
    top: int,
    max_lower: int,
) -> tuple[float, tuple[int, ...]]:
    """Least summed cost over steps with candidates[top] as the largest tier and at most
    `max_lower` smaller tiers; returns (cost, chosen candidate indices ascending)."""
    c_max = int(candidates[top])
    active = loads > 0
    full = np.where(active, (loads - 1) // c_max, 0)
    remainder = np.where(active, loads - full * c_max, 0)
    n_steps = loads.shape[0]
    # counts[j, s] = remainders of step s that are <= candidates[j - 1]; row 0 is "below every
    # tier". Keys s * (C_max + 1) + remainder sort by step, then remainder.
    row = np.arange(n_steps)[:, None] * (c_max + 1)
    keys = np.sort((row + remainder)[active])
    counts = np.zeros((top + 1, n_steps), dtype=np.int64)
    counts[1:] = (
        np.searchsorted(keys, row + candidates[None, :top], side="right")
        - np.searchsorted(keys, row, side="right")
    ).T
    pieces = full.sum(axis=1) + active.sum(axis=1)

    top_cost = _ceil_div(pieces[None, :] - counts, groups[top]).sum(axis=1) * launch_s[top]
    # interval[b, a] = cost of tier b taking remainders in (candidates[a], candidates[b]], a < b.
    # The loop is the O(S * D^2) core, so it works in place on int32 rows (counts <= experts).
    interval = np.full((top, top), np.inf)
    first = np.empty(top)
    counts32 = counts.astype(np.int32)
    scratch = np.empty_like(counts32)
    for b in range(top):
        pieces_in = scratch[: b + 1]
        np.subtract(counts32[b + 1], counts32[: b + 1], out=pieces_in)
        pieces_in += groups[b] - 1
        pieces_in //= groups[b]
        segment = pieces_in.sum(axis=1, dtype=np.int64) * launch_s[b]
        first[b], interval[b, :b] = segment[0], segment[1:]

    best_total, best_indices = float(top_cost[0]), (top,)
    cheapest = first  # cheapest[b]: t tiers covering remainders <= candidates[b], largest b
    parents: list[np.ndarray] = []
    for _ in range(min(max_lower, top)):
        totals = cheapest + top_cost[1:]
        b = int(np.argmin(totals))
        if totals[b] < best_total:
            indices = [b]
            for parent in reversed(parents):
                indices.append(int(parent[indices[-1]]))
            best_total, best_indices = float(totals[b]), (*reversed(indices), top)
        options = cheapest[None, :] + interval
        parents.append(np.argmin(options, axis=1))
        cheapest = options[np.arange(top), parents[-1]]
    return best_total / n_steps, best_indices


def power_of_two_tiers(max_load: int, n: int, group_for_capacity: Callable[[int], int]) -> TierSet:
    """Baseline: up to `n` power-of-two capacities, the largest the first power of two >= max_load
    (so nothing overflows), halving down to 1 at most."""
    if max_load < 1 or n < 1:
        raise ValueError(f"power_of_two_tiers needs max_load >= 1 and n >= 1, got {max_load}, {n}")
    top = 1 << (max_load - 1).bit_length()
    capacities = sorted({top >> i for i in range(n) if top >> i >= 1})
    return TierSet(tuple(Tier(c, group_for_capacity(c)) for c in capacities))


def single_tier(max_load: int, group: int) -> TierSet:
    """Baseline: one tier holding the largest load, as a single static graph would."""
    return TierSet((Tier(max_load, group),))


def write_tiers_yaml(tiers: TierSet, path: str | os.PathLike, comment: str) -> Path:
    """Write `tiers` as a Hydra `conf/tiers/` option, atomically (temp file + os.replace).

    `# @package _global_` makes `tiers=<name>` set the top-level `tiers:` list that
    `offload.tiers.from_config` reads.
    """
    path = Path(path)
    comment_lines = comment.splitlines()
    for line in comment_lines:
        if line.lstrip().startswith("@"):
            raise ValueError(f"comment line {line!r} would be read as a Hydra header directive")
    text = "\n".join(
        ["# @package _global_"]
        + [f"# {line}".rstrip() for line in comment_lines]
        + ["tiers:"]
        + [f"  - {{capacity: {t.capacity}, group: {t.group}}}" for t in tiers]
    ) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path
