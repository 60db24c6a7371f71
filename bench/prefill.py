"""Prefill speed at Qwen3.6-35B-A3B's real layer widths: Ferry, transformers and llama.cpp, one run.

    python bench/prefill.py            # prompts of 128, 1024 and 8192 tokens, 4 layers

For each prompt length: prefill tokens/s of Ferry (the FP32 artifact, as run.py converts it, all
experts resident), of transformers eager (same checkpoint, threads and prompt) and of llama.cpp on
an F32 GGUF of the checkpoint (`bench.llamacpp`, when its bindings are installed), and Ferry's time
to first token cold (a fresh process: artifact open, graph load and compilation, prefill) and warm
(graphs compiled). A prompt longer than the decode bench's context gets an artifact whose KV cache
holds it (one more conversion, 12.7 GiB). Each model runs in its own process; all run `--rounds`
times, taking turns, and the medians are printed (single runs swing by +-30% on shared machines).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench import llamacpp  # noqa: E402
from bench.realwidth import (MAX_CONTEXT, PREFILL_BUCKETS, real_width_artifact, real_width_checkpoint,  # noqa: E402
                             real_width_spec)


def artifact(layers: int, length: int) -> Path:
    """The FP32 artifact whose KV cache holds a prompt of `length` and its first token."""
    return real_width_artifact("fp32", layers, max_context=max(MAX_CONTEXT, length + 16))


def ferry_worker(artifact: Path, prompt: list[int], threads: int) -> dict:
    start = time.perf_counter()
    from runtime.backend import configure
    from runtime.build import engine_from_artifact

    configure(threads=threads)
    engine = engine_from_artifact(artifact)
    loaded = time.perf_counter()
    first = int(np.argmax(engine.forward(prompt)))
    cold = time.perf_counter() - start
    engine.reset()
    warm_start = time.perf_counter()
    again = int(np.argmax(engine.forward(prompt)))
    warm = time.perf_counter() - warm_start
    return {"cold_s": cold, "load_s": loaded - start, "warm_s": warm, "first_token": [first, again]}


def transformers_worker(model_dir: Path, prompt: list[int], threads: int) -> dict:
    import torch
    from transformers import Qwen3_5MoeForCausalLM

    torch.set_num_threads(threads)
    model = Qwen3_5MoeForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        model(ids[:, :16])  # first-call warm-up
        start = time.perf_counter()
        logits = model(ids, use_cache=True).logits
        seconds = time.perf_counter() - start
    return {"warm_s": seconds, "first_token": int(logits[0, -1].argmax())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 1024, 8192])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--worker", choices=["ferry", "transformers", "llamacpp"], help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    model_dir = real_width_checkpoint(args.layers)
    spec = real_width_spec(args.layers)
    if args.worker:
        prompt = np.random.default_rng(99).integers(0, spec.vocab_size, args.length).tolist()
        if args.worker == "ferry":
            print(json.dumps(ferry_worker(artifact(args.layers, args.length), prompt, args.threads)))
        elif args.worker == "llamacpp":
            run = llamacpp.worker(llamacpp.gguf(model_dir, "fp32"), prompt, 1, args.threads)
            print(json.dumps({"warm_s": run["prefill_s"], "first_token": run["ids"][0]}))
        else:
            print(json.dumps(transformers_worker(model_dir, prompt, args.threads)))
        return
    for length in args.lengths:
        artifact(args.layers, length)  # converted before any timing
    llama_missing = llamacpp.missing()
    if not llama_missing:
        llamacpp.gguf(model_dir, "fp32")

    from bench.measure import run_worker

    print(f"checkpoint: {model_dir} ({args.layers} layers at real width, BF16 stored, FP32 compute; llama.cpp F32)")
    print(f"threads {args.threads}; Ferry prefill buckets {PREFILL_BUCKETS}; medians of {args.rounds} rounds, "
          f"contenders taking turns")
    print()
    print(f"{'prompt':>7s}{'ferry tok/s':>13s}{'hf tok/s':>10s}{'llama tok/s':>13s}{'ferry/hf':>10s}{'ferry/llama':>13s}"
          f"{'TTFT cold':>11s}{'(load)':>8s}{'TTFT warm':>11s}{'same 1st token':>16s}")
    rounds = []
    for length in args.lengths:
        common = ["--layers", str(args.layers), "--threads", str(args.threads), "--length", str(length)]
        runs = {"ferry": [], "transformers": [], **({} if llama_missing else {"llamacpp": []})}
        for _ in range(args.rounds):
            for name in runs:
                runs[name].append(run_worker(Path(__file__), "--worker", name, *common))
        ferry = {key: float(np.median([run[key] for run in runs["ferry"]])) for key in ("cold_s", "load_s", "warm_s")}
        rates = {name: length / float(np.median([run["warm_s"] for run in done])) for name, done in runs.items()}
        llama_rate = f"{rates['llamacpp']:13.1f}" if "llamacpp" in rates else f"{'-':>13s}"
        llama_ratio = f"{rates['ferry'] / rates['llamacpp']:12.2f}x" if "llamacpp" in rates else f"{'-':>13s}"
        first_tokens = {t for run in runs["ferry"] for t in run["first_token"]}
        first_tokens |= {run["first_token"] for name in runs if name != "ferry" for run in runs[name]}
        print(f"{length:7d}{rates['ferry']:13.1f}{rates['transformers']:10.1f}{llama_rate}"
              f"{rates['ferry'] / rates['transformers']:9.2f}x{llama_ratio}"
              f"{ferry['cold_s']:10.1f}s{ferry['load_s']:7.1f}s{ferry['warm_s']:10.2f}s{str(len(first_tokens) == 1):>16s}")
        rounds.append((length, [hf["warm_s"] / f["warm_s"] for f, hf in zip(runs["ferry"], runs["transformers"])]))
    print()
    for length, ratios in rounds:
        print(f"{length} tokens: ferry / transformers prefill speed per round {', '.join(f'{r:.2f}x' for r in ratios)}")
    if llama_missing:
        print(llama_missing)


if __name__ == "__main__":
    main()
