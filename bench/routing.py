"""Learned routing: statistics, caching policies against Belady, prefetch and storage precision, on
the trained demo model over held-out text it never saw.

    python bench/routing.py                            # models/ferry-demo over its heldout.txt
    python bench/routing.py --model DIR --text FILE    # any checkpoint with a tokenizer.json

The held-out text is cut into `--segments` windows of `--length` tokens. Each window runs through
Ferry's FP32 artifact one token at a time (teacher forcing: every step is a decode step whose input
is the text's next token, so the router sees real text, not the model's own greedy loops), with the
router's top-k and the prefetcher's guess for the next layer recorded at every layer.

From that trace:
1. per-layer statistics: how concentrated expert popularity is, how often a token reuses the
   experts of the token before it, how strongly pairs of experts co-activate;
2. the per-layer LRU hit-rate curve at 1/16, 1/8, 1/4 and 1/2 of each layer's experts, with the
   offline optimum (Belady) beside it, next to the curve published for Qwen3-30B-A3B;
3. one slot pool over all layers (what Ferry runs): MB streamed per token for every policy against
   Belady at several budgets, without and with prefetch, and how often prefetch guessed right;
4. the same windows prefilled through FP32, FP16 and INT8 artifacts: held-out perplexity, and
   greedy continuations of `--greedy` tokens from each window's first 32 tokens against FP32.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from artifact.reader import Artifact  # noqa: E402
from bench.offload import part_one, recall, record  # noqa: E402
from bench.realwidth import bench_artifact  # noqa: E402
from app.plan import expert_block_bytes  # noqa: E402
from offload.policies import make_policy  # noqa: E402
from offload.prefetch import RouterPredictor  # noqa: E402
from offload.slots import SlotPool  # noqa: E402
from offload.trace import RoutingTrace  # noqa: E402
from runtime.backend import configure  # noqa: E402
from runtime.build import engine_from_artifact  # noqa: E402
from runtime.generate import generate  # noqa: E402
from runtime.tokenizer import load_tokenizer  # noqa: E402

from app.demo import DEMO_DIR as DEMO  # noqa: E402
FRACTIONS = (16, 8, 4, 2)  # each layer's cache holds 1/F of its experts
# Qwen3-30B-A3B, per-layer LRU with 8/16/32/64 of its 128 experts (hit %), and the offline optimum.
PUBLISHED_LRU = (42.4, 64.7, 81.0, 91.8)
PUBLISHED_OPTIMUM = (60.8, 78.4, 88.8, 92.9)
DTYPES = ("fp32", "fp16", "int8")
PROMPT = 32  # tokens of each window that start a greedy continuation


def windows(model_dir: Path, text: Path, segments: int, length: int) -> list[list[int]]:
    """`segments` windows of `length` tokens, spread evenly over the tokenized text."""
    ids = load_tokenizer(model_dir).encode(text.read_text(encoding="utf-8")).ids
    if len(ids) < segments * length:
        raise SystemExit(f"error: {text} has {len(ids)} tokens, fewer than --segments x --length = "
                         f"{segments * length}")
    starts = np.linspace(0, len(ids) - length, segments).astype(int)
    return [ids[s:s + length] for s in starts]


def lookahead_routers(layers: Sequence[Mapping[str, np.ndarray]]) -> list[np.ndarray]:
    """Each layer's router [E, H], rescaled to read the previous layer's MoE input, which is what a
    prefetch guess has in hand (a candidate for `offload.prefetch`, measured here; it guessed no
    better than the plain routers, so the prefetcher keeps those): that input is normalised with the previous layer's post-attention
    norm (scale 1 + w_prev), the router's own input with its layer's (1 + w). Undoing the one and
    applying the other folds into the router's columns, once, so the guess costs nothing more; what it
    cannot see is the residual update in between (the previous layer's experts, this layer's mixer).
    Layer 0's router is kept (nothing comes before it); a column whose previous scale is 0 is dropped."""
    routers = [np.ascontiguousarray(layers[0]["router"], np.float32)]
    for prev, layer in zip(layers, layers[1:]):
        before = 1.0 + prev["post_attn_norm"].astype(np.float64)  # [H]
        after = 1.0 + layer["post_attn_norm"].astype(np.float64)  # [H]
        ratio = np.divide(after, before, out=np.zeros_like(after), where=np.abs(before) > 1e-6)
        routers.append((layer["router"] * ratio[None, :]).astype(np.float32))
    return routers


