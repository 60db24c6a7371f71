"""Recording where the router sends tokens: calibration prompts in, a `RoutingTrace` out.

Legend: S steps (one engine launch each: a prefill bucket or one decode token), L layers,
E experts, K experts per token, N token rows of one step, R token rows of all steps.

A `RoutingRecorder` stands in for the engine's dispatcher: it notes the router's top-k of every
`run(layer, x, weights, experts)` call and hands the call on unchanged, so the model computes
exactly what it would without it. `record_routing` runs prompts through prefill and greedy decode
with it in place. From the trace come the tier-calibration inputs (`load_samples`), expert
popularity and the co-activation counts; the same trace feeds the cache benchmarks
(`offload.trace.simulate`).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from app.demo import DEMO_DIR
from offload.trace import RoutingTrace

PROMPTS = Path(__file__).with_name("calibration_prompts.txt")


def resolve_model_dir(model: str | Path) -> Path:
    """A checkpoint directory: "demo" is the trained demo shipped in models/ferry-demo; anything else
    is a path holding a `config.json`."""
    path = DEMO_DIR if str(model) == "demo" else Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a checkpoint directory (no config.json); pass 'demo' or a model dir")
    return path


class RoutingRecorder:
    """Delegates to `dispatcher` and records the top-k expert ids of every call, step by step.

    A step starts when layer 0 is dispatched (the engine runs layers in order once per launch).
    Attributes it does not define (counters, tiers, ...) are the dispatcher's.
    """

    def __init__(self, dispatcher, num_layers: int, num_experts: int, predictor=None, depth: int = 0):
        self.dispatcher = dispatcher
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.predictor, self.depth = predictor, depth  # a RouterPredictor: `depth` next-layer guesses per step
        self.decode = False  # what the next steps are; set by whoever drives the engine
        self._steps: list[list[np.ndarray]] = []  # per step, per layer: experts [N, K]
        self._decode: list[bool] = []
        self._guesses: list[np.ndarray] = []  # per step: [L, depth], -1 where none

    def run(self, layer: int, hidden, x, weights: np.ndarray, experts: np.ndarray):
        experts = np.asarray(experts)
        if layer == 0:
            self._steps.append([])
            self._decode.append(self.decode)
            self._guesses.append(np.full((self.num_layers, self.depth), -1, np.int32))
        if self.predictor is not None and layer + 1 < self.num_layers:  # what the prefetcher would guess
            rows = x.asnumpy() if hasattr(x, "asnumpy") else np.asarray(x)  # a device tensor, or host rows
            guess = self.predictor.predict(layer + 1, rows, self.depth)
            self._guesses[-1][layer + 1, :len(guess)] = guess
        step = self._steps[-1] if self._steps else None
        if step is None or layer != len(step):
            raise RuntimeError(
                f"RoutingRecorder saw layer {layer} after {len(step) if step is not None else 'no'} layers "
                "of the current step; the engine must dispatch layers 0..L-1 in order"
            )
        if step and experts.shape != step[0].shape:
            raise RuntimeError(f"layer {layer} routed {experts.shape} token choices, layer 0 {step[0].shape}")
        step.append(experts.astype(np.int32, copy=True))
        return self.dispatcher.run(layer, hidden, x, weights, experts)

    def __getattr__(self, name: str):
        if name == "dispatcher":  # not set yet (e.g. during unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.dispatcher, name)

    def trace(self) -> RoutingTrace:
        """Everything recorded so far, with per-token top-k ids and the decode flag of each step."""
        if not self._steps:
            raise ValueError("RoutingRecorder recorded no step: run the engine with it in place first")
        if len(self._steps[-1]) != self.num_layers:
            raise ValueError(f"the last step stopped after {len(self._steps[-1])} of {self.num_layers} layers")
        topk = np.concatenate([np.stack(step, axis=1) for step in self._steps])  # [R, L, K]
        step_tokens = np.array([len(step[0]) for step in self._steps], np.int32)  # [S]
        rows = np.repeat(np.arange(len(self._steps)), step_tokens)  # [R]
        k = topk.shape[2]
        tokens = np.zeros((len(self._steps), self.num_layers, self.num_experts), np.int32)
        for layer in range(self.num_layers):
            np.add.at(tokens[:, layer], (np.repeat(rows, k), topk[:, layer].ravel()), 1)
        guesses = np.stack(self._guesses) if self.predictor is not None else None
        return RoutingTrace(tokens, topk=topk, step_tokens=step_tokens, decode=np.array(self._decode, bool),
                            guesses=guesses)


def record_routing(engine, prompts: Iterable[Sequence[int]], decode_tokens: int, predictor=None,
                   depth: int = 0) -> RoutingTrace:
    """Prefill each prompt from a fresh sequence, then `decode_tokens` greedy decode steps, with
    a `RoutingRecorder` in the engine's dispatcher seat; return the trace (with `depth` prefetch
    guesses per step and layer when a `RouterPredictor` is given).

    EOS does not stop decoding: calibration wants a fixed number of decode steps per prompt.
    """
    from runtime.generate import generate

    if decode_tokens < 0:
        raise ValueError(f"decode_tokens must be >= 0, got {decode_tokens}")
    spec = engine.spec
    recorder = RoutingRecorder(engine.dispatcher, spec.num_layers, spec.num_experts, predictor, depth)
    engine.dispatcher = recorder
    try:
        for ids in prompts:
            if len(ids) + decode_tokens > engine.max_context:
                raise ValueError(
                    f"prompt of {len(ids)} tokens + {decode_tokens} decode steps exceeds max_context "
                    f"{engine.max_context}; shorten it (max_prompt_tokens) or raise max_context"
                )
            recorder.decode = False

            def now_decoding(token: int) -> None:
                recorder.decode = True  # every launch after the first token is a decode step

            generate(engine, ids, max_new_tokens=decode_tokens + 1, eos_ids=(), on_token=now_decoding)
    finally:
        engine.dispatcher = recorder.dispatcher
    return recorder.trace()


def load_prompts(path: str | Path | None = None) -> list[str]:
    """Paragraphs of a UTF-8 text file (blank-line separated), or of the shipped prompts."""
    path = Path(path) if path is not None else PROMPTS
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such prompts file")
    paragraphs, current = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            current.append(line)
        elif current:
            paragraphs.append("\n".join(current))
            current = []
    if current:
        paragraphs.append("\n".join(current))
    if not paragraphs:
        raise ValueError(f"{path}: no text in the prompts file")
    return paragraphs


def encode_prompts(texts: Sequence[str], model_dir: str | Path, vocab_size: int,
                   max_prompt_tokens: int | None = None) -> list[list[int]]:
    """Token ids of each text, by the checkpoint's `tokenizer.json`, or, for a checkpoint that has
    none (the random real-width ones), its UTF-8 bytes taken modulo the vocabulary: the router
    then sees real text statistics at the byte level, which is all a random model can use."""
    tokenizer_file = Path(model_dir) / "tokenizer.json"
    if tokenizer_file.is_file():
        from runtime.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(model_dir)
        encoded = [tokenizer.encode(text).ids for text in texts]
    else:
        encoded = [[b % vocab_size for b in text.encode("utf-8")] for text in texts]
    if max_prompt_tokens is not None:
        encoded = [ids[:max_prompt_tokens] for ids in encoded]
    return [ids for ids in encoded if ids]


def load_samples(trace: RoutingTrace, decode: bool | None = None) -> list[np.ndarray]:
    """One per-expert load array per (step, layer): what `app.calibrate.choose_tiers` takes.
    `decode` True or False keeps only decode or only prefill steps (needs the trace's flags)."""
    steps = np.arange(trace.num_steps)
    if decode is not None:
        if trace.decode is None:
            raise ValueError("this trace has no decode flags; record it with record_routing")
        steps = steps[trace.decode == decode]
    return [trace.tokens[s, layer].astype(np.int64) for s in steps for layer in range(trace.num_layers)]


def popularity(trace: RoutingTrace) -> np.ndarray:
    """[L, E] share of each layer's routed tokens that went to each expert (rows sum to 1)."""
    totals = trace.tokens.sum(axis=0, dtype=np.int64)  # [L, E]
    return totals / np.maximum(totals.sum(axis=1, keepdims=True), 1)


def coactivation(trace: RoutingTrace) -> np.ndarray:
    """[L, E, E] counts: entry (l, i, j) is how many tokens chose both experts i and j in layer l;
    the diagonal is each expert's token count. Needs the trace's top-k ids."""
    if trace.topk is None:
        raise ValueError("this trace has no top-k ids; record it with record_routing")
    rows, layers, _ = trace.topk.shape
    counts = np.zeros((layers, trace.num_experts, trace.num_experts), np.int64)
    for layer in range(layers):
        chosen = np.zeros((rows, trace.num_experts), np.float64)  # [R, E] one-hot of each top-k set
        np.put_along_axis(chosen, trace.topk[:, layer].astype(np.int64), 1.0, axis=1)
        counts[layer] = np.rint(chosen.T @ chosen).astype(np.int64)  # exact: integer sums below 2^53
    return counts
