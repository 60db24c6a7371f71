"""Decode speed at Qwen3.6-35B-A3B's real layer widths, per expert storage dtype, side by side in one run.

    python bench/decode.py            # 4 layers (3 DeltaNet + 1 attention), 16 decode tokens, 3 rounds
    python bench/decode.py --model models/ferry-demo --tokens 64   # the trained demo, from held-out text

The checkpoint (`bench.realwidth`, BF16, random weights) is converted once per storage dtype
(fp32, fp16, int8) to an artifact, as `run.py` would convert it. For each dtype Ferry decodes with
every expert resident and with a pool of `--fraction` of the experts (`--policy`, decayed frequency
by default, prefetch of `--prefetch-limit` experts per layer, 0 for none, blocks streamed from the artifact's
experts.bin), in each memory model of `--memories` (`shared`, the CPU's fast path, where graphs read host
buffers in place; `apart`, the card's code path, where every device tensor is MindSpore's own copy and
blocks reach their slots through staging and the slot-write graph); transformers eager decodes the same checkpoint with the
same thread count and prompt, and llama.cpp (`bench.llamacpp`) decodes a GGUF of it in the format
paired with each dtype (F32, BF16, Q8_0) when its bindings are installed. Printed per contender: ms per token, MB a decode token reads (dense
weights as stored: FP32, or FP16 matrices beside narrow experts; its top-k experts per layer in the
storage dtype, head, KV cache), MB streamed per
token, and the bandwidth bound (bytes read / the best read bandwidth measured in this run).

Every contender runs in its own process, one after the other, so two never share memory; on
shared machines single runs swing by +-30%, so the contenders run `--rounds` times, taking turns
within each round, and the medians (with every round's ratio for resident FP32) are printed.
The routing trace is the model's own: a fixed random 32-token prompt, then greedy decoding. The
weights are random, so consecutive tokens share experts about as often as chance allows: a
pessimistic stand-in for a trained model's locality.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench.realwidth import bench_artifact, real_width_checkpoint, real_width_spec  # noqa: E402

DTYPES = ("fp32", "fp16", "int8")


def prompt_ids(length: int, vocab: int, model_dir: Path | None) -> list[int]:
    """The first `length` tokens of the model's held-out text when it ships one (a trained model decodes
    from real text), else random ids."""
    text = model_dir / "heldout.txt" if model_dir is not None else None
    if text is not None and text.is_file():
        from runtime.tokenizer import load_tokenizer

        ids = load_tokenizer(model_dir).encode(text.read_text(encoding="utf-8")).ids[:length]
        if len(ids) == length:
            return ids
    return np.random.default_rng(1234).integers(0, vocab, length).tolist()


def bench_model(args) -> tuple[Path, object]:
    """(checkpoint, spec): `--model DIR`, or the real-width random checkpoint of `--layers` layers."""
    if args.model is None:
        return real_width_checkpoint(args.layers), real_width_spec(args.layers)
    from model.checkpoint import Checkpoint

    return args.model, Checkpoint(args.model).spec


def timed_decode(engine, prompt: list[int], tokens: int, on_prefill=None) -> tuple[list[int], float]:
    """Greedy, as run.py decodes (the head's choice read back, not the logits): prefill, then `tokens - 1`
    decode steps; returns the ids and the decode seconds."""
    engine.reset()
    token = engine.next_greedy(prompt)
    out = [token]
    if on_prefill is not None:
        on_prefill()
    start = time.perf_counter()
    for _ in range(tokens - 1):
        token = engine.next_greedy([token])
        out.append(token)
    return out, time.perf_counter() - start


def ferry_worker(artifact: Path, spec, prompt: list[int], tokens: int, threads: int, fraction: float | None,
                 policy: str, prefetch_limit: int | None, memory: str) -> dict:
    """Ferry over the artifact, every expert resident (fraction None) or a pool of that fraction, in the
    memory model `memory` (offload.device)."""
    from bench.measure import TimedGraphs
    from offload.residence import Residence
    from runtime.backend import configure
    from runtime.build import engine_from_artifact

    configure(threads=threads)
    total = spec.num_layers * spec.num_experts
    residence = None if fraction is None else Residence(int(fraction * total), total, policy,
                                                         prefetch=prefetch_limit != 0)
    engine = engine_from_artifact(artifact, residence, prefetch_limit=prefetch_limit or None, memory=memory)
    timed = TimedGraphs(engine.graphs)  # per-kind graph time: wrap the engine's and the dispatcher's launches
    engine.graphs = engine.dispatcher.graphs = timed
    timed_decode(engine, prompt, tokens)  # compile every shape once, and warm the slots
    stats = engine.dispatcher.stats
    marks = {}

    def mark():
        timed.seconds.clear()
        marks.update(stats.to_dict()["total"])
        engine.dispatcher.crossings.reset()

    ids, seconds = timed_decode(engine, prompt, tokens, on_prefill=mark)
    total_counts = stats.to_dict()["total"]
    crossings = engine.dispatcher.crossings
    beyond_blocks = tuple(k for k in crossings.kinds["decode"] if k != "expert block")
    engine.close()
    steps = tokens - 1
    asked = total_counts["hits"] + total_counts["misses"] - marks["hits"] - marks["misses"]
    return {"ids": ids, "ms_per_token": seconds / steps * 1e3,
            "graph_ms_per_token": {kind: s / steps * 1e3 for kind, s in timed.seconds.items()},
            "mb_streamed_per_token": (total_counts["bytes_streamed"] - marks["bytes_streamed"]) / steps / 1e6,
            "stall_fraction": (total_counts["stall_s"] - marks["stall_s"]) / seconds,
            "hit_rate": (total_counts["hits"] - marks["hits"]) / asked if asked else 1.0,
            "misses_per_token": (total_counts["misses"] - marks["misses"]) / steps,
            "prefetches_per_token": (total_counts["prefetch_issued"] - marks["prefetch_issued"]) / steps,
            "crossing_bytes_per_token": crossings.per_token("decode", beyond_blocks),
            "launches_per_token": crossings.launches["decode"] / crossings.tokens["decode"]}


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
    return {"ids": ids, "ms_per_token": seconds / (tokens - 1) * 1e3}


def median_run(runs: list[dict]) -> dict:
    return sorted(runs, key=lambda run: run["ms_per_token"])[len(runs) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--model", type=Path, help="a checkpoint directory instead of the real-width random one "
                        "(e.g. models/ferry-demo; its heldout.txt gives the prompt)")
    parser.add_argument("--prompt", type=int, default=32, help="prompt length in tokens")
    parser.add_argument("--tokens", type=int, default=16, help="tokens to decode")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="every contender runs this many times, taking turns")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="expert storage dtypes, comma separated")
    parser.add_argument("--fraction", type=float, default=0.25, help="expert budget as a fraction of all experts")
    parser.add_argument("--policy", default="decay", help="eviction policy of the slot pool")
    parser.add_argument("--prefetch-limit", type=int, help="experts prefetched per layer (default: top-k; 0: no prefetch)")
    parser.add_argument("--memories", default="shared,apart", help="memory models of Ferry's contenders "
                        "(offload.device: shared, the CPU fast path; apart, the card's code path), comma separated")
    parser.add_argument("--memory", help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=["ferry", "transformers", "llamacpp"], help=argparse.SUPPRESS)
    parser.add_argument("--artifact", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--gguf", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--pool", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    checkpoint, spec = bench_model(args)
    prompt = prompt_ids(args.prompt, spec.vocab_size, args.model)
    if args.worker == "ferry":
        print(json.dumps(ferry_worker(args.artifact, spec, prompt, args.tokens, args.threads, args.pool,
                                      args.policy, args.prefetch_limit, args.memory)))
        return
    if args.worker == "transformers":
        print(json.dumps(transformers_worker(checkpoint, prompt, args.tokens, args.threads)))
        return
    if args.worker == "llamacpp":
        from bench import llamacpp

        print(json.dumps(llamacpp.worker(args.gguf, prompt, args.tokens, args.threads)))
        return

    from bench.measure import decode_bytes_per_token, read_bandwidth, run_worker
    from artifact.reader import Artifact
    from runtime.backend import configure

    configure(threads=args.threads)
    dtypes = args.dtypes.split(",")
    artifacts = {dtype: bench_artifact(checkpoint, dtype) for dtype in dtypes}
    block = {dtype: Artifact.open(path, verify="none").manifest.experts.block_bytes for dtype, path in artifacts.items()}
    common = ["--layers", str(args.layers), *(["--model", str(args.model)] if args.model else []), "--prompt", str(args.prompt), "--tokens", str(args.tokens),
              "--threads", str(args.threads), "--policy", args.policy,
              *(["--prefetch-limit", str(args.prefetch_limit)] if args.prefetch_limit is not None else [])]
    memories = args.memories.split(",")
    contenders = [("transformers", None, None, None)] + [(dtype, pool, artifacts[dtype], memory) for dtype in dtypes
                                                         for pool in (None, args.fraction) for memory in memories]
    from bench import llamacpp

    llama_missing = llamacpp.missing()
    ggufs = {} if llama_missing else {dtype: llamacpp.gguf(checkpoint, dtype) for dtype in dtypes}
    contenders += [(f"llama.cpp {dtype}", None, path, None) for dtype, path in ggufs.items()]
    runs = {(name, pool, memory): [] for name, pool, _, memory in contenders}
    bandwidths = []
    for _ in range(args.rounds):  # taking turns, so drifting load from elsewhere falls on every contender alike
        bandwidths.append(read_bandwidth())
        for name, pool, artifact, memory in contenders:
            if artifact is None:
                runs[name, pool, memory].append(run_worker(Path(__file__), "--worker", "transformers", *common))
            elif name.startswith("llama.cpp"):
                runs[name, pool, memory].append(run_worker(Path(__file__), "--worker", "llamacpp", "--gguf",
                                                           str(artifact), *common))
            else:
                extra = ["--pool", str(pool)] if pool is not None else []
                runs[name, pool, memory].append(run_worker(Path(__file__), "--worker", "ferry", "--artifact",
                                                           str(artifact), "--memory", memory, *extra, *common))
    bandwidth = max(bandwidths)  # the fastest read seen: the tightest bound
    hf = median_run(runs["transformers", None, None])
    read_context = args.prompt + args.tokens // 2

    shape = (f"{args.layers} layers at real width" if args.model is None else
             f"{spec.num_layers} layers, hidden {spec.hidden_size}, {spec.num_experts} experts top-{spec.num_experts_per_tok}")
    print(f"checkpoint: {checkpoint} ({shape}, BF16 stored, FP32 compute); threads {args.threads}, prompt {args.prompt} tokens, {args.tokens} decoded, greedy")
    print(f"medians of {args.rounds} rounds, contenders taking turns; measured read bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s (best of {', '.join(f'{b / 1e9:.1f}' for b in bandwidths)})")
    print()
    head = (f"{'':52s}{'ms/token':>9s}{'tok/s':>7s}{'MB read':>9s}{'bound ms':>9s}{'x bound':>8s}{'x hf':>6s}"
            f"{'MB strm':>8s}{'hit%':>6s}{'stall':>6s}")
    print(head)
    hf_bytes = decode_bytes_per_token(spec, read_context)
    print(f"{'transformers eager (fp32)':52s}{hf['ms_per_token']:9.1f}{1e3 / hf['ms_per_token']:7.2f}"
          f"{hf_bytes / 1e6:9.0f}{hf_bytes / bandwidth * 1e3:9.1f}"
          f"{hf['ms_per_token'] / (hf_bytes / bandwidth * 1e3):8.2f}{1.0:6.2f}")
    for dtype in dtypes:
        read = decode_bytes_per_token(spec, read_context, dtype, block[dtype])
        bound_ms = read / bandwidth * 1e3
        resident = median_run(runs[dtype, None, memories[0]])
        for pool, memory in ((pool, memory) for pool in (None, args.fraction) for memory in memories):
            run = median_run(runs[dtype, pool, memory])
            prefetch = "no prefetch" if args.prefetch_limit == 0 else "prefetch"
            name = f"ferry {dtype} {memory}, " + ("all resident" if pool is None else
                                                  f"{pool:.0%} in slots, {args.policy}, {prefetch}")
            streamed = "" if pool is None else (f"{run['mb_streamed_per_token']:8.0f}{100 * run['hit_rate']:6.0f}"
                                                f"{100 * run['stall_fraction']:5.0f}%")
            print(f"{name:52s}{run['ms_per_token']:9.1f}{1e3 / run['ms_per_token']:7.2f}{read / 1e6:9.0f}"
                  f"{bound_ms:9.1f}{run['ms_per_token'] / bound_ms:8.2f}{hf['ms_per_token'] / run['ms_per_token']:6.2f}"
                  f"{streamed}")
            assert all(r["ids"] == resident["ids"] for r in runs[dtype, pool, memory]), \
                f"{dtype}: runs in another memory model or with a slot pool disagree on the greedy tokens"
        if dtype in ggufs:
            run = median_run(runs[f"llama.cpp {dtype}", None, None])
            read = llamacpp.bytes_per_token(ggufs[dtype], spec, read_context)
            bound_ms = read / bandwidth * 1e3
            name = f"llama.cpp {llamacpp.FORMATS[dtype].upper()} (same checkpoint, GGUF)"
            print(f"{name:52s}{run['ms_per_token']:9.1f}{1e3 / run['ms_per_token']:7.2f}{read / 1e6:9.0f}"
                  f"{bound_ms:9.1f}{run['ms_per_token'] / bound_ms:8.2f}{hf['ms_per_token'] / run['ms_per_token']:6.2f}")
    print()
    if llama_missing:
        print(llama_missing)
    shared = memories[0]
    fp32 = runs.get(("fp32", None, shared))
    if fp32:
        per_round = [h["ms_per_token"] / f["ms_per_token"] for f, h in zip(fp32, runs["transformers", None, None])]
        print(f"ferry fp32 resident / transformers speed per round: {', '.join(f'{r:.2f}x' for r in per_round)} "
              f"(median {statistics.median(per_round):.2f}x)")
    for dtype in ggufs:
        per_round = [llama["ms_per_token"] / f["ms_per_token"]
                     for f, llama in zip(runs[dtype, None, shared], runs[f"llama.cpp {dtype}", None, None])]
        same = sum(a == b for a, b in zip(median_run(runs[f"llama.cpp {dtype}", None, None])["ids"], hf["ids"]))
        print(f"ferry {dtype} {shared} resident / llama.cpp {llamacpp.FORMATS[dtype].upper()} speed per round: "
              f"{', '.join(f'{r:.2f}x' for r in per_round)} (median {statistics.median(per_round):.2f}x); "
              f"llama.cpp's greedy tokens equal to transformers {same}/{len(hf['ids'])}")
    for dtype, memory in ((dtype, memory) for dtype in dtypes for memory in memories):
        per_round = [r["ms_per_token"] / s["ms_per_token"]
                     for r, s in zip(runs[dtype, None, memory], runs[dtype, args.fraction, memory])]
        print(f"ferry {dtype} {memory} with {args.fraction:.0%} in slots / resident speed per round: "
              f"{', '.join(f'{r:.0%}' for r in per_round)} (median {statistics.median(per_round):.0%})")
    for dtype, pool, memory in ((d, p, m) for d in dtypes for p in (None, args.fraction) for m in memories[1:]):
        per_round = [s["ms_per_token"] / a["ms_per_token"]
                     for s, a in zip(runs[dtype, pool, shared], runs[dtype, pool, memory])]
        where = "resident" if pool is None else f"{pool:.0%} in slots"
        print(f"ferry {dtype} {where}, {memory} / {shared} speed per round: "
              f"{', '.join(f'{r:.2f}x' for r in per_round)} (median {statistics.median(per_round):.2f}x)")
    for dtype, memory in ((dtype, memory) for dtype in dtypes for memory in memories):
        run = median_run(runs[dtype, None, memory])
        graph = run["graph_ms_per_token"]
        layers = {"deltanet": spec.layer_types.count("linear_attention"),
                  "attention": spec.layer_types.count("full_attention"), "experts": spec.num_layers}
        parts = ", ".join(f"{kind} {graph.get(kind, 0.0) / count:.2f}" for kind, count in layers.items() if count)
        outside = run["ms_per_token"] - sum(graph.values())
        same = sum(a == b for a, b in zip(run["ids"], hf["ids"]))
        print(f"ferry {dtype} {memory} resident: ms per layer {parts}; head {graph.get('head', 0.0):.2f} ms, host work "
              f"between launches {outside:.2f} ms per token; greedy tokens equal to transformers {same}/{len(hf['ids'])}; "
              f"{run['launches_per_token']:.0f} graph launches and {run['crossing_bytes_per_token'] / 1024:.1f} KiB "
              f"between host and device per decode token, beyond streamed blocks (offload.crossings)")


if __name__ == "__main__":
    main()
