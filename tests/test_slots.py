"""Slot pool bookkeeping, eviction policies and routing traces (pure Python, no MindSpore)."""
from __future__ import annotations

from functools import lru_cache
from itertools import combinations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from offload.policies import LFU, LRU, POLICIES, Belady, DecayedFrequency, make_policy
from offload.slots import SlotPool
from offload.trace import RoutingTrace, TraceError, simulate

A, B, C, D = (0, 0), (0, 1), (0, 2), (1, 0)


class Device:
    """Stands in for the device slots: remembers which key was last copied into each."""

    def __init__(self, num_slots: int) -> None:
        self.content: list = [None] * num_slots
        self.copies = 0

    def load(self, key, slot) -> None:
        self.content[slot] = key
        self.copies += 1


def make_pool(num_slots, policy):
    device = Device(num_slots)
    return SlotPool(num_slots, policy, device.load), device


# --- property test: every policy keeps the bookkeeping straight ------------------------------------

@st.composite
def workloads(draw):
    """A pool size and a list of ('acquire', keys) / ('prefetch', key) operations."""
    num_slots = draw(st.integers(1, 4))
    keys = st.tuples(st.integers(0, 2), st.integers(0, 3))
    launch = st.lists(keys, min_size=1, max_size=num_slots, unique=True)
    op = st.one_of(st.tuples(st.just("acquire"), launch), st.tuples(st.just("prefetch"), keys))
    return num_slots, draw(st.lists(op, min_size=1, max_size=40))


@pytest.mark.parametrize("name", sorted(POLICIES))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(work=workloads())
def test_pool_invariants_hold_for_every_policy(name, work):
    num_slots, ops = work
    kwargs = {}
    if name == "belady":
        kwargs["trace"] = [key for kind, arg in ops if kind == "acquire" for key in arg]
    elif name == "decay":
        kwargs = {"half_life": 3.0, "hot": [(0, 0), (1, 1)]}
    pool, device = make_pool(num_slots, make_policy(name, **kwargs))
    requested = 0
    for kind, arg in ops:
        if kind == "acquire":
            slots = pool.acquire(arg)
            requested += len(arg)
            assert set(slots) == set(arg)
            for key, slot in slots.items():
                assert pool.resident()[key] == slot
                assert device.content[slot] == key
        else:
            was_resident = arg in pool.resident()
            if pool.prefetch(arg):
                assert not was_resident and device.content[pool.resident()[arg]] == arg
        pool.check_invariants()
    c = pool.counters
    assert c.hits + c.misses == requested == pool.step
    assert c.loads == c.misses + c.prefetches == device.copies
    assert c.prefetch_hits + c.prefetch_wasted <= c.prefetches
    assert c.prefetch_hits <= c.hits


# --- hand-made eviction orders ------------------------------------------------------------------------

def run(policy, launches, num_slots=2):
    pool, _ = make_pool(num_slots, policy)
    for launch in launches:
        pool.acquire(launch)
    return pool


def test_lru_evicts_least_recently_used():
    pool = run(LRU(), [[A], [B], [A], [C]])
    assert set(pool.resident()) == {A, C}
    pool.acquire([D])
    assert set(pool.resident()) == {C, D}
    assert pool.counters.evictions == 2 and pool.counters.hits == 1


def test_lfu_evicts_least_frequent_then_least_recent():
    assert set(run(LFU(), [[A], [A], [B], [C]]).resident()) == {A, C}
    assert set(run(LFU(), [[A], [B], [C]]).resident()) == {B, C}


def test_lfu_count_restarts_on_reload():
    # A (3 uses) is the only candidate when [B, C] arrives; back with a count of 1 it loses to C (2)
    pool = run(LFU(), [[A], [A], [A], [B, C], [C], [A], [D]])
    assert set(pool.resident()) == {C, D}


def test_decay_forgets_old_popularity_with_short_half_life():
    for half_life, victim in ((10.0, A), (1000.0, B)):
        policy = DecayedFrequency(half_life=half_life)
        for step in range(3):
            policy.record_access(A, step)
        policy.record_access(B, 50)
        assert policy.choose_victim([A, B], 100) == victim


def test_decay_hot_set_is_evicted_last():
    policy = DecayedFrequency(half_life=100.0, hot=[A])
    policy.record_access(A, 0)
    for step in range(1, 10):
        policy.record_access(B, step)
    policy.record_access(C, 10)
    assert policy.choose_victim([A, B, C], 11) == C
    assert policy.choose_victim([A, B], 11) == B
    assert policy.choose_victim([A], 11) == A
    assert DecayedFrequency(half_life=100.0, hot=[A, B]).choose_victim([A, B], 0) == A


