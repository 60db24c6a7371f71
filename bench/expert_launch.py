"""An expert-group launch as one kernel call against MindSpore's operators around the group kernel.

    python -m bench.expert_launch [--steps 40] [--threads 2]

`graphs.moe.ExpertLaunch` on the CPU runs its whole launch in Ferry's launch kernel
(`FerryExpertLaunch*`: gather each slot row's token from the MoE input, the experts, the router-weighted
outputs added to the hidden state), reading its experts from a device expert pool by slot. Its contender
is the same Cell with `use_kernel` off: MindSpore's gathers of the experts and rows, the expert-group
kernel (`FerryExperts*`), a multiply and `tensor_scatter_add`. Both run at real width (H 2048, I 512) in each storage format, at a prefill launch
(1024 tokens, 2 slots of capacity 64 carrying 32 rows each: a 1024-token prompt's typical expert load)
and a decode launch (1 token, 8 slots of 1 row), on device-resident activations, every step's slots
holding other experts from a pool larger than the caches. The two take turns step by step in one
process (their order alternating), so both see the same machine; printed per shape: the medians and
the median of the per-step ratios.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

H, I, POOL = 2048, 512, 32  # hidden, expert intermediate width, experts each format cycles through
SHAPES = ((1024, 2, 64, 32), (1, 8, 1, 1))  # tokens, slots G, capacity C, real rows per slot


class RandomBlocks:
    """POOL random experts in the store's block layout (`artifact.store`), for a device expert pool."""

    def __init__(self, rng, dtype: str):
        import types

        from artifact.store import block_bytes, block_layout

        self.parts = block_layout(types.SimpleNamespace(hidden_size=H, moe_intermediate_size=I), dtype)
        self.block_bytes = block_bytes(self.parts)
        self.num_layers, self.num_experts = 1, POOL
        self.rng = rng

    def read_into(self, layer: int, expert: int, out: np.ndarray) -> None:
        for part in self.parts:
            if part.dtype == "int8":
                values = self.rng.integers(-127, 128, part.shape, dtype=np.int8)
            elif part.name.endswith("scale"):
                values = (self.rng.uniform(0.5, 1.5, part.shape) / 127 * 0.02).astype(np.float32)
            else:
                values = (0.02 * self.rng.standard_normal(part.shape)).astype(part.dtype)
            out[part.offset: part.offset + part.nbytes] = values.view(np.uint8).ravel()


def compare(dtype: str, tokens: int, group: int, capacity: int, real: int, steps: int, rng) -> dict:
    import mindspore as ms
    from graphs.moe import GROUPS, ExpertLaunch
    from offload.device import DeviceMemory

    cls = GROUPS[dtype]
    from artifact.store import part_offsets

    source = RandomBlocks(rng, dtype)
    offsets = part_offsets(source.parts, source.block_bytes)
    fused, operators = ExpertLaunch(cls(group, I), H, offsets), ExpertLaunch(cls(group, I), H, offsets)
    if not fused.use_kernel:
        raise SystemExit("Ferry's CPU kernels are unavailable here (FERRY_CPU_KERNELS=0, or no compiler)")
    operators.use_kernel = False  # MindSpore's gathers and scatter-add around the group kernel
    pool = DeviceMemory().expert_pool(source, POOL)
    for slot in range(POOL):
        pool.fill(slot, 0, slot)
    rows = np.stack([rng.permutation(tokens)[:capacity] if tokens >= capacity else np.zeros(capacity, np.int64)
                     for _ in range(group)]).astype(np.int32)  # [G, C]
    scale = np.full((group, capacity), 0.1, np.float32)
    scale[:, real:] = 0  # padding rows
    counts = np.full(group, real, np.int32)
    zeros = ms.Tensor(np.zeros((tokens, H), np.float32))
    inputs = [ms.Tensor(a) for a in (rows, scale, counts)]
    first = ms.Tensor(np.arange(group, dtype=np.int32))
    # activations as the engine has them: the output of a graph, on the device
    hidden = fused(zeros, zeros, *inputs, first, *pool.tensors)
    seconds = {"kernel": [], "operators": []}
    for step in range(steps + 4):
        slots = ms.Tensor(np.array([(step * group + g) % POOL for g in range(group)], np.int32))
        order = (("kernel", fused), ("operators", operators))
        for name, cell in order if step % 2 else order[::-1]:
            start = time.perf_counter()
            cell(hidden, hidden, *inputs, slots, *pool.tensors).asnumpy()
            if step >= 4:  # the first steps compile and warm up
                seconds[name].append(time.perf_counter() - start)
    kernel, ops_ = np.array(seconds["kernel"]), np.array(seconds["operators"])
    return {"kernel_ms": 1e3 * np.median(kernel), "operators_ms": 1e3 * np.median(ops_),
            "paired": float(np.median(ops_ / kernel))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="timed launches of each contender per shape")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    from runtime.backend import configure

    configure(threads=args.threads)
    rng = np.random.default_rng(0)
    print(f"H {H}, I {I}, {args.threads} threads, {args.steps} steps per shape, contenders alternating")
    print(f"{'experts':>8s} {'launch':>26s} {'kernel ms':>10s} {'operators ms':>13s} {'operators / kernel':>19s}")
    for dtype in ("fp32", "fp16", "int8"):
        for tokens, group, capacity, real in SHAPES:
            result = compare(dtype, tokens, group, capacity, real, args.steps, rng)
            shape = f"T={tokens} G={group} C={capacity} rows {real}"
            print(f"{dtype:>8s} {shape:>26s} {result['kernel_ms']:10.2f} {result['operators_ms']:13.2f} "
                  f"{result['paired']:18.2f}x", flush=True)


if __name__ == "__main__":
    main()