class BothGuesses:
    """The predictor `record` calls: it answers with the plain routers' guess (what Ferry's prefetch
    ran with before), and keeps the lookahead routers' guess for the same input beside it."""

    def __init__(self, layers: list[dict], top_k: int):
        self.plain = RouterPredictor([w["router"] for w in layers], top_k)
        self.lookahead = RouterPredictor(lookahead_routers(layers), top_k)
        self.lookahead_guesses: list[list[int]] = []  # in call order

    def predict(self, layer: int, x: np.ndarray, limit: int) -> list[int]:
        self.lookahead_guesses.append(self.lookahead.predict(layer, x, limit))
        return self.plain.predict(layer, x, limit)


def teacher_forced(engine, segments: list[list[int]]) -> None:
    for ids in segments:
        engine.reset()
        for token in ids:
            engine.forward([token])


# ---- 1. statistics ----------------------------------------------------------------------------------

def chosen(trace: RoutingTrace) -> np.ndarray:
    """[T, L, K] expert ids of every teacher-forced token at every layer, ascending (a one-token step
    routes to K distinct experts)."""
    steps, layers, _ = trace.tokens.shape
    return np.nonzero(trace.tokens)[2].reshape(steps, layers, -1).astype(np.int64)


def statistics(sets: np.ndarray, num_experts: int, breaks: list[int]) -> None:
    tokens, layers, k = sets.shape
    print(f"\n== 1. Routing statistics: {tokens} tokens x {layers} layers, top-{k} of {num_experts} ==")
    print("top-10% share: routed tokens taken by the most popular tenth of the experts (uniform: 10%)")
    print("entropy: of expert popularity, as a fraction of log(E) (uniform: 1.00)")
    print(f"reuse: a token's experts also chosen by the token before it (independent choice: {100 * k / num_experts:.1f}%)")
    print("top pair lift: the most frequent expert pair's count over what independent choices would give")
    print(f"{'layer':>5} {'top-10% share':>13} {'entropy':>8} {'reuse':>6} {'top pair lift':>13} {'dead experts':>12}")
    keep = np.ones(tokens, bool)
    keep[breaks] = False  # the first token of each window has no predecessor in the text
    for layer in range(layers):
        counts = np.bincount(sets[:, layer].ravel(), minlength=num_experts).astype(np.float64)
        share = counts / counts.sum()
        top = np.sort(share)[::-1][: max(1, num_experts // 10)].sum()
        nz = share[share > 0]
        entropy = float(-(nz * np.log(nz)).sum() / np.log(num_experts))
        onehot = np.zeros((tokens, num_experts), np.float64)
        np.put_along_axis(onehot, sets[:, layer], 1.0, axis=1)
        reuse = (onehot[1:] * onehot[:-1]).sum(axis=1)[keep[1:]].mean() / k
        pairs = onehot.T @ onehot
        np.fill_diagonal(pairs, 0)
        expected = np.outer(counts, counts) / tokens
        np.fill_diagonal(expected, np.inf)
        i, j = np.unravel_index(np.argmax(pairs), pairs.shape)
        lift = pairs[i, j] / expected[i, j]
        print(f"{layer:>5} {100 * top:>12.1f}% {entropy:>8.2f} {100 * reuse:>5.1f}% {lift:>13.1f} "
              f"{int((counts == 0).sum()):>12}")


# ---- 2. per-layer LRU curve -------------------------------------------------------------------------

def layer_hit_rate(sets: np.ndarray, layer: int, slots: int, policy: str) -> float:
    requests = [(layer, int(e)) for row in sets[:, layer] for e in sorted(row)]
    kwargs = {"trace": requests} if policy == "belady" else {}
    pool = SlotPool(slots, make_policy(policy, **kwargs), load=lambda key, slot: None)
    for key in requests:  # one request at a time: a cache of 1/16 may hold fewer experts than a token's top-k
        pool.acquire([key])
    return pool.counters.hits / pool.counters.requests


def hit_curve(sets: np.ndarray, num_experts: int) -> None:
    layers = sets.shape[1]
    print(f"\n== 2. Per-layer cache hit rate (each layer its own cache), mean over {layers} layers ==")
    print(f"{'cache':>10} {'LRU':>6} {'optimum':>8} {'LFU':>6} {'decay':>6}   "
          f"{'Qwen3-30B-A3B LRU':>17} {'optimum':>8}  (of 128 experts)")
    for f, lru_pub, opt_pub in zip(FRACTIONS, PUBLISHED_LRU, PUBLISHED_OPTIMUM):
        slots = num_experts // f
        rates = {p: 100 * np.mean([layer_hit_rate(sets, layer, slots, p) for layer in range(layers)])
                 for p in ("lru", "belady", "lfu", "decay")}
        print(f"{'1/' + str(f) + f' ({slots})':>10} {rates['lru']:>5.1f}% {rates['belady']:>7.1f}% "
              f"{rates['lfu']:>5.1f}% {rates['decay']:>5.1f}%   {lru_pub:>16.1f}% {opt_pub:>7.1f}%")


# ---- 4. precision -----------------------------------------------------------------------------------

def perplexity(engine, segments: list[list[int]]) -> float:
    nll, count = 0.0, 0
    for ids in segments:
        engine.reset()
        logits = engine.forward(ids, all_logits=True)[: len(ids) - 1].astype(np.float64)  # [T-1, V]
        top = logits.max(axis=1, keepdims=True)
        logp = logits - top - np.log(np.exp(logits - top).sum(axis=1, keepdims=True))
        nll -= logp[np.arange(len(ids) - 1), ids[1:]].sum()
        count += len(ids) - 1
    return float(np.exp(nll / count))


def precision(model_dir: Path, segments: list[list[int]], greedy: int, length: int) -> None:
    print(f"\n== 4. Expert storage precision: {len(segments)} windows of {length} held-out tokens ==")
    print(f"greedy: {greedy} tokens from each window's first {PROMPT} tokens, against FP32's")
    print(f"{'experts':>8} {'perplexity':>11} {'vs fp32':>8} {'same continuations':>19} {'tokens before divergence':>25}")
    reference = None
    for dtype in DTYPES:
        engine = engine_from_artifact(bench_artifact(model_dir, dtype))
        try:
            ppl = perplexity(engine, segments)
            outs = []
            for ids in segments:
                engine.reset()
                outs.append(generate(engine, ids[:PROMPT], greedy, eos_ids=()).token_ids)
        finally:
            engine.close()
        if reference is None:
            reference = (ppl, outs)
        same = sum(a == b for a, b in zip(outs, reference[1]))
        agree = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)) for a, b in zip(outs, reference[1])]
        print(f"{dtype:>8} {ppl:>11.3f} {100 * (ppl / reference[0] - 1):>+7.2f}% {same:>10} of {len(outs):<6} "
              f"{sum(agree) / sum(len(o) for o in outs) * 100:>23.1f}%", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=DEMO)
    parser.add_argument("--text", type=Path, help="held-out text (default: the model directory's heldout.txt)")
    parser.add_argument("--segments", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--greedy", type=int, default=32)
    args = parser.parse_args()
    configure()
    text = args.text or args.model / "heldout.txt"
    segments = windows(args.model, text, args.segments, args.length)
    artifact = bench_artifact(args.model, "fp32")
    dense = Artifact.open(artifact)
    spec = dense.spec
    k = spec.num_experts_per_tok
    limits = (k, k + k // 4, k + k // 2)  # prefetch widths replayed: top-k, and wider guesses
    predictor = BothGuesses([dense.layer_weights(i) for i in range(spec.num_layers)], spec.num_experts_per_tok)
    engine = engine_from_artifact(artifact)
    start = time.perf_counter()
    try:
        trace = record(engine, predictor, lambda: teacher_forced(engine, segments), max(limits))
    finally:
        engine.close()
    print(f"{args.model}: {spec.num_layers} layers, {spec.num_experts} experts top-{spec.num_experts_per_tok}; "
          f"{len(segments)} windows of {args.length} tokens of {text} recorded in {time.perf_counter() - start:.0f} s")
    sets = chosen(trace)
    lookahead = np.full_like(trace.guesses, -1)  # [T, L, depth]: the lookahead routers' guesses, in call order
    for call, guess in enumerate(predictor.lookahead_guesses):
        step, layer = divmod(call, spec.num_layers - 1)
        lookahead[step, layer + 1, :len(guess)] = guess
    statistics(sets, spec.num_experts, [i * args.length for i in range(len(segments))])
    hit_curve(sets, spec.num_experts)
    total = spec.num_layers * spec.num_experts
    print("\n== 3. One slot pool over all layers (Ferry's), FP32 blocks ==", end="")
    part_one(trace, spec, [total // 16, total // 8, total // 4, total // 2], expert_block_bytes(spec, "fp32"), limits)
    print(f"{k} guesses of the lookahead routers (norm scales folded in) name "
          f"{100 * recall(replace(trace, guesses=lookahead), k):.0f}% (plain routers: {100 * recall(trace, k):.0f}%)")
    precision(args.model, segments, args.greedy, args.length)


if __name__ == "__main__":
    main()