def test_decay_rejects_bad_half_life():
    with pytest.raises(ValueError, match="half_life"):
        DecayedFrequency(half_life=0)


def test_belady_evicts_farthest_next_use_and_checks_trace():
    launches = [[A], [B], [C], [A], [B], [C]]
    pool = run(Belady([k for launch in launches for k in launch]), launches)
    assert pool.counters.misses == 4  # LRU would miss all 6
    assert run(LRU(), launches).counters.misses == 6
    with pytest.raises(ValueError, match=r"request \(0, 1\) at step 0 .*expected \(0, 0\)"):
        run(Belady([A]), [[B]])


# --- Belady is optimal ------------------------------------------------------------------------------

def optimal_misses(launches, num_slots):
    """Fewest loads of any demand strategy, by exhaustive search over every eviction choice."""

    @lru_cache(maxsize=None)
    def best(i, resident):
        if i == len(launches):
            return 0
        launch = frozenset(launches[i])
        missing = len(launch - resident)
        evictable = sorted(resident - launch)
        need = max(0, len(resident) + missing - num_slots)
        return missing + min(
            best(i + 1, (resident - frozenset(out)) | launch)
            for r in range(need, len(evictable) + 1)
            for out in combinations(evictable, r)
        )

    return best(0, frozenset())


def belady_misses(launches, num_slots):
    return run(Belady([k for launch in launches for k in launch]), launches, num_slots).counters.misses


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_belady_matches_brute_force_optimum(data):
    num_slots = data.draw(st.integers(1, 3))
    keys = st.tuples(st.just(0), st.integers(0, 4))
    launches = data.draw(st.lists(st.lists(keys, min_size=1, max_size=num_slots, unique=True), max_size=8))
    assert belady_misses(launches, num_slots) == optimal_misses(launches, num_slots)


def random_trace(rng, steps=30, layers=3, experts=12, top_k=3):
    """Zipf-like expert popularity per layer, so caching matters and policies differ."""
    weights = 1.0 / np.arange(1, experts + 1) ** 1.1
    tokens = np.zeros((steps, layers, experts), dtype=np.int32)
    for layer in range(layers):
        p = rng.permutation(weights) / weights.sum()
        for step in range(steps):
            tokens[step, layer, rng.choice(experts, size=top_k, replace=False, p=p)] = 1
    return RoutingTrace(tokens)


def test_belady_never_misses_more_than_online_policies():
    rng = np.random.default_rng(0)
    for _ in range(20):
        trace = random_trace(rng)
        num_slots = int(rng.integers(3, 20))
        optimum = simulate(trace, "belady", num_slots).misses
        for name in ("lru", "lfu", "decay"):
            assert optimum <= simulate(trace, name, num_slots).misses, (name, num_slots)


# --- errors ----------------------------------------------------------------------------------------

def test_oversize_launch_is_refused():
    pool, _ = make_pool(2, LRU())
    with pytest.raises(ValueError, match="launch needs 3 slots, pool has 2"):
        pool.acquire([A, B, C, A])
    assert pool.acquire([A, B, A]) == {A: 0, B: 1}  # duplicates count once


def test_prefetch_never_evicts_the_launch_in_progress():
    pool, _ = make_pool(2, LFU())
    pool.acquire([A, B])
    assert not pool.prefetch(C)  # both slots pinned
    pool.acquire([A])
    assert pool.prefetch(C) and set(pool.resident()) == {A, C}
    assert not pool.prefetch(A)  # resident already
    assert not pool.prefetch(D)  # only A (pinned) and C (unused prefetch) are left
    pool.acquire([D])  # C has count 0 against A's 2
    assert pool.counters.prefetch_wasted == 1 and set(pool.resident()) == {A, D}
    pool.acquire([D])
    assert pool.prefetch(C)
    pool.acquire([C])
    assert (pool.counters.prefetches, pool.counters.prefetch_hits) == (2, 1)


def test_make_policy_names_valid_policies():
    with pytest.raises(ValueError, match="unknown eviction policy 'fifo'; valid names: belady, decay, lfu, lru"):
        make_policy("fifo")
    with pytest.raises(TypeError, match="eviction policy 'belady'"):
        make_policy("belady")


