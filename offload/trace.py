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


@dataclass(frozen=True, eq=False)
class RoutingTrace:
    """`tokens[step, layer, expert]` = tokens routed to that expert; the layer requests the nonzero ones.

    Dense on purpose: 40 KB per step for the full model (40 x 256 int32), simple to check and to
    slice; `.npz` compression absorbs the zeros.
    """

    tokens: np.ndarray

    def __post_init__(self) -> None:
        _check_tokens(self.tokens, "RoutingTrace")

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
        with open(path, "wb") as f:  # a file object keeps numpy from appending '.npz' to the name
            np.savez_compressed(f, tokens=self.tokens, format_version=np.int32(FORMAT_VERSION))

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
        return cls(fields["tokens"])


def simulate(trace: RoutingTrace, policy_name: str, num_slots: int, **policy_kwargs) -> PoolCounters:
    """Replay `trace` launch by launch through a pool whose loads copy nothing; return its counters."""
    if policy_name == "belady":
        policy_kwargs.setdefault("trace", trace.requests())
    pool = SlotPool(num_slots, make_policy(policy_name, **policy_kwargs), load=lambda key, slot: None)
    for launch in trace.launches():
        pool.acquire(launch)
    return pool.counters
