"""Measure the launch cost model of the expert-group graph on this machine and fit it.

    python -m bench.launch_cost [--hidden 2048] [--intermediate 512] [--repeats 7]

Times `graphs.moe.ExpertGroup` (what every routed-expert launch runs) at a grid of (G slots,
C capacity) at real widths, each slot holding a different expert drawn from a pool larger than
the CPU caches so that every launch reads its weights from memory, as a real step does. Then fits
    t(G, C) = launch_s + slot_s * G + slot_token_s * G * C
by non-negative least squares on relative error (times span two orders of magnitude), and prints
the fit, the residual of every point and a `LaunchCost(...)` line to paste into
`app/calibrate.py` (`CPU_COST`).

MindSpore 2.10's CPU MatMul is not linear in C: x [C, 2048] @ w[1024, 2048].T takes 1.8 ms at
C = 15, 6.7 ms at 16, 12 ms at 24 and 2.1 ms at 28 (measured here, 2 cores). The fit leaves that
band out; `--check-capacities` times it afterwards and prints how far off the model is there.
(With Ferry's CPU expert kernel the expert group no longer goes through MatMul and the band is
gone: those points come out 0-37% below the fit.)

Legend: G slots per launch, C tokens per slot, H hidden, I expert intermediate width.
"""
from __future__ import annotations

import argparse
import itertools
import os
import time
from dataclasses import dataclass

import numpy as np

from app.calibrate import LaunchCost
from offload.tiers import Tier


@dataclass(frozen=True)
class Timing:
    group: int
    capacity: int
    median_s: float
    min_s: float


def time_expert_group(group: int, capacity: int, hidden: int, intermediate: int, repeats: int,
                      pool: list[tuple[np.ndarray, np.ndarray]]) -> Timing:
    """Median and minimum seconds of one [G, C, H] expert-group launch, output read back to the
    host as the dispatcher does; successive launches take successive experts from `pool`."""
    import mindspore as ms

    from runtime.graph_set import _expert_group

    cell = _expert_group(group, intermediate)
    x = ms.Tensor.from_numpy(np.random.default_rng(0).standard_normal((group, capacity, hidden), np.float32))
    full = ms.Tensor.from_numpy(np.full(group, capacity, np.int32))
    tensors = [(ms.Tensor.from_numpy(g), ms.Tensor.from_numpy(d)) for g, d in pool]
    times = []
    for launch in range(repeats + 2):  # two warm-ups: compilation, first touch
        slots = [tensors[(launch * group + g) % len(tensors)] for g in range(group)]
        weights = tuple(s[0] for s in slots) + tuple(s[1] for s in slots)
        start = time.perf_counter()
        cell(x, full, *weights).asnumpy()
        if launch >= 2:
            times.append(time.perf_counter() - start)
    return Timing(group, capacity, float(np.median(times)), float(min(times)))


def fit_launch_cost(timings: list[Timing]) -> tuple[LaunchCost, np.ndarray]:
    """Non-negative least squares of relative error: exact for three unknowns by trying every
    subset of them that may be non-zero. Returns the fit and the relative residual per timing."""
    g = np.array([t.group for t in timings], np.float64)
    c = np.array([t.capacity for t in timings], np.float64)
    y = np.array([t.median_s for t in timings], np.float64)
    design = np.stack([np.ones_like(g), g, g * c], axis=1) / y[:, None]  # rows scaled: relative error
    target = np.ones_like(y)
    best, best_error = np.zeros(3), np.inf
    for size in (1, 2, 3):
        for subset in itertools.combinations(range(3), size):
            coef, *_ = np.linalg.lstsq(design[:, subset], target, rcond=None)
            if (coef < 0).any():
                continue
            full = np.zeros(3)
            full[list(subset)] = coef
            error = float(np.sum((design @ full - target) ** 2))
            if error < best_error:
                best, best_error = full, error
    cost = LaunchCost(launch_s=float(best[0]), slot_s=float(best[1]), slot_token_s=float(best[2]))
    return cost, design @ best - target


def expert_pool(size: int, hidden: int, intermediate: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """`size` random experts (gate_up [2I, H], down [H, I], FP32): more bytes than CPU caches hold."""
    rng = np.random.default_rng(0)
    scale = np.float32(hidden ** -0.5)
    return [(rng.standard_normal((2 * intermediate, hidden), np.float32) * scale,
             rng.standard_normal((hidden, intermediate), np.float32) * scale) for _ in range(size)]


def measure(groups=(1, 2, 4, 8), capacities=(1, 4, 16, 64), hidden=2048, intermediate=512,
            repeats=7, pool_size=24) -> list[Timing]:
    from runtime.backend import configure

    configure()
    pool = expert_pool(pool_size, hidden, intermediate)
    return [time_expert_group(g, c, hidden, intermediate, repeats, pool)
            for g in groups for c in capacities]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--groups", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--capacities", type=int, nargs="+", default=[1, 4, 8, 32, 64])
    parser.add_argument("--check-capacities", type=int, nargs="*", default=[16, 24],
                        help="timed and compared with the fit, not fitted (the slow MatMul band)")
    args = parser.parse_args(argv)
    expert_mb = 3 * args.hidden * args.intermediate * 4 / 1e6
    print(f"expert-group launch, H={args.hidden} I={args.intermediate}, FP32 weights "
          f"({expert_mb:.1f} MB per expert), {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.2f} before")
    timings = measure(tuple(args.groups), tuple(args.capacities), args.hidden, args.intermediate, args.repeats)
    cost, residuals = fit_launch_cost(timings)
    print(f"load average {os.getloadavg()[0]:.2f} after\n")
    print(f"{'G':>3} {'C':>4} {'median ms':>10} {'min ms':>8} {'fit ms':>8} {'residual':>9}")
    for t, r in zip(timings, residuals):
        print(f"{t.group:>3} {t.capacity:>4} {t.median_s * 1e3:>10.3f} {t.min_s * 1e3:>8.3f} "
              f"{cost.of(Tier(t.capacity, t.group)) * 1e3:>8.3f} {r:>+9.1%}")
    if args.check_capacities:
        checks = measure(tuple(args.groups), tuple(args.check_capacities), args.hidden, args.intermediate,
                         args.repeats)
        print("not fitted (slow MatMul band):")
        for t in checks:
            predicted = cost.of(Tier(t.capacity, t.group))
            print(f"{t.group:>3} {t.capacity:>4} {t.median_s * 1e3:>10.3f} {t.min_s * 1e3:>8.3f} "
                  f"{predicted * 1e3:>8.3f} {predicted / t.median_s - 1:>+9.1%}")
    rms = float(np.sqrt(np.mean(residuals ** 2)))
    print(f"\nfit: launch_s = {cost.launch_s * 1e6:.1f} us, slot_s = {cost.slot_s * 1e6:.1f} us "
          f"({expert_mb / max(cost.slot_s, 1e-12) / 1e3:.1f} GB/s of expert weights), slot_token_s = "
          f"{cost.slot_token_s * 1e6:.2f} us; rms relative residual {rms:.1%}")
    print(f"LaunchCost(launch_s={cost.launch_s:.3g}, slot_s={cost.slot_s:.3g}, "
          f"slot_token_s={cost.slot_token_s:.3g})")


if __name__ == "__main__":
    main()
