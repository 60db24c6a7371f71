"""The CPU/NPU split: which routed experts run on the host, from the host store, instead of in slots.

Legend: n tokens routed to one expert, H hidden, I expert width, C capacity and G group of a tier.

Computing an expert where its weights already are costs the host's (slow) matmuls but no copy;
streaming it costs a block copy plus the device's (fast) matmuls (Fiddler, Kamahori et al. 2024).
Config chooses per layer (`host_layers`) or per expert (`host_experts`); `mode: auto` adds, for an
expert that is not resident, the choice that measured costs say is cheaper: host when
host(n) < copy + device(n), costs measured at start (`measure_costs`). A resident expert always
runs on the device: its copy is already paid.

numpy's OpenBLAS starts one thread per core, and its idle threads spin: on this 2-core machine, next
to MindSpore's own kernel threads, a 1-token host expert took 12 ms with the default threads and
0.8 ms with one, and prefetch (whose guesses are a numpy product) slowed decode ~2x instead of
~1.1x. `limit_blas_threads(1)` sets numpy's BLAS to one thread for the whole process.

Host compute reads the host store's blocks in their storage dtype (fp32, fp16, int8 with scales)
through the same CPU kernel the expert-group graphs call, so an expert's output is the graph's bit
for bit; it is added to its tokens after the layer's launches, in another order than in an
all-device run, so logits match that run to ~1e-6, not bit for bit. Without the kernel
(`FERRY_CPU_KERNELS=0`, no compiler) numpy computes it, widened to FP32, within the same bound.
"""
from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import numpy as np

from artifact.store import decode_block
from kernels.host import host_kernels
from offload.device import DeviceMemory
from offload.policies import Key
from offload.tiers import TierSet, split_load

MODES = ("device", "auto")
# set-threads entry points of the OpenBLAS builds numpy ships or links (numpy >= 2 wheels: the first)
_BLAS_SETTERS = ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
                 "openblas_set_num_threads64_", "openblas_set_num_threads")


def limit_blas_threads(threads: int) -> bool:
    """Set the thread count of the OpenBLAS loaded in this process; False if none was found."""
    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split()[-1] for line in maps if "openblas" in line.lower()})
    except OSError:
        return False
    done = False
    for path in paths:
        library = ctypes.CDLL(path)  # already loaded: the same handle, nothing new is mapped
        for name in _BLAS_SETTERS:
            if hasattr(library, name):
                getattr(library, name)(ctypes.c_int(threads))
                done = True
                break
    return done


def host_expert(x: np.ndarray, block: Mapping[str, np.ndarray]) -> np.ndarray:
    """One SwiGLU expert on the host from a block's arrays by part name (`artifact.store`): x [n, H],
    gate_up [2I, H], down [H, I] (fp32, fp16, or int8 with per-row scales) -> [n, H] float32.

    Through the graphs' own CPU kernel where it is built (`kernels.host`: narrow weights widened in
    registers, the graph's numbers bit for bit); else in numpy, narrow weights widened to FP32 first."""
    kernels = host_kernels()
    if kernels is not None:
        return kernels.expert(x, block)
    gate_up, down = decode_block(block)
    both = x @ gate_up.T  # [n, 2I]
    i = down.shape[1]
    gate, up = both[:, :i], both[:, i:]
    with np.errstate(over="ignore"):  # exp(-gate) overflows to inf for very negative gates: silu -> -0
        hidden = gate / (np.float32(1.0) + np.exp(-gate)) * up  # [n, I]
    return hidden @ down.T  # [n, H]


@dataclass(frozen=True)
class CostModel:
    """Measured seconds: one block copy, host compute a + b * n, and one launch of each tier."""

    copy_s: float
    host_fixed_s: float
    host_token_s: float
    launch_s: tuple[float, ...]  # per tier, whole launch
    tiers: TierSet

    def host(self, n: int) -> float:
        return self.host_fixed_s + self.host_token_s * n

    def device(self, n: int) -> float:
        """An expert's share of the launches its n tokens take (1/G of each launch it is a piece of)."""
        full, rest = split_load(n, self.tiers.max_capacity)
        last = len(self.tiers) - 1
        index = self.tiers.index_for(rest)
        return full * self.launch_s[last] / self.tiers[last].group + self.launch_s[index] / self.tiers[index].group

    def host_cheaper(self, n: int) -> bool:
        return self.host(n) < self.copy_s + self.device(n)

    def describe(self) -> str:
        return (f"copy {1e6 * self.copy_s:.0f} us/block, host {1e6 * self.host_fixed_s:.0f} + "
                f"{1e6 * self.host_token_s:.1f} us/token, device launch "
                + ", ".join(f"{t.capacity}x{t.group} {1e6 * s:.0f} us" for t, s in zip(self.tiers, self.launch_s)))


def _fastest(fn: Callable[[int], object], repeats: int) -> float:
    """Least wall time of `fn(r)` over repeats r = 0..repeats-1, after one warm-up call.

    The least, not the mean: on a shared machine interference only ever adds time."""
    fn(repeats)  # warm-up: compile, fault pages in
    times = []
    for r in range(repeats):
        start = time.perf_counter()
        fn(r)
        times.append(time.perf_counter() - start)
    return min(times)


