"""Routing traces: which experts each layer asked for at each forward step, and replay through a pool.

A trace recorded from real prompts lets eviction policies (Belady's optimum included) and pool
sizes be compared offline, without running the model.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from offload.policies import Key, make_policy
from offload.slots import PoolCounters, SlotPool

FORMAT_VERSION = 1


class TraceError(ValueError):
    """A routing trace is malformed; the message names the file (or source) and the field."""


def _check_tokens(tokens: np.ndarray, source: str) -> None:
    if tokens.ndim != 3:
        raise TraceError(f"{source}: field 'tokens' must be [steps, layers, experts], got shape {tokens.shape}")
    if not np.issubdtype(tokens.dtype, np.integer):
        raise TraceError(f"{source}: field 'tokens' must hold integers, got dtype {tokens.dtype}")
    if tokens.size and tokens.min() < 0:
        raise TraceError(f"{source}: field 'tokens' has negative token counts")


_OPTIONAL = ("topk", "step_tokens", "decode", "guesses")


def _check_details(tokens: np.ndarray, topk, step_tokens, decode, guesses, source: str) -> None:
    """The optional per-token fields agree with `tokens` (see RoutingTrace)."""
    steps, layers, experts = tokens.shape
    if guesses is not None:
        if guesses.ndim != 3 or guesses.shape[:2] != (steps, layers) or not np.issubdtype(guesses.dtype, np.integer):
            raise TraceError(f"{source}: field 'guesses' must be integer [{steps} steps, {layers} layers, depth], "
                             f"got {guesses.dtype} {guesses.shape}")
        if guesses.size and not -1 <= guesses.min() <= guesses.max() < experts:
            raise TraceError(f"{source}: field 'guesses' has expert ids outside [-1, {experts})")
    if decode is not None and (decode.shape != (steps,) or decode.dtype != np.bool_):
        raise TraceError(f"{source}: field 'decode' must be bool [{steps}], got {decode.dtype} {decode.shape}")
    if (topk is None) != (step_tokens is None):
        raise TraceError(f"{source}: fields 'topk' and 'step_tokens' come together; got only one of them")
    if topk is None:
        return
    if step_tokens.shape != (steps,) or not np.issubdtype(step_tokens.dtype, np.integer) or (step_tokens < 0).any():
        raise TraceError(f"{source}: field 'step_tokens' must be non-negative integers [{steps}], got {step_tokens.shape}")
    if topk.ndim != 3 or topk.shape[:2] != (int(step_tokens.sum()), layers) or not np.issubdtype(topk.dtype, np.integer):
        raise TraceError(
            f"{source}: field 'topk' must be integer [{int(step_tokens.sum())} token rows, {layers} layers, k], "
            f"got {topk.dtype} {topk.shape}"
        )
    if topk.size and not 0 <= topk.min() <= topk.max() < experts:
        raise TraceError(f"{source}: field 'topk' has expert ids outside [0, {experts})")
    rows = np.repeat(np.arange(steps), step_tokens)  # [R] step of each token row
    counts = np.zeros(tokens.shape, dtype=np.int64)
    for layer in range(layers):
        np.add.at(counts[:, layer], (np.repeat(rows, topk.shape[2]), topk[:, layer].ravel()), 1)
    if not np.array_equal(counts, tokens):
        raise TraceError(f"{source}: field 'topk' does not count up to field 'tokens'")


@dataclass(frozen=True, eq=False)
class RoutingTrace:
    """`tokens[step, layer, expert]` = tokens routed to that expert; the layer requests the nonzero ones.

    Dense on purpose: 40 KB per step for the full model (40 x 256 int32), simple to check and to
    slice; `.npz` compression absorbs the zeros.

    Optional, recorded by `app.routing` (what co-activation statistics need):
    `topk[row, layer, k]` the router's expert ids for every token row, step-major, R rows in all;
    `step_tokens[step]` how many of those rows each step has (they sum to R); `decode[step]` true
    for a decode step (one new token) and false for a prefill launch.
    `guesses[step, layer, d]` the prefetcher's guesses for that layer, most likely first, made
    from the layer before's MoE input (-1 where there is none: layer 0, or a shorter guess list).
    """

    tokens: np.ndarray
    topk: np.ndarray | None = None
    step_tokens: np.ndarray | None = None
    decode: np.ndarray | None = None
    guesses: np.ndarray | None = None

    def __post_init__(self) -> None:
        _check_tokens(self.tokens, "RoutingTrace")
        _check_details(self.tokens, self.topk, self.step_tokens, self.decode, self.guesses, "RoutingTrace")

    @property
    def num_steps(self) -> int:
        return self.tokens.shape[0]

    @property
    def num_layers(self) -> int:
        return self.tokens.shape[1]

    @property
    def num_experts(self) -> int:
        return self.tokens.shape[2]

    @classmethod
    def from_topk(cls, topk: Sequence[np.ndarray], num_experts: int) -> "RoutingTrace":
        """Build from the router's top-k expert ids, one `[layers, tokens, k]` array per step."""
        steps = []
        for step, ids in enumerate(topk):
            ids = np.asarray(ids)
            if ids.ndim != 3 or not len(ids) or (steps and len(ids) != len(steps[0])):
                raise TraceError(f"from_topk: step {step} ids must be [layers, tokens, k], got shape {ids.shape}")
            if ids.size and not 0 <= ids.min() <= ids.max() < num_experts:
                raise TraceError(f"from_topk: step {step} has expert ids outside [0, {num_experts})")
            steps.append(np.stack([np.bincount(layer.ravel(), minlength=num_experts) for layer in ids]))
        if not steps:
            raise TraceError("from_topk: no steps")
        return cls(np.stack(steps).astype(np.int32))

    def decode_steps(self) -> "RoutingTrace":
        """The decode steps alone, with their guesses: what a pool sees token after token."""
        if self.decode is None:
            raise TraceError("this trace has no decode flags; record it with app.routing.record_routing")
        if not self.decode.any():
            raise TraceError("this trace has no decode steps")
        guesses = None if self.guesses is None else self.guesses[self.decode]
        return RoutingTrace(self.tokens[self.decode], guesses=guesses)

    def launches(self) -> list[tuple[Key, ...]]:
        """One launch per (step, layer), step-major then layer; experts ascending within a launch."""
        return [
            tuple((layer, int(e)) for e in np.flatnonzero(self.tokens[step, layer]))
            for step in range(self.num_steps)
            for layer in range(self.num_layers)
        ]

    def requests(self) -> list[Key]:
        """The key sequence a pool sees replaying this trace: what `Belady` needs."""
        return [key for launch in self.launches() for key in launch]

    def save(self, path: str | Path) -> None:
        optional = {name: getattr(self, name) for name in _OPTIONAL if getattr(self, name) is not None}
        with open(path, "wb") as f:  # a file object keeps numpy from appending '.npz' to the name
            np.savez_compressed(f, tokens=self.tokens, format_version=np.int32(FORMAT_VERSION), **optional)

    @classmethod
    def load(cls, path: str | Path) -> "RoutingTrace":
        try:
            with np.load(path, allow_pickle=False) as data:
                fields = {name: data[name] for name in data.files}
        except FileNotFoundError:
            raise TraceError(f"{path}: no such trace file") from None
        except Exception as err:  # zip, header or pickle errors all mean the same thing here
            raise TraceError(f"{path}: not a readable .npz routing trace ({type(err).__name__}: {err})") from None
        for name in ("format_version", "tokens"):
            if name not in fields:
                raise TraceError(f"{path}: missing field '{name}'")
        version = fields["format_version"]
        if version.shape != () or not np.issubdtype(version.dtype, np.integer) or int(version) != FORMAT_VERSION:
            raise TraceError(f"{path}: field 'format_version' is {version}, expected {FORMAT_VERSION}")
        _check_tokens(fields["tokens"], str(path))
        optional = {name: fields.get(name) for name in _OPTIONAL}
        _check_details(fields["tokens"], **optional, source=str(path))
        return cls(fields["tokens"], **optional)


def simulate(trace: RoutingTrace, policy_name: str, num_slots: int, prefetch: int = 0,
             **policy_kwargs) -> PoolCounters:
    """Replay `trace` launch by launch through a pool whose loads copy nothing; return its counters.
    `prefetch` > 0: after each launch, prefetch the first `prefetch` of the trace's guesses for the
    next layer of the same step, as the engine's prefetcher does while that launch computes."""
    if prefetch and trace.guesses is None:
        raise TraceError("prefetch needs a trace with the prefetcher's guesses (record_routing with guesses)")
    if policy_name == "belady":
        policy_kwargs.setdefault("trace", trace.requests())
    pool = SlotPool(num_slots, make_policy(policy_name, **policy_kwargs), load=lambda key, slot: None)
    layers = trace.num_layers
    for index, launch in enumerate(trace.launches()):
        pool.acquire(launch)
        step, layer = divmod(index, layers)
        if prefetch and layer + 1 < layers:
            for expert in trace.guesses[step, layer + 1, :prefetch]:
                if expert >= 0:
                    pool.prefetch((layer + 1, int(expert)))
    return pool.counters
