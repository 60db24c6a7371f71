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

CONF_TIERS = Path(__file__).parents[1] / "conf" / "tiers"  # where `tiers=<name>` options live


@dataclass(frozen=True, kw_only=True)
class LaunchCost:
    """Time model of one expert-group launch: launch_s + slot_s * G + slot_token_s * G * C.

    Every slot reads one expert's weights whether it carries tokens or padding (hence slot_s * G:
    without it, splitting a load over many small slots would look free), and every slot-token is
    computed whether it carries a token or padding (hence G * C).
    """

    launch_s: float  # fixed cost of one graph launch
    slot_s: float  # reading one expert's weights (gate_up + down) in one slot
    slot_token_s: float  # one token row through one expert's SwiGLU

    def __post_init__(self) -> None:
        for name in ("launch_s", "slot_s", "slot_token_s"):
            value = getattr(self, name)
            if not value >= 0:
                raise ValueError(f"LaunchCost.{name} must be >= 0, got {value!r}")

    def of(self, tier: Tier) -> float:
        """Seconds for one launch of `tier`'s graph."""
        return self.launch_s + self.slot_s * tier.group + self.slot_token_s * tier.slot_tokens


# Ascend 310P3 from its specs, not measured. The Atlas 300I Pro datasheet gives one 310P3 chip
# 70 TFLOPS FP16 (140 TOPS INT8) and 24 GB LPDDR4X at 204.8 GB/s (the 300I Duo, two chips, lists
# 280 TOPS INT8 and 408 GB/s). One expert of Qwen3.6-35B-A3B (H=2048, I=512):
#   slot_s: its weights, 3 * 512 * 2048 FP16 = 6.29 MB, read once per slot at 204.8 GB/s = 30.7 us;
#   slot_token_s: one token through the SwiGLU, 2 flops per multiply-add over three [H x I]
#     matmuls = 6.29 MFLOP, at 70 TFLOPS = 0.090 us (peak; small-C matmuls attain less);
#   launch_s: 10 us per graph launch is an assumption of the order of ACL launch overheads, not a
#     datasheet figure. Measure all three on the card (bench/launch_cost.py) when it is here.
# Reading weights dominates until C ~ 340 tokens per slot: on this card a slot is dear.
_EXPERT_PARAMS_35B = 3 * 512 * 2048
ASCEND_310P3_COST = LaunchCost(
    launch_s=10e-6,
    slot_s=_EXPERT_PARAMS_35B * 2 / 204.8e9,
    slot_token_s=2 * _EXPERT_PARAMS_35B / 70e12,
)


# MindSpore 2.10 CPU backend with Ferry's expert kernel, measured here (2 cores) on 2026-11-28 by
#   python -m bench.launch_cost
# timing the expert-group graph at H=2048, I=512 (FP32 weights, 12.6 MB per expert) at
# G in {1, 2, 4, 8} x C in {1, 4, 8, 32, 64} with every row real; fit rms relative residual 8%.
# Slots read expert weights at ~30 GB/s. The kernel computes real rows only, so on the CPU the
# slot-token term is paid per real token and padding costs nothing but its host copy; the model
# charges padding at the full rate, which is what devices whose MatMul computes it pay.
CPU_COST = LaunchCost(launch_s=946e-6, slot_s=425e-6, slot_token_s=75.9e-6)

COSTS = {"cpu": CPU_COST, "ascend_310p3": ASCEND_310P3_COST}


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


GroupOptions = Callable[[int], "int | Sequence[int]"]


def _group_options(group_for_capacity: GroupOptions, capacity: int) -> tuple[int, ...]:
    """The candidate groups (slots per launch) for `capacity`, ascending and distinct."""
    value = group_for_capacity(capacity)
    options = (value,) if isinstance(value, (int, np.integer)) else tuple(value)
    if not options or not all(
        isinstance(g, (int, np.integer)) and not isinstance(g, bool) and g >= 1 for g in options
    ):
        raise ValueError(
            f"group_for_capacity({capacity}) must give a positive int or a non-empty sequence of "
            f"them, got {value!r}"
        )
    return tuple(sorted({int(g) for g in options}))


