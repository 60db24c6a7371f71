"""Offload bench: eviction policies against Belady's optimum, and stall with and without prefetch.

    python bench/offload.py                  # real layer widths, 2 layers (a few minutes, ~10 GB disk)
    python bench/offload.py --preset small   # a small model (seconds), for a quick look

How the routing trace is produced: a random checkpoint (`model.synthetic`, FP32, seed 0) with
Qwen3.6-35B-A3B's layer widths (hidden 2048, 256 experts of intermediate 512, top-8, one DeltaNet
and one full-attention layer, small vocabulary), converted once to an FP32 artifact, streams through
the offload controller (`runtime.build.engine_from_artifact` with a slot pool): a 32-token
random prompt, then `--decode` tokens sampled at temperature 1 (seed 0). Every decode step's
router top-k per layer is recorded, with the prefetcher's guess for the next layer (the next
router applied to this layer's MoE input). Random weights route less predictably than a trained
model on real text, so absolute hit rates here are a pessimistic stand-in; the ratios between
policies are what the trace is for.

Part 1 replays the decode trace through the slot pool (no copies, no model) for each policy and
budget: bytes streamed per decoded token, as a ratio to Belady's (offline optimal) at that budget,
without and with prefetch. Part 2 runs the real engine on this CPU for each policy at two budgets:
wall time per decoded token and the fraction of it spent stalled (launches waiting for copies),
and LRU with `auto` placement (misses computed on the host when measured costs say so). Blocks
are read from the artifact's `experts.bin` with `pread` (from the page cache after the first run).
On MindSpore's CPU backend the "device" slots are host RAM: a copy and the expert matmuls both
stream DRAM, so overlap gains little here; on a 310P3 the copy is PCIe DMA, beside the compute.
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.routing import RoutingRecorder  # noqa: E402
from artifact.reader import Artifact  # noqa: E402
from convert.cache import cached_artifact  # noqa: E402
from artifact.manifest import TierRecord  # noqa: E402
from convert.pipeline import ConvertOptions  # noqa: E402
from model.spec import ModelSpec  # noqa: E402
from model.synthetic import write_random_checkpoint  # noqa: E402
from offload.placement import limit_blas_threads  # noqa: E402
from offload.prefetch import RouterPredictor  # noqa: E402
from offload.residence import Residence  # noqa: E402
from offload.trace import RoutingTrace, simulate  # noqa: E402
from runtime.backend import configure  # noqa: E402
from runtime.build import engine_from_artifact  # noqa: E402
from app.plan import expert_block_bytes  # noqa: E402
from runtime.sampling import Sampler, Sampling  # noqa: E402

POLICIES = ("lru", "lfu", "decay", "belady")
PROMPT = 32


def spec_for(preset: str, layers: int) -> ModelSpec:
    kinds = tuple("full_attention" if (i + 1) % 2 == 0 else "linear_attention" for i in range(layers))
    common = dict(vocab_size=2048, num_layers=layers, layer_types=kinds, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  rope_theta=1e7, linear_conv_kernel_dim=4, eos_token_ids=())
    if preset == "real":  # Qwen3.6-35B-A3B's widths
        return ModelSpec(hidden_size=2048, num_attention_heads=16, num_key_value_heads=2, head_dim=256, rotary_dim=64,
                         linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128,
                         linear_value_head_dim=128, num_experts=256, num_experts_per_tok=8, moe_intermediate_size=512,
                         shared_expert_intermediate_size=512, **common)
    return ModelSpec(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64, rotary_dim=16,
                     linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=32, linear_value_head_dim=32,
                     num_experts=64, num_experts_per_tok=8, moe_intermediate_size=128,
                     shared_expert_intermediate_size=128, **common)


def decode_tokens(engine, decode: int, seed: int) -> float:
    """Prompt, then `decode` sampled tokens; returns the decode wall time. Counters restart after the prompt."""
    rng = np.random.default_rng(seed)
    sampler = Sampler(Sampling(temperature=1.0, seed=seed))
    engine.reset()
    logits = engine.forward(rng.integers(2, engine.spec.vocab_size, PROMPT))
    engine.dispatcher.stats.reset()
    start = time.perf_counter()
    for _ in range(decode):
        logits = engine.forward([sampler(logits)])
    return time.perf_counter() - start


def record(engine, predictor: RouterPredictor, drive: Callable[[], object], limit: int | None = None) -> RoutingTrace:
    """Call `drive()`, which runs the engine, with `app.routing`'s recorder in the dispatcher's seat;
    return its one-token (decode) steps: each layer's routing and the guesses for it (`limit` each,
    most likely first; default top-k), so replays can prefetch any prefix of them."""
    spec = engine.spec
    recorder = RoutingRecorder(engine.dispatcher, spec.num_layers, spec.num_experts, predictor,
                               limit or spec.num_experts_per_tok)
    engine.dispatcher = recorder
    try:
        drive()
    finally:
        engine.dispatcher = recorder.dispatcher
    trace = recorder.trace()
    return replace(trace, decode=trace.step_tokens == 1).decode_steps()


def replay(trace: RoutingTrace, policy: str, slots: int, prefetch: int) -> tuple[int, int]:
    """(blocks copied, demand misses) replaying the decode trace through a pool of `slots`, prefetching
    the first `prefetch` guesses for the next layer (0: no prefetch)."""
    counters = simulate(trace, policy, slots, prefetch)
    return counters.loads, counters.misses


def recall(trace: RoutingTrace, limit: int) -> float:
    """Share of the experts routed to (layers 1..L-1) that the first `limit` guesses named."""
    routed = trace.tokens[:, 1:] > 0  # [S, L-1, E]
    guessed = np.zeros_like(routed)
    steps, layers, depth = np.nonzero(trace.guesses[:, 1:, :limit] >= 0)
    guessed[steps, layers, trace.guesses[:, 1:, :limit][steps, layers, depth]] = True
    return (routed & guessed).sum() / max(routed.sum(), 1)


def part_one(trace: RoutingTrace, spec: ModelSpec, budgets: list[int], block: int,
             limits: tuple[int, ...] = ()) -> None:
    """Replays at every budget without prefetch and prefetching each of `limits` guesses per layer
    (default: top-k)."""
    tokens = trace.num_steps
    total = spec.num_layers * spec.num_experts
    limits = limits or (spec.num_experts_per_tok,)
    print(f"\n== Part 1: trace replay, {tokens} decode tokens x {spec.num_layers} layers, {total} expert blocks "
          f"of {block / 2**20:.2f} MiB ==")
    print("MB streamed per decoded token (ratio to Belady without prefetch at the same budget; prefetch adds the")
    print("copies of wrong guesses, so its rows stream more bytes and stall less: 'miss' is the demand misses,")
    print("the copies a launch waits for, as a ratio to Belady's)")
    head = f"{'slots':>6} {'GiB':>6} {'prefetch':>8} " + " ".join(f"{p:>22}" for p in POLICIES)
    print(head)
    for slots in budgets:
        base = replay(trace, "belady", slots, 0)[0] or 1
        for prefetch in (0, *limits):
            runs = {p: replay(trace, p, slots, prefetch) for p in POLICIES}
            cells = " ".join(f"{loads * block / tokens / 1e6:8.1f} ({loads / base:4.2f} miss {misses / base:4.2f})"
                             for loads, misses in runs.values())
            print(f"{slots:>6} {slots * block / 2**30:>6.2f} {prefetch or 'off':>8} {cells}")
    for limit in limits:
        print(f"prefetch of {limit} guesses per layer (next router on this layer's input): they name "
              f"{100 * recall(trace, limit):.0f}% of the experts the next layer routes to "
              f"({100 * recall(trace, limit) * spec.num_experts_per_tok / limit:.0f}% of the guesses are used)")


def part_two(artifact: Path, spec: ModelSpec, budgets: list[int], decode: int) -> None:
    print(f"\n== Part 2: real runs on this CPU, {decode} decode tokens after a 4-token warm-up ==")
    print("stalled = time launches waited for expert copies / wall time of the decode steps")
    print(f"{'slots':>6} {'GiB':>6} {'policy':>8} {'prefetch':>8} {'ms/token':>9} {'stalled':>8} {'hit%':>5} "
          f"{'MB/token':>9} {'pf hit':>7} {'pf waste':>8} {'host/token':>10}")
    block = expert_block_bytes(spec, "fp32")
    total_experts = spec.num_layers * spec.num_experts
    requests = None  # the pool's request sequence, the same for every budget and policy: Belady's future
    # every policy without and with prefetch, then LRU with `auto` host compute (the CPU/NPU split)
    variants = [(policy, prefetch, None) for policy in POLICIES for prefetch in (False, True)]
    variants.append(("lru", False, {"mode": "auto"}))
    for slots in budgets:
        for policy, prefetch, placement in variants:
            kwargs = {"policy_kwargs": {"trace": requests}} if policy == "belady" else {}
            residence = Residence(slots, total_experts, policy, prefetch, placement or {})
            engine = engine_from_artifact(artifact, residence, record_requests=requests is None, **kwargs)
            try:
                decode_tokens(engine, 4, seed=1)  # warm-up: compile, fault the slot pages in
                seconds = decode_tokens(engine, decode, seed=0)
            finally:
                engine.close()
            if requests is None:
                requests = engine.dispatcher.weights.requests
            stats = engine.dispatcher.stats
            total = stats.total()
            asked = total.hits + total.misses
            name = policy + ("+auto" if placement else "")
            print(f"{slots:>6} {slots * block / 2**30:>6.2f} {name:>8} {'on' if prefetch else 'off':>8} "
                  f"{1e3 * seconds / decode:>9.1f} {100 * stats.stall_fraction:>7.1f}% "
                  f"{100 * total.hits / max(asked, 1):>5.0f} {total.bytes_streamed / decode / 1e6:>9.1f} "
                  f"{total.prefetch_hits:>7} {total.prefetch_wasted:>8} {total.host_experts / decode:>10.1f}",
                  flush=True)
            if placement:
                print(f"{'':>6} auto placement costs measured at start: {engine.dispatcher.placement.costs.describe()}")
            del engine
            gc.collect()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=("real", "small"), default="real")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--decode", type=int, default=160, help="decode tokens recorded for the replay")
    parser.add_argument("--run-decode", type=int, default=24, help="decode tokens per real run (part 2)")
    parser.add_argument("--threads", type=int, default=None, help="MindSpore CPU kernel threads (default: its own)")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/ferry-bench-offload"))
    args = parser.parse_args()
    configure(threads=args.threads)
    limit_blas_threads(1)  # numpy's spinning BLAS threads otherwise slow MindSpore here (offload.placement)
    spec = spec_for(args.preset, args.layers)
    tag = f"{args.preset}-{args.layers}l"
    model_dir = args.cache / f"ckpt-{tag}"
    if not model_dir.exists():
        start = time.perf_counter()
        write_random_checkpoint(spec, model_dir, dtype="F32", seed=0)
        print(f"wrote {model_dir} in {time.perf_counter() - start:.0f} s")
    k = spec.num_experts_per_tok
    tiers = (TierRecord(1, k), TierRecord(8, 4), TierRecord(64, 2))
    artifact = cached_artifact(model_dir, args.cache / "artifacts", ConvertOptions("fp32", tiers, (PROMPT,), 512)).path
    block = expert_block_bytes(spec, "fp32")
    total = spec.num_layers * spec.num_experts
    dense = Artifact.open(artifact)
    predictor = RouterPredictor([dense.layer_weights(i)["router"] for i in range(spec.num_layers)], k)
    start = time.perf_counter()
    engine = engine_from_artifact(artifact, Residence(total // 4, total))
    trace = record(engine, predictor, lambda: decode_tokens(engine, args.decode, seed=0))
    engine.close()
    del engine
    gc.collect()
    print(f"recorded {trace.num_steps} decode steps in {time.perf_counter() - start:.0f} s")
    replay_budgets = sorted({k, 2 * k, 4 * k, total // 8, total // 4, total // 2})
    part_one(trace, spec, [b for b in replay_budgets if b <= total], block)
    part_two(artifact, spec, sorted({2 * k, total // 4}), args.run_decode)


if __name__ == "__main__":
    main()
