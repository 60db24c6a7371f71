"""Calibrated capacity tiers against a single naive tier and power-of-two tiers, on recorded routing.

    python -m bench.tiers --model demo
    python -m bench.tiers --model realwidth --max-prompt-tokens 128
    python -m bench.tiers --trace ~/.cache/ferry/traces/realwidth-4l.npz   # re-score, no model run

Records routing over the calibration prompts (prefill, then greedy decode) with
`app.routing.record_routing`, saves the trace (it also feeds the cache benchmarks), then for
each cost profile (`app.calibrate.COSTS`: the CPU one measured here, the 310P3 one from its
specs) prints padding fraction, launches and modelled expert time per layer step of: the
calibrated tiers (`choose_tiers`), one tier holding the largest load, power-of-two tiers halving
down from the largest load, power-of-two tiers spread from 1, and `conf/tiers/default.yaml`.

`realwidth` is `bench.realwidth`'s checkpoint (Qwen3.6-35B-A3B widths, 256 experts of
3 x 512 x 2048, 4 layers, random BF16 weights). Its experts are 12.9 GB in FP32, so they are read
from the checkpoint on demand into a bounded LRU (`--cache-gb`) rather than held resident.
Random weights route by a random router: these loads show the method, not Qwen's real routing.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from app import calibrate, routing
from offload.tiers import from_config

TRACES = Path.home() / ".cache" / "ferry" / "traces"
CONF_DEFAULT = calibrate.CONF_TIERS / "default.yaml"


class CheckpointBlocks:
    """The checkpoint's experts as FP32 blocks in the store's layout (`artifact.store`), each read from the
    checkpoint when a slot needs it: the `BlockSource` a model whose experts do not fit in RAM records with."""

    def __init__(self, checkpoint):
        from artifact.store import block_bytes, block_layout

        self.checkpoint = checkpoint
        self.parts = block_layout(checkpoint.spec, "fp32")
        self.block_bytes = block_bytes(self.parts)
        self.num_layers, self.num_experts = checkpoint.spec.num_layers, checkpoint.spec.num_experts

    def read_into(self, layer: int, expert: int, out: np.ndarray) -> None:
        for part, array in zip(self.parts, self.checkpoint.expert_weights(layer, expert)):  # gate_up, down
            out[part.offset: part.offset + part.nbytes] = np.ascontiguousarray(array, np.float32).view(np.uint8).ravel()


def build_engine(model_dir: Path, buckets: tuple[int, ...], max_context: int, resident_gb: float, cache_gb: float):
    """Every expert resident when they fit in `resident_gb` (FP32), else streamed from the checkpoint into
    an LRU pool of `cache_gb`."""
    from model.checkpoint import Checkpoint
    from model.spec import load_spec
    from offload.device import DeviceMemory
    from offload.dispatch import ExpertDispatcher
    from offload.offloaded import OffloadedExperts
    from offload.policies import make_policy
    from runtime.backend import configure
    from runtime.build import default_tiers, engine_from_checkpoint
    from runtime.engine import Buckets, Engine
    from runtime.graph_set import CellGraphs

    spec = load_spec(model_dir)
    expert_bytes = spec.num_layers * spec.num_experts * spec.expert_params * 4
    if expert_bytes <= resident_gb * 1e9:
        return engine_from_checkpoint(model_dir, buckets=Buckets(buckets), max_context=max_context)
    configure()
    checkpoint = Checkpoint(model_dir)
    graphs = CellGraphs(spec)
    tiers = default_tiers(spec)
    blocks = CheckpointBlocks(checkpoint)
    slots = max(max(t.group for t in tiers), int(cache_gb * 1e9) // blocks.block_bytes)
    device = DeviceMemory()
    experts = OffloadedExperts(blocks, slots, make_policy("lru"), device=device)
    dispatcher = ExpertDispatcher(spec, tiers, experts, graphs, device)
    return Engine(checkpoint, dispatcher, graphs, Buckets(buckets), max_context)


def measure_replay(samples: list[np.ndarray], candidates, count: int, hidden: int = 2048,
                   intermediate: int = 512) -> dict[str, float]:
    """Seconds per layer step of the expert-group launches each tier set plans for `count` layer
    steps drawn from `samples` (seeded), run through the real graphs at real widths with weights
    from a pool larger than the caches: the model's prediction checked on this machine. The tier
    sets take turns step by step, so load from other processes falls on all of them alike. Host
    gather/scatter is not included."""
    import mindspore as ms

    from bench.launch_cost import expert_pool
    from offload.tiers import plan_launches
    from runtime.backend import configure
    from runtime.graph_set import _expert_group

    configure()
    pool = [(ms.Tensor.from_numpy(g), ms.Tensor.from_numpy(d)) for g, d in expert_pool(24, hidden, intermediate)]
    picked = np.random.default_rng(0).choice(len(samples), size=min(count, len(samples)), replace=False)
    turn = 0

    def launcher(tiers):
        cells = [_expert_group(t.group, intermediate) for t in tiers]
        inputs = [ms.Tensor.from_numpy(np.ones((t.group, t.capacity, hidden), np.float32)) for t in tiers]
        full = [ms.Tensor.from_numpy(np.full(t.group, t.capacity, np.int32)) for t in tiers]

        def launch(index: int) -> None:
            nonlocal turn
            slots = [pool[(turn + g) % len(pool)] for g in range(tiers[index].group)]
            turn += len(slots)
            cells[index](inputs[index], full[index], *(s[0] for s in slots), *(s[1] for s in slots)).asnumpy()

        for index in range(len(tiers)):  # compile every shape before timing
            launch(index)
        return launch

    launchers = [launcher(c.tiers) for c in candidates]
    totals = np.zeros(len(candidates))
    for n, i in enumerate(picked):
        for k in np.roll(np.arange(len(candidates)), n):  # rotate who goes first
            plan = plan_launches(samples[i], candidates[k].tiers)
            start = time.perf_counter()
            for planned in plan:
                launchers[k](planned.tier_index)
            totals[k] += time.perf_counter() - start
    return {c.name: totals[k] / len(picked) for k, c in enumerate(candidates)}


def record(args) -> tuple[routing.RoutingTrace, str]:
    if args.model == "realwidth":
        from bench.realwidth import real_width_checkpoint

        model_dir, name = real_width_checkpoint(args.layers), f"realwidth-{args.layers}l"
    else:
        model_dir = routing.resolve_model_dir(args.model)
        name = "demo" if args.model == "demo" else Path(model_dir).name
    start = time.perf_counter()
    engine = build_engine(model_dir, tuple(args.buckets), args.max_prompt_tokens + args.decode_tokens + 1,
                          args.resident_gb, args.cache_gb)
    texts = routing.load_prompts(args.prompts)[: args.max_prompts]
    prompts = routing.encode_prompts(texts, model_dir, engine.spec.vocab_size, args.max_prompt_tokens)
    trace = routing.record_routing(engine, prompts, args.decode_tokens)
    print(f"recorded {model_dir} in {time.perf_counter() - start:.0f} s: {len(prompts)} prompts of "
          f"<= {args.max_prompt_tokens} tokens ({'tokenizer' if (Path(model_dir) / 'tokenizer.json').is_file() else 'UTF-8 bytes'}), "
          f"{args.decode_tokens} decode steps each, prefill buckets {args.buckets}")
    return trace, name


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help="demo, realwidth, or a checkpoint directory")
    parser.add_argument("--trace", type=Path, help="score this saved trace instead of recording one")
    parser.add_argument("--layers", type=int, default=4, help="layers of the realwidth checkpoint")
    parser.add_argument("--prompts", type=Path, help="prompts file (default: app/calibration_prompts.txt)")
    parser.add_argument("--max-prompts", type=int)
    parser.add_argument("--max-prompt-tokens", type=int, default=256)
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--buckets", type=int, nargs="+", default=[16, 64], help="prefill buckets")
    parser.add_argument("--tiers", type=int, default=3, help="at most this many calibrated tiers")
    parser.add_argument("--resident-gb", type=float, default=2.0, help="hold experts resident up to this (FP32)")
    parser.add_argument("--cache-gb", type=float, default=2.0, help="LRU of experts read on demand otherwise")
    parser.add_argument("--top-k", type=int, help="experts per token, for a trace saved without top-k ids")
    parser.add_argument("--measure", type=int, default=0, metavar="N",
                        help="also time the CPU profile's tier sets on N sampled layer steps (real-width graphs)")
    args = parser.parse_args(argv)

    if args.trace:
        trace, name = routing.RoutingTrace.load(args.trace), args.trace.stem
    else:
        trace, name = record(args)
        TRACES.mkdir(parents=True, exist_ok=True)
        path = TRACES / f"{name}-p{args.max_prompt_tokens}-d{args.decode_tokens}.npz"
        trace.save(path)
        print(f"trace saved: {path}")

    samples = routing.load_samples(trace)
    active = np.array([int((s > 0).sum()) for s in samples])
    loads = np.concatenate([s[s > 0] for s in samples])
    print(f"{name}: {trace.num_layers} layers x {trace.num_experts} experts, {trace.num_steps} steps", end="")
    if trace.decode is not None:
        print(f" ({int((~trace.decode).sum())} prefill launches, {int(trace.decode.sum())} decode)", end="")
    print(f"; {len(samples)} layer steps, {active.mean():.1f} active experts and {loads.mean():.2f} tokens per "
          f"active expert on average, largest load {loads.max()}")
    top_k = args.top_k or (int(trace.topk.shape[2]) if trace.topk is not None else None)
    if top_k is None:
        parser.error(f"{args.trace} has no top-k ids: give --top-k")
    groups = calibrate.group_options(top_k)
    fixed = {}
    if CONF_DEFAULT.is_file():
        import yaml

        fixed["conf default"] = from_config(yaml.safe_load(CONF_DEFAULT.read_text())["tiers"], default_group=top_k)
    for profile, cost in calibrate.COSTS.items():
        start = time.perf_counter()
        candidates = calibrate.compare_tiers(samples, cost, args.tiers, lambda c: groups, fixed=fixed)
        print(f"\ncost {profile}: {cost} (groups offered {groups}; chosen in {time.perf_counter() - start:.1f} s)")
        print("per layer step:")
        print(calibrate.format_comparison(candidates))
        if args.measure and profile == "cpu":
            start = time.perf_counter()
            measured = measure_replay(samples, candidates, args.measure)
            print(f"measured here, expert-group launches of {min(args.measure, len(samples))} sampled layer steps "
                  f"at H=2048, I=512 ({time.perf_counter() - start:.0f} s, load average {os.getloadavg()[0]:.1f}):")
            for c in candidates:
                print(f"  {c.name:<13} {measured[c.name] * 1e6:>9.1f} us per layer step "
                      f"(modelled {c.report.cost_per_step_s * 1e6:.1f})")


if __name__ == "__main__":
    main()