def choose_tiers(
    load_samples: Sequence[np.ndarray],
    cost: LaunchCost,
    max_tiers: int,
    group_for_capacity: GroupOptions,
) -> TierSet:
    """The set of at most `max_tiers` tiers with the least expected cost on `load_samples`: exact
    over every integer capacity and, per capacity, the groups `group_for_capacity(capacity)`
    offers (one int, or a sequence of candidates).

    The largest capacity C_max decides how loads split (full pieces plus a remainder), so every
    C_max from 1 to the largest load is tried (a larger one only pads more). For each, the
    smaller tiers partition the remainders into intervals (c_prev, c], whose cost per step is
    ceil(pieces / G) launches, and a DP over the capacities below C_max picks the cheapest
    partition. When every capacity is offered the same groups, a capacity that is not itself a
    remainder is beaten by the largest remainder below it (same pieces, same groups, fewer
    slot-tokens), so the DP runs over the distinct remainders only. A tier's cost depends only on
    its own interval and group, so each interval takes its cheapest group independently. Ties go
    to the smaller largest capacity, then to fewer tiers, then to smaller groups.
    """
    if not isinstance(max_tiers, int) or max_tiers < 1:
        raise ValueError(f"max_tiers must be a positive int, got {max_tiers!r}")
    steps = _steps(load_samples)
    loads = np.zeros((len(steps), max(step.size for step in steps)), dtype=np.int64)
    for i, step in enumerate(steps):
        loads[i, : step.size] = step
    max_load = int(loads.max(initial=0))
    if max_load < 1:
        raise ValueError("load_samples has no positive load: no capacity to calibrate for")
    options: dict[int, tuple[tuple[int, ...], np.ndarray]] = {}

    def tier_options(capacity: int) -> tuple[tuple[int, ...], np.ndarray]:
        """(groups offered, launch seconds of each) for one capacity."""
        if capacity not in options:
            groups = _group_options(group_for_capacity, capacity)
            options[capacity] = groups, np.array([cost.of(Tier(capacity, g)) for g in groups])
        return options[capacity]

    same_groups = len({tier_options(c)[0] for c in range(1, max_load + 1)}) == 1
    best_total, best_tiers = np.inf, ()
    for c_max in range(1, max_load + 1):
        total, chosen = _best_below(loads, c_max, tier_options, max_tiers - 1, same_groups)
        if total < best_total:
            best_total, best_tiers = total, chosen
    return TierSet(tuple(Tier(c, g) for c, g in best_tiers))


