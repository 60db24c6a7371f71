"""A decode token's timeline on a device no machine here has: launches, copies and syncs from the
model's shape, the tiers and a run's expert traffic, priced by a device profile.

Legend: L layers, K experts per token, G slots of a tier, S context length, V vocabulary.

A token does what `runtime.engine` and `offload.dispatch` do, in order: the embedding launch; per
layer the layer graph, a read of the router's choice (the host waits for the device), the copies
of the missed experts into their slots (the copy stream), the expert-group launches, and the
prefetch copies of the next layer's guesses (the copy stream, while the device computes); then the
head launch and the read of the chosen id.

A `TimelineProfile` prices each part:
- a launch costs the host `launch_us + input_us` per input (`python -m bench.launch_overhead`),
  and the device max(bytes / rate, FLOPs / compute rate) for what it reads, at the read rate its
  kind achieves (`gbps`: attention, deltanet, experts, head; kernels differ in how close they come
  to the memory's bandwidth);
- a read back costs `sync_us` once the device is done; each small host array crossing costs
  `transfer_us`; the dispatcher's own work is `plan_us` per layer;
- a copy into a slot takes `block bytes / h2d_gbps` on the copy stream, which runs beside the
  device; an expert launch starts when its copies are done: its misses', and the prefetches made
  for it during the layer before (a `Traffic` counts copies, not which expert each serves, so every
  prefetch is taken as one the next layer waits for);
- `overlap`: the host issues a launch while the device runs the one before (a card: launches are
  asynchronous) or waits for each (MindSpore's CPU backend: a graph call returns when done);
  `copies_overlap`: copies run beside compute (a card's copy engine) or take the device's time (a
  CPU whose cores do both: the prefetch thread's copies compete with the graphs for them).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from artifact.dense import dense_dtype
from artifact.store import block_bytes, block_layout, regions
from model import names
from model.spec import ModelSpec
from offload.crossings import decode_crossings
from offload.tiers import Launch as TierLaunch, TierSet, decode_plan, plan_launches

# layer type -> (its graph's kind, its inputs before the weights: activations, caches, scalars)
LAYER_GRAPHS = {"full_attention": ("attention", 6), "linear_attention": ("deltanet", 4)}
EXPERT_INPUTS = 6  # hidden, x, rows, scale, counts, slots before the expert pool's tensors


@dataclass(frozen=True)
class TimelineProfile:
    name: str
    gbps: dict  # launch kind -> GB/s its graph reads at: attention, deltanet, experts, head (embedding: head's)
    tflops: float  # compute roof of the graphs' compute dtype
    h2d_gbps: float  # a block copied into a slot
    launch_us: float  # host cost of one launch, before its inputs
    input_us: float  # host cost of each launch input
    sync_us: float  # a read back, once the device is done
    transfer_us: float  # each small host array crossing (launch inputs from the host, reads)
    plan_us: float  # the dispatcher's host work for one layer
    overlap: bool  # the host issues launches while the device computes
    copies_overlap: bool = True  # copies run beside compute (a card's copy engine); False: they take its time

    def scaled(self, field: str, factor: float) -> TimelineProfile:
        """The profile with one figure multiplied by `factor` (`gbps`: every kind's)."""
        value = getattr(self, field)
        if isinstance(value, dict):
            return dataclasses.replace(self, **{field: {kind: rate * factor for kind, rate in value.items()}})
        return dataclasses.replace(self, **{field: value * factor})

    def read_s(self, launch: Launch) -> float:
        rate = self.gbps.get(launch.kind, self.gbps["head"])
        return max(launch.bytes / (rate * 1e9), launch.flops / (self.tflops * 1e12))


@dataclass(frozen=True)
class Launch:
    kind: str  # embedding, attention, deltanet, experts, head
    inputs: int
    bytes: float  # read from device memory
    flops: float


@dataclass(frozen=True)
class Traffic:
    """Expert blocks a decode token moves, averaged over a run: per layer, demand copies and prefetch
    copies (used or wasted)."""

    misses_per_layer: float = 0.0
    prefetches_per_layer: float = 0.0


@dataclass(frozen=True)
class Prediction:
    ms_per_token: float
    host_ms: float  # host busy: launches, reads, transfers, planning
    device_ms: float  # device busy: launches
    copy_ms: float  # copy stream busy
    stall_ms: float  # expert launches waiting for their copies

    @property
    def tokens_per_s(self) -> float:
        return 1e3 / self.ms_per_token


def _nbytes(shape: tuple[int, ...], dtype: str) -> int:
    return math.prod(shape) * np.dtype(dtype).itemsize


def step_launches(spec: ModelSpec, tiers: TierSet, expert_dtype: str, target: str, context: int, tokens: int,
                  plans: list[TierLaunch]) -> tuple[Launch, list[tuple[Launch, list[Launch]]], Launch]:
    """(embedding, per layer (layer graph, its expert launches), head) of one launch of `tokens` rows
    over a cache of `context` rows; every layer's experts go in the launches `plans`; weights in the
    artifact's dtypes for `target`. The head computes the last row alone (`LastHead`)."""
    h = spec.hidden_size
    compute = "float32" if target == "cpu" else "float16"
    embed = Launch("embedding", 2, _nbytes((tokens, h), compute), 0.0)
    head_bytes = _nbytes((spec.vocab_size, h), dense_dtype("lm_head", target, expert_dtype))
    head = Launch("head", 4, head_bytes, 2.0 * spec.vocab_size * h)
    parts = block_layout(spec, expert_dtype)
    block = block_bytes(parts)
    pool_tensors = len(regions(parts, block)[0])  # one per storage dtype of a block
    row_flops = 2.0 * 3 * spec.moe_intermediate_size * h  # gate, up, down per routed row
    layers = []
    for layer, kind in enumerate(spec.layer_types):
        weights = names.layer_names(spec, layer)
        nbytes = sum(_nbytes(w.shape, dense_dtype(key, target, expert_dtype)) for key, w in weights.items())
        flops = 2.0 * tokens * sum(w.shape[0] * w.shape[1] for w in weights.values() if len(w.shape) == 2)
        if kind == "full_attention":  # the cached keys and values, one head group each
            cache = 2 * context * spec.num_key_value_heads * spec.head_dim
            nbytes += _nbytes((cache,), compute)
            flops += 2.0 * 2 * tokens * context * spec.num_attention_heads * spec.head_dim
        else:  # the recurrent state, read and written
            state = spec.linear_num_value_heads * spec.linear_key_head_dim * spec.linear_value_head_dim
            nbytes += 2 * state * 4
            flops += 6.0 * tokens * state
        graph_kind, before_weights = LAYER_GRAPHS[kind]
        graph = Launch(graph_kind, before_weights + len(weights), nbytes, flops)
        experts = [Launch("experts", EXPERT_INPUTS + pool_tensors,
                          len(p.pieces) * block, sum(piece.count for piece in p.pieces) * row_flops) for p in plans]
        layers.append((graph, experts))
    return embed, layers, head


def decode_launches(spec: ModelSpec, tiers: TierSet, expert_dtype: str, target: str, context: int
                    ) -> tuple[Launch, list[tuple[Launch, list[Launch]]], Launch]:
    """The launches of one decode token at `context` cached tokens: top-k experts of one row each."""
    return step_launches(spec, tiers, expert_dtype, target, context, 1, decode_plan(spec.num_experts_per_tok, tiers))


def spread_loads(spec: ModelSpec, tokens: int) -> np.ndarray:
    """[E] rows per expert when `tokens` tokens spread their top-k evenly over the experts: a long
    prompt's routing, whose per-expert loads even out (a skewed router makes fewer, fuller launches)."""
    rows = tokens * spec.num_experts_per_tok
    loads = np.full(spec.num_experts, rows // spec.num_experts, np.int64)
    loads[: rows % spec.num_experts] += 1
    return loads


def _timeline(spec: ModelSpec, tiers: TierSet, expert_dtype: str, embed: Launch,
              layers: list[tuple[Launch, list[Launch]]], head: Launch, profile: TimelineProfile,
              traffic: Traffic) -> Prediction:
    """One launch sequence on the three lanes (host, device, copy stream), event by event, with a
    decode token's small transfers and `traffic`'s expert copies."""
    copy_s = block_bytes(block_layout(spec, expert_dtype)) / (profile.h2d_gbps * 1e9)
    transfers = sum(n for _, n, _ in decode_crossings(spec, tiers, greedy=True).values())
    host = device = copies = 0.0  # when each is next free, seconds
    busy = {"host": transfers * profile.transfer_us * 1e-6, "device": 0.0, "copy": 0.0, "stall": 0.0}
    host += busy["host"]

    def launch(item: Launch, ready: float = 0.0) -> None:
        nonlocal host, device
        issue = (profile.launch_us + profile.input_us * item.inputs) * 1e-6
        host += issue
        run = profile.read_s(item)
        start = max(device, host, ready)
        busy["stall"] += max(0.0, ready - max(device, host))
        device = start + run
        busy["host"] += issue
        busy["device"] += run
        if not profile.overlap:  # the call returns when the graph is done
            host = device

    def read_back() -> None:
        nonlocal host
        host = max(host, device) + profile.sync_us * 1e-6
        busy["host"] += profile.sync_us * 1e-6

    def copy(count: float) -> float:
        nonlocal copies, device
        if profile.copies_overlap:
            copies = max(copies, host) + count * copy_s
        else:
            copies = device = max(device, host) + count * copy_s
        busy["copy"] += count * copy_s
        return copies

    launch(embed)
    prefetched = 0.0  # when the copies of the guesses for the coming layer are done
    for graph, experts in layers:
        launch(graph)
        read_back()  # the router's choice
        host += profile.plan_us * 1e-6
        busy["host"] += profile.plan_us * 1e-6
        ready = copy(traffic.misses_per_layer) if traffic.misses_per_layer else prefetched  # queued behind them
        if traffic.prefetches_per_layer:  # the next layer's guesses, handed over before this layer's launches
            prefetched = copy(traffic.prefetches_per_layer)
        for item in experts:
            launch(item, ready)
    launch(head)
    read_back()  # the chosen id
    return Prediction(max(host, device) * 1e3, busy["host"] * 1e3, busy["device"] * 1e3, busy["copy"] * 1e3,
                      busy["stall"] * 1e3)


def predict_decode(spec: ModelSpec, tiers: TierSet, expert_dtype: str, target: str, profile: TimelineProfile,
                   context: int, traffic: Traffic = Traffic()) -> Prediction:
    """The timeline of one greedy decode token: host, device and copy stream, event by event."""
    embed, layers, head = decode_launches(spec, tiers, expert_dtype, target, context)
    return _timeline(spec, tiers, expert_dtype, embed, layers, head, profile, traffic)


@dataclass(frozen=True)
class PrefillPrediction:
    seconds: float  # the whole prompt, to its first token
    launches: int  # chunks of `bucket` tokens
    chunk: Prediction  # one full chunk (ms_per_token is its milliseconds)
    copies_per_layer: float  # expert blocks copied per layer per chunk

    def tokens_per_s(self, prompt: int) -> float:
        return prompt / self.seconds


def predict_prefill(spec: ModelSpec, tiers: TierSet, expert_dtype: str, target: str, profile: TimelineProfile,
                    prompt: int, bucket: int, context: int, resident_share: float,
                    prefetch: bool = True) -> PrefillPrediction:
    """A prompt of `prompt` tokens in launches of `bucket` tokens (the last one padded to a full bucket,
    as the engine pads to its buckets), each over the `context` cache rows. Every chunk routes its
    tokens evenly (`spread_loads`), and every layer's active experts are copied in except the
    `resident_share` of them the pool holds: the most a pool can keep while a prompt sweeps every
    expert of every layer (LRU keeps none). `prefetch`: each layer's copies are issued while the
    layer before computes (a prompt's guesses are easy: almost every expert is active), else after
    its router's choice is read."""
    loads = spread_loads(spec, bucket)
    embed, layers, head = step_launches(spec, tiers, expert_dtype, target, context, bucket,
                                        plan_launches(loads, tiers))
    copies = np.count_nonzero(loads) * (1.0 - resident_share)
    traffic = Traffic(prefetches_per_layer=copies) if prefetch else Traffic(misses_per_layer=copies)
    chunk = _timeline(spec, tiers, expert_dtype, embed, layers, head, profile, traffic)
    launches = -(-prompt // bucket)
    return PrefillPrediction(launches * chunk.ms_per_token / 1e3, launches, chunk, copies)