def measure_costs(store, tiers: TierSet, expert_group: Callable, tokens: int, device: DeviceMemory,
                  repeats: int = 7) -> CostModel:
    """Time a block copy into a slot, host compute at 1 and C_max tokens, and one launch of every tier.

    `store` is the artifact's expert store (`read_into`, `arrays`); `expert_group(tier, tokens)` gives
    the tier's graph for launches of `tokens` tokens (e.g. `GraphSet.expert_group`), timed full; copies
    are made by `device` as a run makes them (its memory model). Every repeat uses other experts of
    layer 0 than the one before, so that, as for a real miss, the weights are not already in the CPU's
    caches; the scratch pool is allocated here and dropped after, and its copies are not counted.
    """
    count = store.num_experts
    group = max(t.group for t in tiers)
    experts = [e % count for e in range(repeats + group + 1)]
    pool = device.expert_pool(store, group)
    pool.counted = False

    def copy(r: int) -> None:
        pool.fill(r % group, 0, experts[r])
        pool.commit()

    for g in range(group):
        copy(g)
    copy_s = _fastest(copy, repeats)
    blocks = [store.arrays(0, e) for e in experts]
    hidden = store.parts[0].shape[1]  # gate_up [2I, H]
    rng = np.random.default_rng(0)
    wide = tiers.max_capacity
    x = rng.standard_normal((wide, hidden)).astype(np.float32)
    one = _fastest(lambda r: host_expert(x[:1], blocks[r]), repeats)
    many = _fastest(lambda r: host_expert(x, blocks[r]), repeats)
    per_token = max(many - one, 0.0) / max(wide - 1, 1)
    launch_s = []
    state = device.tensor(np.zeros((tokens, hidden), np.float32))
    moe_input = device.tensor(rng.standard_normal((tokens, hidden)).astype(np.float32))
    for tier in tiers:
        graph = expert_group(tier, tokens)
        shape = (tier.group, tier.capacity)
        rows = device.tensor((np.arange(tier.slot_tokens) % tokens).astype(np.int32).reshape(shape))
        scale = device.tensor(np.ones(shape, np.float32))
        full = device.tensor(np.full(tier.group, tier.capacity, np.int32))
        slots = device.tensor(np.arange(tier.group, dtype=np.int32))
        launch_s.append(_fastest(lambda r: graph(state, moe_input, rows, scale, full, slots,
                                                 *pool.tensors).asnumpy(), repeats))
    return CostModel(copy_s, max(one - per_token, 0.0), per_token, tuple(launch_s), tiers)


@dataclass(frozen=True)
class Placement:
    """Where each routed expert computes. Empty sets and no cost model: everything on the device."""

    host_layers: frozenset[int] = frozenset()
    host_experts: frozenset[Key] = frozenset()
    costs: CostModel | None = None  # set: `auto` mode

    @property
    def uses_host(self) -> bool:
        return bool(self.host_layers or self.host_experts or self.costs)

    def fixed_on_host(self, layer: int, expert: int) -> bool:
        """Placed on the host by config, whatever the costs: never streamed, never prefetched."""
        return layer in self.host_layers or (layer, expert) in self.host_experts

    def on_host(self, layer: int, expert: int, tokens: int, resident: bool) -> bool:
        if self.fixed_on_host(layer, expert):
            return True
        return self.costs is not None and not resident and self.costs.host_cheaper(tokens)


def placement_from_config(config: Mapping | None, num_layers: int, num_experts: int,
                          measure: Callable[[], CostModel] | None = None) -> Placement:
    """From config: `{mode: device|auto, host_layers: [l, ...], host_experts: [[l, e], ...]}`.

    `measure` is called only in `auto` mode, to time copies and compute on this machine.
    """
    config = dict(config or {})
    unknown = set(config) - {"mode", "host_layers", "host_experts"}
    if unknown:
        raise ValueError(f"placement has unknown keys {sorted(unknown)}; known: mode, host_layers, host_experts")
    mode = config.get("mode", "device")
    if mode not in MODES:
        raise ValueError(f"placement mode '{mode}' is not one of {MODES}")
    layers = frozenset(int(layer) for layer in config.get("host_layers", ()))
    bad = sorted(layer for layer in layers if not 0 <= layer < num_layers)
    if bad:
        raise ValueError(f"placement host_layers {bad} outside 0..{num_layers - 1}")
    experts = frozenset(_key(entry, num_layers, num_experts) for entry in config.get("host_experts", ()))
    costs = None
    if mode == "auto":
        if measure is None:
            raise ValueError("placement mode 'auto' needs costs measured at start; no measure function given")
        costs = measure()
    return Placement(layers, experts, costs)


def _key(entry: Iterable[int], num_layers: int, num_experts: int) -> Key:
    pair = tuple(int(v) for v in entry)
    if len(pair) != 2 or not (0 <= pair[0] < num_layers and 0 <= pair[1] < num_experts):
        raise ValueError(f"placement host_experts entry {list(entry)} is not [layer < {num_layers}, "
                         f"expert < {num_experts}]")
    return pair