def _cheapest_group(
    pieces: np.ndarray, groups: tuple[int, ...], launch_s: np.ndarray, scratch: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """For each row of `pieces` [R, S] (pieces per step), the least summed cost over steps of
    ceil(pieces / G) launches at launch_s[G] among `groups`, and the group achieving it."""
    best = np.full(pieces.shape[0], np.inf)
    best_group = np.zeros(pieces.shape[0], dtype=np.int64)
    out = scratch[: pieces.shape[0]]
    for g, launch in zip(groups, launch_s):
        np.add(pieces, g - 1, out=out)
        out //= g
        total = out.sum(axis=1, dtype=np.int64) * launch
        better = total < best
        best[better], best_group[better] = total[better], g
    return best, best_group


def _best_below(
    loads: np.ndarray,
    c_max: int,
    tier_options: Callable[[int], tuple[tuple[int, ...], np.ndarray]],
    max_lower: int,
    remainders_only: bool,
) -> tuple[float, tuple[tuple[int, int], ...]]:
    """Least mean cost per step with `c_max` as the largest capacity and at most `max_lower`
    smaller tiers, drawn from the remainders seen or from every capacity below `c_max`;
    returns (cost, chosen (capacity, group) pairs ascending)."""
    active = loads > 0
    full = np.where(active, (loads - 1) // c_max, 0)
    remainder = np.where(active, loads - full * c_max, 0)
    if remainders_only:
        lower = np.unique(remainder[active & (remainder < c_max)])  # [D] candidates below c_max
    else:
        lower = np.arange(1, c_max, dtype=np.int64)
    top = lower.size
    n_steps = loads.shape[0]
    # counts[j, s] = remainders of step s that are <= lower[j - 1]; row 0 is "below every tier".
    # Keys s * (C_max + 1) + remainder sort by step, then remainder.
    row = np.arange(n_steps)[:, None] * (c_max + 1)
    keys = np.sort((row + remainder)[active])
    counts = np.zeros((top + 1, n_steps), dtype=np.int64)
    counts[1:] = (
        np.searchsorted(keys, row + lower[None, :], side="right")
        - np.searchsorted(keys, row, side="right")
    ).T
    pieces = full.sum(axis=1) + active.sum(axis=1)

    # The loops are the O(S * D^2 * groups) core, so they work in place on int32 rows
    # (counts <= experts * pieces per expert).
    counts32 = counts.astype(np.int32)
    scratch = np.empty_like(counts32)
    top_pieces = (pieces[None, :] - counts).astype(np.int32)
    # top_cost[j]: the largest tier taking every piece above lower[j - 1] (j = 0: all of them)
    top_cost, top_group = _cheapest_group(top_pieces, *tier_options(c_max), scratch)
    # interval[b, a] = cost of tier b taking remainders in (lower[a], lower[b]], a < b;
    # first[b] = cost of tier b taking every remainder <= lower[b].
    interval = np.full((top, top), np.inf)
    interval_group = np.zeros((top, top), dtype=np.int64)
    first = np.empty(top)
    first_group = np.zeros(top, dtype=np.int64)
    diff = np.empty_like(counts32)
    for b in range(top):
        pieces_in = diff[: b + 1]
        np.subtract(counts32[b + 1], counts32[: b + 1], out=pieces_in)
        segment, segment_group = _cheapest_group(pieces_in, *tier_options(int(lower[b])), scratch)
        first[b], interval[b, :b] = segment[0], segment[1:]
        first_group[b], interval_group[b, :b] = segment_group[0], segment_group[1:]

    best_total = float(top_cost[0])
    best_tiers: tuple[tuple[int, int], ...] = ((c_max, int(top_group[0])),)
    cheapest = first  # cheapest[b]: t tiers covering remainders <= lower[b], largest b
    parents: list[np.ndarray] = []
    for _ in range(min(max_lower, top)):
        totals = cheapest + top_cost[1:]
        b = int(np.argmin(totals))
        if totals[b] < best_total:
            chain = [b]  # lower tiers, largest first
            for parent in reversed(parents):
                chain.append(int(parent[chain[-1]]))
            chain.reverse()
            tiers = [(int(lower[chain[0]]), int(first_group[chain[0]]))]
            for below, here in zip(chain, chain[1:]):
                tiers.append((int(lower[here]), int(interval_group[here, below])))
            tiers.append((c_max, int(top_group[b + 1])))
            best_total, best_tiers = float(totals[b]), tuple(tiers)
        options = cheapest[None, :] + interval
        parents.append(np.argmin(options, axis=1))
        cheapest = options[np.arange(top), parents[-1]]
    return best_total / n_steps, best_tiers


def assign_groups(
    load_samples: Sequence[np.ndarray],
    capacities: Sequence[int],
    cost: LaunchCost,
    group_for_capacity: GroupOptions,
) -> TierSet:
    """Tiers of the given `capacities`, each with its cheapest group on `load_samples`.

    Exact for fixed capacities: the capacities alone decide which pieces each tier carries, and a
    tier's cost depends only on its pieces and its group. Lets baselines (one tier, powers of two)
    compete on the same footing as `choose_tiers`.
    """
    steps = _steps(load_samples)
    unit = TierSet(tuple(Tier(int(c), 1) for c in capacities))
    # with G = 1 every piece is one launch, so launches per tier count the pieces per tier
    pieces = np.zeros((len(unit), len(steps)), dtype=np.int64)
    for s, step in enumerate(steps):
        for launch in plan_launches(step, unit):
            pieces[launch.tier_index, s] += 1
    tiers = []
    for index, tier in enumerate(unit):
        options = _group_options(group_for_capacity, tier.capacity)
        launch_s = np.array([cost.of(Tier(tier.capacity, g)) for g in options])
        row = pieces[index : index + 1]
        _, group = _cheapest_group(row, options, launch_s, np.empty_like(row))
        tiers.append(Tier(tier.capacity, int(group[0])))
    return TierSet(tuple(tiers))


def power_of_two_tiers(max_load: int, n: int, group_for_capacity: Callable[[int], int]) -> TierSet:
    """Baseline: up to `n` power-of-two capacities, the largest the first power of two >= max_load
    (so nothing overflows), halving down to 1 at most."""
    if max_load < 1 or n < 1:
        raise ValueError(f"power_of_two_tiers needs max_load >= 1 and n >= 1, got {max_load}, {n}")
    top = 1 << (max_load - 1).bit_length()
    capacities = sorted({top >> i for i in range(n) if top >> i >= 1})
    return TierSet(tuple(Tier(c, group_for_capacity(c)) for c in capacities))


def spread_power_of_two_tiers(max_load: int, n: int) -> tuple[int, ...]:
    """Baseline capacities: `n` powers of two from 1 to the first power of two >= max_load, their
    exponents evenly spread (1, 8, 64 for n = 3 and max_load 64), so decode's loads of 1 get a
    tier of their own, as a hand-written tier set would."""
    if max_load < 1 or n < 1:
        raise ValueError(f"spread_power_of_two_tiers needs max_load >= 1 and n >= 1, got {max_load}, {n}")
    top = (max_load - 1).bit_length()
    if n == 1:
        return (1 << top,)
    return tuple(sorted({1 << round(i * top / (n - 1)) for i in range(n)}))


def single_tier(max_load: int, group: int) -> TierSet:
    """Baseline: one tier holding the largest load, as a single static graph would."""
    return TierSet((Tier(max_load, group),))


def group_options(top_k: int) -> tuple[int, ...]:
    """Default groups a calibrated tier may take: powers of two up to 2K, and K itself (a decode
    step puts one token on each of K experts: one launch of K slots of capacity 1)."""
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    return tuple(sorted({1 << i for i in range((2 * top_k).bit_length())} | {top_k}))


@dataclass(frozen=True)
class Candidate:
    name: str
    tiers: TierSet
    report: TierReport


def compare_tiers(
    load_samples: Sequence[np.ndarray],
    cost: LaunchCost,
    max_tiers: int,
    group_for_capacity: GroupOptions,
    fixed: dict[str, TierSet] | None = None,
) -> list[Candidate]:
    """Calibrated tiers against baselines, scored on the same loads and cost: "calibrated"
    (`choose_tiers`), "single" (one tier holding the largest load seen: what one static graph
    would need), "power-of-two" (`max_tiers` capacities halving down from the first power of two
    >= the largest load: `power_of_two_tiers`) and "pow2-spread" (`spread_power_of_two_tiers`).
    Each of these gets its cheapest groups among the same options, so they differ in capacities
    only. `fixed` adds tier sets scored as given (e.g. a `conf/tiers/` option)."""
    steps = _steps(load_samples)
    max_load = max(int(step.max(initial=0)) for step in steps)
    if max_load < 1:
        raise ValueError("load_samples has no positive load: nothing to compare tiers on")
    sets = {
        "calibrated": choose_tiers(steps, cost, max_tiers, group_for_capacity),
        "single": assign_groups(steps, [max_load], cost, group_for_capacity),
        "power-of-two": assign_groups(
            steps, power_of_two_tiers(max_load, max_tiers, lambda c: 1).capacities, cost,
            group_for_capacity,
        ),
        "pow2-spread": assign_groups(
            steps, spread_power_of_two_tiers(max_load, max_tiers), cost, group_for_capacity
        ),
        **(fixed or {}),
    }
    return [Candidate(name, tiers, report(steps, tiers, cost)) for name, tiers in sets.items()]


def format_comparison(candidates: Sequence[Candidate]) -> str:
    """A plain-text table of `compare_tiers` results; launches and cost are per layer step."""
    lines = [f"{'tiers':<13} {'capacity x group':<36} {'padding':>8} {'launches':>9} {'cost us':>9}"]
    for c in candidates:
        shapes = " ".join(f"{t.capacity}x{t.group}" for t in c.tiers)
        lines.append(
            f"{c.name:<13} {shapes:<36} {c.report.padding_fraction:>8.1%} "
            f"{c.report.launches_per_step:>9.2f} {c.report.cost_per_step_s * 1e6:>9.1f}"
        )
    return "\n".join(lines)


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
