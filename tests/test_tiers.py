"""Capacity tiers: dispatch conserves every token, calibration finds the cheapest tier set."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from app.calibrate import (
    ASCEND_310P3_COST,
    LaunchCost,
    assign_groups,
    choose_tiers,
    expected_cost,
    power_of_two_tiers,
    report,
    single_tier,
    spread_power_of_two_tiers,
    write_tiers_yaml,
)
from offload.tiers import Launch, Piece, Tier, TierSet, from_config, padding, plan_launches


@st.composite
def tier_sets(draw) -> TierSet:
    capacities = sorted(draw(st.sets(st.integers(1, 20), min_size=1, max_size=4)))
    return TierSet(tuple(Tier(c, draw(st.integers(1, 5))) for c in capacities))


@settings(max_examples=300, deadline=None)
@given(
    loads=st.dictionaries(st.integers(0, 40), st.integers(0, 70), max_size=12),
    tiers=tier_sets(),
)
def test_plan_launches_covers_every_token_once(loads: dict[int, int], tiers: TierSet) -> None:
    launches = plan_launches(loads, tiers)
    c_max = tiers.max_capacity
    by_expert: dict[int, list[Piece]] = {}
    per_tier: dict[int, list[Piece]] = {}
    for launch in launches:
        tier = tiers[launch.tier_index]
        assert 1 <= len(launch.pieces) <= tier.group
        for piece in launch.pieces:
            assert 1 <= piece.count <= tier.capacity
            assert launch.tier_index == tiers.index_for(piece.count)  # smallest fitting tier
            by_expert.setdefault(piece.expert, []).append(piece)
            per_tier.setdefault(launch.tier_index, []).append(piece)

    assert set(by_expert) == {e for e, n in loads.items() if n > 0}
    for expert, pieces in by_expert.items():
        pieces.sort(key=lambda p: p.start)
        assert pieces[0].start == 0
        for a, b in zip(pieces, pieces[1:]):
            assert a.start + a.count == b.start  # contiguous, no overlap
            assert a.count == c_max  # only the last piece may be a partial one
        assert pieces[-1].start + pieces[-1].count == loads[expert]
        assert len(pieces) == math.ceil(loads[expert] / c_max)

    for index, pieces in per_tier.items():
        assert pieces == sorted(pieces, key=lambda p: (p.expert, p.start))
        tier_launches = [launch for launch in launches if launch.tier_index == index]
        assert len(tier_launches) == math.ceil(len(pieces) / tiers[index].group)
        assert all(len(launch.pieces) == tiers[index].group for launch in tier_launches[:-1])
    order = [launch.tier_index for launch in launches]
    assert order == sorted(order)

    total = sum(loads.values())
    slot_tokens = sum(tiers[launch.tier_index].slot_tokens for launch in launches)
    assert padding(launches, tiers) == slot_tokens - total


def test_plan_launches_example_with_overflow() -> None:
    tiers = TierSet((Tier(2, 2), Tier(8, 1)))
    launches = plan_launches(np.array([1, 0, 3, 10]), tiers)
    assert launches == [
        Launch(0, (Piece(0, 0, 1), Piece(3, 8, 2))),
        Launch(1, (Piece(2, 0, 3),)),
        Launch(1, (Piece(3, 0, 8),)),
    ]
    assert padding(launches, tiers) == 1 + 5 + 0
    assert plan_launches({3: 10, 0: 1, 2: 3, 7: 0}, tiers) == launches


def test_plan_launches_rejects_bad_loads() -> None:
    tiers = TierSet((Tier(4, 2),))
    with pytest.raises(ValueError, match="expert 1 has negative load -2"):
        plan_launches(np.array([3, -2]), tiers)
    with pytest.raises(TypeError, match="integer dtype"):
        plan_launches(np.array([1.5]), tiers)
    with pytest.raises(ValueError, match="1-D"):
        plan_launches(np.zeros((2, 2), dtype=int), tiers)


@pytest.mark.parametrize(
    "tiers, message",
    [
        ((), "at least one tier"),
        ((Tier(4, 1), Tier(2, 1)), "sorted ascending: entry 1 has capacity 2 after 4"),
        ((Tier(4, 1), Tier(4, 2)), "duplicate capacity 4"),
    ],
)
def test_tierset_validation(tiers: tuple[Tier, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TierSet(tiers)


@pytest.mark.parametrize(
    "capacity, group, name", [(0, 1, "capacity"), (4, -1, "group"), (2.0, 1, "capacity")]
)
def test_tier_rejects_non_positive_or_non_int(capacity, group, name: str) -> None:
    with pytest.raises(ValueError, match=f"Tier {name} must be a positive integer"):
        Tier(capacity, group)


def test_from_config() -> None:
    expected = TierSet((Tier(1, 8), Tier(16, 4)))
    assert from_config([{"capacity": 1, "group": 8}, {"capacity": 16, "group": 4}]) == expected
    assert from_config([1, {"capacity": 16, "group": 4}], default_group=8) == expected
    with pytest.raises(ValueError, match="entry 1 .*no group"):
        from_config([{"capacity": 1, "group": 8}, 16])
    with pytest.raises(ValueError, match=r"entry 0 has unknown keys \['capcity'\]"):
        from_config([{"capcity": 1, "group": 8}])
    with pytest.raises(ValueError, match="sorted ascending"):
        from_config([16, 1], default_group=2)


def _brute_force(samples: list[np.ndarray], cost: LaunchCost, max_tiers: int, group) -> float:
    """Cheapest expected cost over every set of capacities from 1 to the largest load and every
    assignment of the offered groups to its tiers."""
    candidates = range(1, max(int(step.max()) for step in samples) + 1)

    def options(c: int) -> tuple[int, ...]:
        value = group(c)
        return (value,) if isinstance(value, int) else tuple(value)

    return min(
        expected_cost(samples, TierSet(tuple(Tier(c, g) for c, g in zip(subset, gs))), cost)
        for k in range(1, max_tiers + 1)
        for subset in itertools.combinations(candidates, k)
        for gs in itertools.product(*(options(c) for c in subset))
    )


def _random_cost(rng: np.random.Generator) -> LaunchCost:
    slot_s = float(rng.uniform(0, 2)) if rng.random() < 0.7 else 0.0
    return LaunchCost(
        launch_s=float(rng.uniform(0, 5)), slot_s=slot_s, slot_token_s=float(rng.uniform(0, 1))
    )


def test_choose_tiers_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    overflow_optima = 0
    for _ in range(200):
        n_steps, n_experts = rng.integers(1, 5), rng.integers(1, 7)
        samples = [rng.integers(0, rng.integers(2, 16), size=n_experts) for _ in range(n_steps)]
        if not any(step.any() for step in samples):
            samples[0][0] = 1
        cost = _random_cost(rng)
        group_table = {c: int(rng.integers(1, 5)) for c in range(1, 31)}
        max_tiers = int(rng.integers(1, 4))
        chosen = choose_tiers(samples, cost, max_tiers, group_table.__getitem__)
        assert len(chosen) <= max_tiers
        assert all(t.group == group_table[t.capacity] for t in chosen)
        best = _brute_force(samples, cost, max_tiers, group_table.__getitem__)
        assert expected_cost(samples, chosen, cost) == pytest.approx(best, rel=1e-12, abs=1e-12)
        overflow_optima += chosen.max_capacity < max(int(step.max()) for step in samples)
    assert overflow_optima >= 20  # the overflow branch is exercised, not just the nominal one


def test_choose_tiers_picks_groups_exactly() -> None:
    rng = np.random.default_rng(1)
    group_choices = 0
    for _ in range(120):
        n_steps, n_experts = rng.integers(1, 4), rng.integers(1, 7)
        samples = [rng.integers(0, rng.integers(2, 10), size=n_experts) for _ in range(n_steps)]
        if not any(step.any() for step in samples):
            samples[0][0] = 1
        cost = _random_cost(rng)
        offered = {
            c: tuple(sorted({int(g) for g in rng.integers(1, 6, size=rng.integers(1, 4))}))
            for c in range(1, 16)
        }
        max_tiers = int(rng.integers(1, 4))
        chosen = choose_tiers(samples, cost, max_tiers, offered.__getitem__)
        assert all(t.group in offered[t.capacity] for t in chosen)
        best = _brute_force(samples, cost, max_tiers, offered.__getitem__)
        assert expected_cost(samples, chosen, cost) == pytest.approx(best, rel=1e-12, abs=1e-12)
        group_choices += any(len(offered[t.capacity]) > 1 for t in chosen)
    assert group_choices >= 40


def test_choose_tiers_with_the_same_groups_everywhere_matches_brute_force() -> None:
    # The case where the DP runs over the remainders seen only (every capacity, same groups).
    rng = np.random.default_rng(3)
    for _ in range(120):
        n_steps, n_experts = rng.integers(1, 4), rng.integers(1, 7)
        samples = [rng.integers(0, rng.integers(2, 12), size=n_experts) for _ in range(n_steps)]
        if not any(step.any() for step in samples):
            samples[0][0] = 1
        cost = _random_cost(rng)
        offered = tuple(sorted({int(g) for g in rng.integers(1, 6, size=rng.integers(1, 3))}))
        max_tiers = int(rng.integers(1, 4))
        chosen = choose_tiers(samples, cost, max_tiers, lambda c: offered)
        best = _brute_force(samples, cost, max_tiers, lambda c: offered)
        assert expected_cost(samples, chosen, cost) == pytest.approx(best, rel=1e-12, abs=1e-12)


def test_slot_cost_stops_splitting_from_looking_free() -> None:
    # A decode step (eight experts of one token) and a prefill step (loads 3 and 5). Without a
    # slot cost, cutting the prefill loads into one-token pieces for the decode tier pads nothing
    # and wins; once every slot reads an expert's weights, those eight slots cost more than
    # launches of their own.
    samples = [np.ones(8, dtype=int), np.array([3, 5])]
    free = LaunchCost(launch_s=0.5, slot_s=0.0, slot_token_s=1.0)
    dear = LaunchCost(launch_s=0.5, slot_s=10.0, slot_token_s=1.0)
    by_group = lambda c: (1, 2, 8)  # noqa: E731
    assert choose_tiers(samples, free, 3, by_group) == TierSet((Tier(1, 8),))
    assert expected_cost(samples, TierSet((Tier(1, 8),)), free) == 8.5
    split = TierSet((Tier(1, 8), Tier(3, 1), Tier(5, 1)))
    assert choose_tiers(samples, dear, 3, by_group) == split
    assert expected_cost(samples, split, dear) == (88.5 + 13.5 + 15.5) / 2


def test_assign_groups_is_exact_for_fixed_capacities() -> None:
    rng = np.random.default_rng(2)
    for _ in range(60):
        samples = [rng.integers(0, 20, size=6) for _ in range(int(rng.integers(1, 4)))]
        samples[0][0] = max(samples[0][0], 1)
        cost = _random_cost(rng)
        capacities = sorted({int(c) for c in rng.integers(1, 20, size=rng.integers(1, 4))})
        options = (1, 2, 3, 5)
        got = assign_groups(samples, capacities, cost, lambda c: options)
        assert got.capacities == tuple(capacities)
        best = min(
            expected_cost(samples, TierSet(tuple(Tier(c, g) for c, g in zip(capacities, gs))), cost)
            for gs in itertools.product(options, repeat=len(capacities))
        )
        assert expected_cost(samples, got, cost) == pytest.approx(best, rel=1e-12, abs=1e-12)


def test_choose_tiers_considers_capacities_no_load_had() -> None:
    # Only slot-tokens cost: cutting every load into one-token pieces pads nothing, though no
    # expert ever had a load of 1 (that splitting is free here is what slot_s corrects).
    samples = [np.array([4, 4, 4, 4, 40])]
    cost = LaunchCost(launch_s=0.0, slot_s=0.0, slot_token_s=1.0)
    chosen = choose_tiers(samples, cost, max_tiers=2, group_for_capacity=lambda c: 4)
    assert chosen == TierSet((Tier(1, 4),))  # 56 pieces in 14 full launches
    assert expected_cost(samples, chosen, cost) == 56.0
    assert expected_cost(samples, TierSet((Tier(4, 4),)), cost) == 64.0


def test_choose_tiers_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="no positive load"):
        choose_tiers([np.zeros(4, dtype=int)], ASCEND_310P3_COST, 2, lambda c: 1)
    with pytest.raises(ValueError, match="empty"):
        choose_tiers([], ASCEND_310P3_COST, 2, lambda c: 1)
    with pytest.raises(ValueError, match="max_tiers"):
        choose_tiers([np.ones(4, dtype=int)], ASCEND_310P3_COST, 0, lambda c: 1)
    with pytest.raises(ValueError, match=r"group_for_capacity\(1\) must give a positive int"):
        choose_tiers([np.ones(4, dtype=int)], ASCEND_310P3_COST, 2, lambda c: ())
    with pytest.raises(ValueError, match="step 1 has a negative load at expert 2"):
        choose_tiers(
            [np.ones(4, dtype=int), np.array([1, 1, -1])], ASCEND_310P3_COST, 2, lambda c: 1
        )


def test_report_by_hand() -> None:
    tiers = TierSet((Tier(2, 2), Tier(8, 1)))
    samples = [np.array([1, 0, 3, 10]), np.zeros(4, dtype=int)]
    # Step 0: tier 0 carries pieces of 1 and 2 in one launch (4 slot-tokens, 1 padded); tier 1
    # carries 3 and 8 in two launches (16 slot-tokens, 5 padded). Step 1 launches nothing.
    got = report(samples, tiers, LaunchCost(launch_s=1.0, slot_s=0.1, slot_token_s=0.01))
    assert got.padding_fraction == 6 / 20
    assert got.launches_per_step == 1.5
    # 3 launches, 2 + 1 + 1 slots, 20 slot-tokens, over 2 steps
    assert got.cost_per_step_s == pytest.approx((3 * 1.0 + 4 * 0.1 + 20 * 0.01) / 2)


def test_ascend_cost_from_specs() -> None:
    assert ASCEND_310P3_COST.launch_s == 10e-6
    assert ASCEND_310P3_COST.slot_s == pytest.approx(30.7e-6, rel=1e-2)  # 6.29 MB at 204.8 GB/s
    assert ASCEND_310P3_COST.slot_token_s == pytest.approx(0.0899e-6, rel=1e-2)  # 6.29 MFLOP at 70 T
    assert ASCEND_310P3_COST.of(Tier(16, 4)) == pytest.approx(
        10e-6 + 4 * 30.7e-6 + 64 * 0.0899e-6, rel=1e-2
    )
    with pytest.raises(ValueError, match="launch_s must be >= 0"):
        LaunchCost(launch_s=-1.0, slot_s=0.0, slot_token_s=0.0)
    with pytest.raises(ValueError, match="slot_s must be >= 0"):
        LaunchCost(launch_s=0.0, slot_s=float("nan"), slot_token_s=0.0)
    with pytest.raises(TypeError):
        LaunchCost(1.0, 0.0, 0.0)  # keyword-only: three floats in a row are too easy to swap


def test_baselines() -> None:
    assert power_of_two_tiers(40, 3, lambda c: 64 // c).capacities == (16, 32, 64)
    assert power_of_two_tiers(2, 5, lambda c: 1).capacities == (1, 2)
    assert power_of_two_tiers(1, 2, lambda c: 1).capacities == (1,)
    assert single_tier(40, 2) == TierSet((Tier(40, 2),))
    assert spread_power_of_two_tiers(64, 3) == (1, 8, 64)
    assert spread_power_of_two_tiers(35, 4) == (1, 4, 16, 64)
    assert spread_power_of_two_tiers(35, 1) == (64,)
    assert spread_power_of_two_tiers(2, 5) == (1, 2)


def test_write_tiers_yaml_loads_through_hydra(tmp_path) -> None:
    from hydra import compose, initialize_config_dir

    tiers = TierSet((Tier(1, 8), Tier(16, 4)))
    (tmp_path / "config.yaml").write_text("defaults:\n  - tiers: calibrated\n  - _self_\n")
    comment = "chosen by test\nsecond line"
    path = write_tiers_yaml(tiers, tmp_path / "tiers" / "calibrated.yaml", comment)
    text = path.read_text()
    assert text.startswith("# @package _global_\n# chosen by test\n# second line\n")
    assert from_config(yaml.safe_load(text)["tiers"]) == tiers
    assert [p.name for p in path.parent.iterdir()] == ["calibrated.yaml"]  # no temp file left
    with initialize_config_dir(config_dir=str(tmp_path), version_base=None):
        assert from_config(compose("config").tiers) == tiers
    with pytest.raises(ValueError, match="Hydra header"):
        write_tiers_yaml(tiers, path, "@package foo")
