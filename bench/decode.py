"""Decode speed at Qwen3.6-35B-A3B's real layer widths, side by side in one run.

    python bench/decode.py            # 4 layers (3 DeltaNet + 1 attention), 32 decode tokens

Prints Ferry's decode tokens/s and ms per layer with every expert resident; the same through the
offload controller at expert budgets of 50%, 25% and 10% of the experts, with prefetch off and on
(LRU slots; experts streamed from a memory-mapped FP32 block file); transformers eager on the same
checkpoint with the same thread count and prompt; and the bandwidth bound (bytes of weights one
decode token reads / memory bandwidth measured in this run); then the ratios. Each model runs in
its own process, one after the other, so they never share memory. On shared machines single runs
swing by +-30%, so resident Ferry and transformers run `--rounds` times, alternating, and the
medians (and every round's ratio) are printed; the offloaded runs are compared to that median.

The routing trace is the model's own: a fixed random 32-token prompt, then greedy decoding. The
weights are random, so consecutive tokens share experts about as often as chance allows: a
pessimistic stand-in for a trained model's locality.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench.realwidth import real_width_checkpoint, real_width_spec  # noqa: E402


def prompt_ids(length: int, vocab: int) -> list[int]:
    return np.random.default_rng(1234).integers(0, vocab, length).tolist()


def timed_decode(engine, prompt: list[int], tokens: int, on_prefill=None) -> tuple[list[int], float]:
    """Greedy: prefill, then `tokens - 1` decode steps; returns the ids and the decode seconds."""
    engine.reset()
    token = int(np.argmax(engine.forward(prompt)))
    out = [token]
    if on_prefill is not None:
        on_prefill()
    start = time.perf_counter()
    for _ in range(tokens - 1):
        token = int(np.argmax(engine.forward([token])))
        out.append(token)
    return out, time.perf_counter() - start


def offload_worker(model_dir: Path, prompt: list[int], tokens: int, threads: int, fraction: float,
                   prefetch: bool) -> dict:
    from runtime.backend import configure
    from runtime.build import engine_with_offload
    from runtime.engine import Buckets

    configure(threads=threads)
    spec = real_width_spec()
    block_file = model_dir.parent / f"{model_dir.name}.blocks"
    budget = int(fraction * spec.num_layers * spec.num_experts * spec.expert_params * 4)
    engine = engine_with_offload(model_dir, budget_bytes=budget, policy="lru", prefetch=prefetch, store="mmap",
                                 store_path=block_file, store_populate=True, buckets=Buckets((64,)),
                                 max_context=len(prompt) + tokens + 1)
    timed_decode(engine, prompt, tokens)  # compile, and warm the slots
    stats = engine.dispatcher.stats
    marks = {}
    ids, seconds = timed_decode(engine, prompt, tokens, on_prefill=lambda: marks.update(stats.to_dict()["total"]))
    total = stats.to_dict()["total"]
    engine.close()
    streamed = total["bytes_streamed"] - marks["bytes_streamed"]
    stalled = total["stall_s"] - marks["stall_s"]
    return {"ids": ids, "ms_per_token": seconds / (tokens - 1) * 1e3,
            "mb_streamed_per_token": streamed / (tokens - 1) / 1e6, "stall_fraction": stalled / seconds}


def ferry_worker(model_dir: Path, prompt: list[int], tokens: int, threads: int) -> dict:
    from convert.checkpoint import Checkpoint
    from offload.dispatch import ExpertDispatcher, ResidentExperts
    from runtime.backend import configure
    from runtime.build import default_tiers
    from runtime.engine import Buckets, Engine
    from runtime.graph_set import CellGraphs

    from bench.measure import TimedGraphs

    configure(threads=threads)
    checkpoint = Checkpoint(model_dir)
    spec = checkpoint.spec
    context = len(prompt) + tokens + 1
    timed = TimedGraphs(CellGraphs(spec, context))
    experts = ResidentExperts([checkpoint.layer_experts(layer) for layer in range(spec.num_layers)])
    dispatcher = ExpertDispatcher(spec, default_tiers(spec), experts, timed)
    engine = Engine(checkpoint, dispatcher, timed, Buckets((64,)), max_context=context)

    timed_decode(engine, prompt, tokens)  # compile every shape once
    ids, seconds = timed_decode(engine, prompt, tokens, on_prefill=timed.seconds.clear)
    steps = tokens - 1
    per_kind = {kind: s / steps * 1e3 for kind, s in timed.seconds.items()}
    return {"ids": ids, "ms_per_token": seconds / steps * 1e3, "graph_ms_per_token": per_kind}


def transformers_worker(model_dir: Path, prompt: list[int], tokens: int, threads: int) -> dict:
    import torch
    from transformers import Qwen3_5MoeForCausalLM

    torch.set_num_threads(threads)
    model = Qwen3_5MoeForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    model.eval()

    @torch.no_grad()
    def decode() -> tuple[list[int], float]:
        out = model(torch.tensor([prompt]), use_cache=True)
        token = int(out.logits[0, -1].argmax())
        ids, past = [token], out.past_key_values
        start = time.perf_counter()
        for _ in range(tokens - 1):
            out = model(torch.tensor([[token]]), past_key_values=past, use_cache=True)
            token, past = int(out.logits[0, -1].argmax()), out.past_key_values
            ids.append(token)
        return ids, time.perf_counter() - start

    decode()
    ids, seconds = decode()
    return {"ids": ids, "ms_per_token": seconds / (tokens - 1) * 1e3,
            "experts_implementation": str(getattr(model.config, "_experts_implementation", "default"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=32, help="prompt length in tokens")
    parser.add_argument("--tokens", type=int, default=32, help="tokens to decode")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3,
                        help="resident Ferry and transformers run this many times, alternating; medians reported")
    parser.add_argument("--budgets", type=float, nargs="*", default=[0.5, 0.25, 0.1],
                        help="expert budgets as fractions of all experts")
    parser.add_argument("--worker", choices=["ferry", "transformers", "offload"], help=argparse.SUPPRESS)
    parser.add_argument("--fraction", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--prefetch", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    model_dir = real_width_checkpoint(args.layers)
    spec = real_width_spec(args.layers)
    prompt = prompt_ids(args.prompt, spec.vocab_size)
    if args.worker == "offload":
        print(json.dumps(offload_worker(model_dir, prompt, args.tokens, args.threads, args.fraction, args.prefetch)))
        return
    if args.worker:
        worker = ferry_worker if args.worker == "ferry" else transformers_worker
        print(json.dumps(worker(model_dir, prompt, args.tokens, args.threads)))
        return

    from bench.measure import decode_bytes_per_token, read_bandwidth, run_worker
    from runtime.backend import configure

    configure(threads=args.threads)
    common = ["--layers", str(args.layers), "--prompt", str(args.prompt), "--tokens", str(args.tokens),
              "--threads", str(args.threads)]
    bandwidths, ferry_runs, hf_runs = [], [], []
    for _ in range(args.rounds):  # alternating, so drifting load from elsewhere falls on both alike
        bandwidths.append(read_bandwidth())
        ferry_runs.append(run_worker(Path(__file__), "--worker", "ferry", *common))
        hf_runs.append(run_worker(Path(__file__), "--worker", "transformers", *common))
    offloaded = {(fraction, prefetch): run_worker(Path(__file__), "--worker", "offload", "--fraction", str(fraction),
                                                  *(["--prefetch"] if prefetch else []), *common)
                 for fraction in args.budgets for prefetch in (False, True)}
    bandwidth = max(bandwidths)  # the fastest read seen: the tightest bound
    ferry = sorted(ferry_runs, key=lambda run: run["ms_per_token"])[len(ferry_runs) // 2]  # the median run
    hf = sorted(hf_runs, key=lambda run: run["ms_per_token"])[len(hf_runs) // 2]
    context = args.prompt + args.tokens // 2
    bound_ms = decode_bytes_per_token(spec, context) / bandwidth * 1e3

    print(f"checkpoint: {model_dir} ({args.layers} layers at real width, BF16 stored, FP32 compute)")
    print(f"threads {args.threads}, prompt {args.prompt} tokens, {args.tokens} decoded, greedy; "
          f"resident and transformers: median of {args.rounds} alternating rounds")
    print(f"measured read bandwidth: {bandwidth / 1e9:.1f} GB/s (best of "
          f"{', '.join(f'{b / 1e9:.1f}' for b in bandwidths)}); one decode token reads "
          f"{decode_bytes_per_token(spec, context) / 1e6:.0f} MB")
    print()
    print(f"{'':28s}{'ms/token':>10s}{'tokens/s':>10s}")
    for name, ms in [("ferry, all experts resident", ferry["ms_per_token"]),
                     ("transformers eager", hf["ms_per_token"]), ("bandwidth bound", bound_ms)]:
        print(f"{name:28s}{ms:10.1f}{1e3 / ms:10.2f}")
    print()
    print(f"{'offloaded (LRU)':28s}{'ms/token':>10s}{'tokens/s':>10s}{'/resident':>10s}{'MB/token':>10s}{'stalled':>9s}")
    for (fraction, prefetch), run in offloaded.items():
        name = f"{fraction:.0%} of experts, prefetch {'on' if prefetch else 'off'}"
        print(f"{name:28s}{run['ms_per_token']:10.1f}{1e3 / run['ms_per_token']:10.2f}"
              f"{ferry['ms_per_token'] / run['ms_per_token']:9.0%} {run['mb_streamed_per_token']:9.0f}"
              f"{run['stall_fraction']:9.0%}")
        assert run["ids"] == ferry["ids"], "offloading changed the greedy tokens"
    print()
    graph = ferry["graph_ms_per_token"]
    kinds = {"deltanet": spec.layer_types.count("linear_attention"),
             "attention": spec.layer_types.count("full_attention"), "experts": spec.num_layers}
    for kind, count in kinds.items():
        print(f"ferry {kind:9s} {graph.get(kind, 0.0) / count:6.2f} ms per layer")
    outside = ferry["ms_per_token"] - sum(graph.values())
    print(f"ferry head {graph.get('head', 0.0):6.2f} ms, host work between launches {outside:6.2f} ms per token")
    print()
    per_round = [h["ms_per_token"] / f["ms_per_token"] for f, h in zip(ferry_runs, hf_runs)]
    print(f"ferry / transformers speed: {hf['ms_per_token'] / ferry['ms_per_token']:.2f}x "
          f"(per round: {', '.join(f'{r:.2f}x' for r in per_round)})")
    print(f"ferry time / bandwidth bound: {ferry['ms_per_token'] / bound_ms:.2f}x")
    assert all(run["ids"] == ferry["ids"] for run in ferry_runs), "resident runs disagree"
    same = sum(a == b for a, b in zip(ferry["ids"], hf["ids"]))
    print(f"greedy tokens equal to transformers: {same}/{len(ferry['ids'])}")


if __name__ == "__main__":
    main()