def test_failed_load_leaves_pool_consistent():
    def load(key, slot):
        if key == C:
            raise OSError("copy failed")

    pool = SlotPool(2, LRU(), load)
    pool.acquire([A, B])
    with pytest.raises(OSError):
        pool.acquire([C])
    pool.check_invariants()
    assert set(pool.resident()) == {B}
    assert pool.acquire([D]) == {D: 0}


# --- traces ----------------------------------------------------------------------------------------

def test_trace_requests_and_round_trip(tmp_path):
    topk = [np.array([[[2, 0], [2, 1]], [[3, 1], [3, 1]]]), np.array([[[1, 0]], [[0, 2]]])]
    trace = RoutingTrace.from_topk(topk, num_experts=4)
    assert trace.tokens[0, 0].tolist() == [1, 1, 2, 0]
    assert trace.requests() == [(0, 0), (0, 1), (0, 2), (1, 1), (1, 3), (0, 0), (0, 1), (1, 0), (1, 2)]
    path = tmp_path / "trace.npz"
    trace.save(path)
    loaded = RoutingTrace.load(path)
    np.testing.assert_array_equal(loaded.tokens, trace.tokens)
    assert loaded.requests() == trace.requests()
    counters = simulate(loaded, "lru", 4)
    assert counters.misses == counters.loads and counters.requests == len(trace.requests())


def test_simulate_prefetches_the_recorded_guesses(tmp_path):
    """Layer 1 asks for new experts every step; guesses naming them turn its misses into prefetches,
    wrong guesses cost copies and save nothing, and the guesses survive a save and load."""
    steps, experts = 6, 16
    tokens = np.zeros((steps, 2, experts), np.int32)
    tokens[:, 0, 0] = 1  # layer 0: always expert 0
    for step in range(steps):
        tokens[step, 1, [2 * step, 2 * step + 1]] = 1
    right = np.full((steps, 2, 2), -1, np.int32)
    right[:, 1] = np.stack([np.flatnonzero(tokens[s, 1]) for s in range(steps)])
    wrong = np.where(right >= 0, 12 + np.arange(2), -1)  # experts 12 and 13: never asked for
    plain = simulate(RoutingTrace(tokens), "lru", 8)
    assert plain.misses == 1 + 2 * steps and plain.prefetches == 0
    guessed = RoutingTrace(tokens, guesses=right)
    path = tmp_path / "guessed.npz"
    guessed.save(path)
    loaded = RoutingTrace.load(path)
    np.testing.assert_array_equal(loaded.guesses, right)
    fetched = simulate(loaded, "lru", 8, prefetch=2)
    assert fetched.misses == 1 and fetched.prefetches == 2 * steps and fetched.prefetch_hits == 2 * steps
    missed = simulate(RoutingTrace(tokens, guesses=wrong), "lru", 8, prefetch=2)
    assert missed.misses == plain.misses and missed.prefetches >= 2 and missed.prefetch_hits == 0
    assert simulate(guessed, "lru", 8, prefetch=1).misses == 1 + steps  # one guess per layer: half the misses
    with pytest.raises(TraceError, match="guesses"):
        simulate(RoutingTrace(tokens), "lru", 8, prefetch=2)
    with pytest.raises(TraceError, match="field 'guesses' must be integer"):
        RoutingTrace(tokens, guesses=right[:, :1])
    with pytest.raises(TraceError, match="outside \\[-1, 16\\)"):
        RoutingTrace(tokens, guesses=right + 20)
    with pytest.raises(TraceError, match="no decode flags"):
        guessed.decode_steps()


def test_trace_load_errors_name_file_and_field(tmp_path):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(TraceError, match=r"garbage\.npz: not a readable \.npz"):
        RoutingTrace.load(garbage)
    flat = tmp_path / "flat.npz"
    np.savez(flat, tokens=np.zeros((3, 4), np.int32), format_version=np.int32(1))
    with pytest.raises(TraceError, match=r"flat\.npz: field 'tokens' must be \[steps, layers, experts\]"):
        RoutingTrace.load(flat)
    missing = tmp_path / "missing.npz"
    np.savez(missing, tokens=np.zeros((1, 1, 1), np.int32))
    with pytest.raises(TraceError, match=r"missing\.npz: missing field 'format_version'"):
        RoutingTrace.load(missing)
    objects = tmp_path / "objects.npz"
    np.savez(objects, tokens=np.array([None, 1], dtype=object), format_version=np.int32(1))
    with pytest.raises(TraceError, match=r"objects\.npz: not a readable"):
        RoutingTrace.load(objects)
    with pytest.raises(TraceError, match="no such trace file"):
        RoutingTrace.load(tmp_path / "absent.npz")
