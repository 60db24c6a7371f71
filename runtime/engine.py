"""The per-step launch loop: embedding, each layer's graph, its routed experts, the head.

Legend: T tokens in a launch (a static bucket), N real tokens (N <= T), H hidden, V vocabulary,
S cache capacity (max context), P rotary dims.

A prompt is cut into launches of the bucket sizes compiled in advance; the last launch of a prompt
is padded and the graphs ignore the padding (`n_valid`). Dense weights stay as device tensors for
the whole run, and so does the hidden state from the embedding to the head: per layer only the
router's choice is read back, for the `ExpertDispatcher` to plan the routed experts' launches, which
add their outputs on the device. The dispatcher is told the wall time of every launch (the offload
counters read stall time as a fraction of it).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from artifact.manifest import kv_cache_rows
from model.spec import ModelSpec
from graphs.deltanet import CHUNK
from graphs.layer import ATTENTION_WEIGHTS, DELTANET_WEIGHTS
from offload.device import DeviceMemory
from offload.dispatch import ExpertDispatcher
from runtime.graph_set import GraphSet


class DenseWeights(Protocol):
    spec: ModelSpec

    def global_weights(self) -> dict[str, np.ndarray]: ...

    def layer_weights(self, layer: int) -> dict[str, np.ndarray]: ...


@dataclass(frozen=True)
class Buckets:
    """Launch sizes compiled ahead of time: 1 for decode, the rest for prefill."""

    prefill: tuple[int, ...] = (16, 64)

    def __post_init__(self):
        sizes = self.prefill
        if not sizes or list(sizes) != sorted(set(sizes)) or sizes[0] < 1:
            raise ValueError(f"prefill buckets must be positive, sorted and distinct, got {list(sizes)}")
        for size in sizes:
            if size > CHUNK and size % CHUNK:
                raise ValueError(f"prefill bucket {size} must be below {CHUNK} or a multiple of it (DeltaNet chunk)")

    def pick(self, remaining: int) -> int:
        """Smallest bucket holding the remaining tokens, or the largest bucket for a long prompt."""
        if remaining == 1:
            return 1
        for size in self.prefill:
            if size >= remaining:
                return size
        return self.prefill[-1]


def rope_tables(spec: ModelSpec, length: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin [length, P] for positions 0..length-1, halves duplicated as in the reference."""
    dim = spec.rotary_dim
    inv_freq = 1.0 / (spec.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    freqs = np.arange(length, dtype=np.float32)[:, None] * inv_freq[None, :]  # [length, P/2]
    angles = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


class SequenceState:
    """Where one sequence stands: its length, and the DeltaNet states (FP32), device tensors each launch
    takes and replaces with its outputs. The KV caches are the engine's (see `Engine`)."""

    def __init__(self, spec: ModelSpec, device: DeviceMemory):
        device.ledger.sequence_starts()
        conv_shape = (spec.linear_conv_kernel_dim - 1, spec.conv_dim)
        rec_shape = (spec.linear_num_value_heads, spec.linear_key_head_dim, spec.linear_value_head_dim)
        self.length = 0
        self.conv, self.recurrent = {}, {}
        for layer, kind in enumerate(spec.layer_types):
            if kind == "linear_attention":  # zeros, once per sequence
                self.conv[layer] = device.upload("state reset", np.zeros(conv_shape, np.float32))
                self.recurrent[layer] = device.upload("state reset", np.zeros(rec_shape, np.float32))


class Engine:
    """Runs the model one launch at a time over a `SequenceState`.

    The KV caches are device tensors of `kv_cache_rows` rows per attention layer, allocated once and
    updated in place by the attention graphs; rows past the sequence's length are masked, so a new
    sequence reuses them without clearing.
    """

    def __init__(self, weights: DenseWeights, dispatcher: ExpertDispatcher, graphs: GraphSet,
                 buckets: Buckets = Buckets(), max_context: int = 1024, kv_dtype=np.float32):
        self.spec = spec = weights.spec
        self.dispatcher = dispatcher
        self.graphs = graphs
        self.buckets = buckets
        self.max_context = max_context
        self.device = device = dispatcher.device
        globals_ = weights.global_weights()
        self.embed_table = device.resident(globals_["embed"])
        self.final_norm = device.resident(globals_["final_norm"])
        # a tied head reads the embedding's tensor: one copy on the device
        self.lm_head = (self.embed_table if globals_["lm_head"] is globals_["embed"]
                        else device.resident(globals_["lm_head"]))
        self.layers = []
        for layer, kind in enumerate(spec.layer_types):
            names = ATTENTION_WEIGHTS if kind == "full_attention" else DELTANET_WEIGHTS
            dense = weights.layer_weights(layer)
            self.layers.append(tuple(device.resident(dense[name]) for name in names))
        rows = kv_cache_rows(max_context, max(buckets.prefill))  # every position a launch (padding too) reaches
        self.cos, self.sin = rope_tables(spec, rows)
        kv_shape = (rows, spec.num_key_value_heads, spec.head_dim)
        attention = [layer for layer, kind in enumerate(spec.layer_types) if kind == "full_attention"]
        # allocated once, before anything is counted (on a card: device memory, cleared there)
        self.keys = {layer: device.zeros(kv_shape, kv_dtype) for layer in attention}
        self.values = {layer: device.zeros(kv_shape, kv_dtype) for layer in attention}
        self.state = SequenceState(spec, device)

    def reset(self) -> None:
        self.state = SequenceState(self.spec, self.device)

    def close(self) -> None:
        """Stop the dispatcher's background work (the prefetch thread, when there is one)."""
        self.dispatcher.close()

    def forward(self, ids, all_logits: bool = False) -> np.ndarray:
        """Feed token ids; return logits of the last one [V], or of every one [N, V]."""
        return self._feed(ids, "all" if all_logits else "last")

    def next_greedy(self, ids) -> int:
        """Feed token ids; return the id of the largest logit after the last one, chosen on the device:
        one int32 is read back instead of the vocabulary's logits."""
        return int(self._feed(ids, "greedy"))

    def _feed(self, ids, out: str) -> np.ndarray:
        """Run `ids` in bucket-sized launches; what comes back is `_run_launch`'s `out` of the last one
        (its last row), or every launch's logits for "all"."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            raise ValueError("forward needs at least one token id")
        if ids.min() < 0 or ids.max() >= self.spec.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.spec.vocab_size}), got {ids.min()}..{ids.max()}")
        if self.state.length + ids.size > self.max_context:
            raise ValueError(
                f"sequence of {self.state.length + ids.size} tokens exceeds max_context {self.max_context}"
            )
        pieces = []
        start = 0
        while start < ids.size:
            tokens = self.buckets.pick(ids.size - start)
            count = min(tokens, ids.size - start)
            pieces.append(self._launch(ids[start : start + count], tokens, out))
            start += count
        return np.concatenate(pieces) if out == "all" else pieces[-1][-1]

    def _launch(self, ids: np.ndarray, tokens: int, out: str) -> np.ndarray:
        start = time.perf_counter()
        result = self._run_launch(ids, tokens, out)
        self.dispatcher.step_done(ids.size, time.perf_counter() - start)
        return result

    def _run_launch(self, ids: np.ndarray, tokens: int, out: str) -> np.ndarray:
        """One launch; `out`: "all" logits [N, V], "last" logits [1, V], "greedy" the last one's choice [1]."""
        n, state, d = ids.size, self.state, self.device
        c = d.ledger
        c.launch(n, decode=tokens == 1)
        attention, deltanet = self.graphs.attention(tokens), self.graphs.deltanet(tokens)
        padded = np.zeros(tokens, np.int32)
        padded[:n] = ids
        h = self.graphs.embedding(tokens)(d.upload("token ids", padded), self.embed_table)  # [T, H]
        c.launched()
        position = state.length
        cos = d.upload("rope tables", self.cos[position : position + tokens])  # [T, P]
        sin = d.upload("rope tables", self.sin[position : position + tokens])
        n_valid = d.scalar("scalars", n)
        cache_len = d.scalar("scalars", position)
        for layer, weights in enumerate(self.layers):
            if layer in self.keys:  # the caches are updated in place: nothing crosses
                partial, x_moe, top_w, top_e = attention(h, cos, sin, self.keys[layer], self.values[layer], cache_len,
                                                         *weights)
            else:
                partial, x_moe, top_w, top_e, state.conv[layer], state.recurrent[layer] = deltanet(
                    h, state.conv[layer], state.recurrent[layer], n_valid, *weights)
            c.launched()
            h = self.dispatcher.run(layer, partial, x_moe, d.download("router choice", top_w)[:n],
                                    d.download("router choice", top_e)[:n])  # [T, H], on the device
        state.length += n
        c.launched()  # the head
        if out == "all":
            return d.download("logits", self.graphs.head(tokens)(h, self.final_norm, self.lm_head)[0])[:n]  # [N, V]
        row = d.upload("last row", np.array([n - 1], np.int32))
        logits, choice = self.graphs.last_head(tokens)(h, row, self.final_norm, self.lm_head)  # [1, V], [1]
        return d.download("next token", choice) if out == "greedy" else d.download("logits", logits)
