"""Prefill speed at Qwen3.6-35B-A3B's real layer widths, Ferry against transformers, one run.

    python bench/prefill.py            # prompts of 128 and 1024 tokens, 4 layers

For each prompt length: prefill tokens/s of Ferry (the FP32 artifact, as run.py converts it, all
experts resident) and of transformers eager (same checkpoint, threads and prompt), and Ferry's time
to first token cold (a fresh process: artifact open, graph load and compilation, prefill) and warm
(graphs compiled). Each model runs in
its own process; both run `--rounds` times, alternating, and the medians are printed (single runs
swing by +-30% on shared machines).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench.realwidth import PREFILL_BUCKETS, real_width_artifact, real_width_checkpoint, real_width_spec  # noqa: E402


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
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 1024])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--worker", choices=["ferry", "transformers"], help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    model_dir = real_width_checkpoint(args.layers)
    spec = real_width_spec(args.layers)
    if args.worker:
        prompt = np.random.default_rng(99).integers(0, spec.vocab_size, args.length).tolist()
        if args.worker == "ferry":
            print(json.dumps(ferry_worker(real_width_artifact("fp32", args.layers), prompt, args.threads)))
        else:
            print(json.dumps(transformers_worker(model_dir, prompt, args.threads)))
        return
    real_width_artifact("fp32", args.layers)  # converted before any timing

    from bench.measure import run_worker

    print(f"checkpoint: {model_dir} ({args.layers} layers at real width, BF16 stored, FP32 compute)")
    print(f"threads {args.threads}; Ferry prefill buckets {PREFILL_BUCKETS}; medians of {args.rounds} alternating rounds")
    print()
    print(f"{'prompt':>7s}{'ferry tok/s':>13s}{'hf tok/s':>10s}{'ferry/hf':>10s}{'TTFT cold':>11s}"
          f"{'(load)':>8s}{'TTFT warm':>11s}{'same 1st token':>16s}")
    for length in args.lengths:
        common = ["--layers", str(args.layers), "--threads", str(args.threads), "--length", str(length)]
        ferry_runs, hf_runs = [], []
        for _ in range(args.rounds):
            ferry_runs.append(run_worker(Path(__file__), "--worker", "ferry", *common))
            hf_runs.append(run_worker(Path(__file__), "--worker", "transformers", *common))
        ferry = {key: float(np.median([run[key] for run in ferry_runs])) for key in ("cold_s", "load_s", "warm_s")}
        hf_warm = float(np.median([run["warm_s"] for run in hf_runs]))
        ferry_rate, hf_rate = length / ferry["warm_s"], length / hf_warm
        first_tokens = {t for run in ferry_runs for t in run["first_token"]} | {run["first_token"] for run in hf_runs}
        same = len(first_tokens) == 1
        print(f"{length:7d}{ferry_rate:13.1f}{hf_rate:10.1f}{ferry_rate / hf_rate:9.2f}x"
              f"{ferry['cold_s']:10.1f}s{ferry['load_s']:7.1f}s{ferry['warm_s']:10.2f}s{str(same):>16s}")


if __name__ == "__main__":
    main()
