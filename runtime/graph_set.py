"""Where the engine's launchable graphs come from: Cells compiled on first use, or exported MindIR.

Legend: T tokens in a launch, G slots and C capacity of a tier.
A Cell compiles once per input shape, so one instance serves every T.
Both sources hand out callables with the Cells' signatures, so the launch loop does not care
which one it runs.
"""
from __future__ import annotations

import functools
from dataclasses import replace
from typing import Callable, Protocol

from artifact.store import block_bytes, block_layout, part_offsets
from model.spec import ModelSpec
from graphs.embed_head import Embedding, Head, LastHead
from graphs.layer import AttentionLayer, DeltaNetLayer
from graphs.moe import ExpertGroup, ExpertLaunch
from offload.tiers import Tier


class GraphSet(Protocol):
    def attention(self, tokens: int) -> Callable: ...

    def deltanet(self, tokens: int) -> Callable: ...

    def embedding(self, tokens: int) -> Callable: ...

    def head(self, tokens: int) -> Callable: ...

    def last_head(self, tokens: int) -> Callable: ...

    def expert_group(self, tier: Tier, tokens: int) -> Callable: ...


def graph_spec(spec: ModelSpec) -> ModelSpec:
    """The spec with the fields no layer graph depends on blanked, as a key for sharing Cells."""
    return replace(spec, vocab_size=0, num_layers=0, layer_types=(), tie_word_embeddings=False, eos_token_ids=())


@functools.cache
def _attention(spec: ModelSpec, tokens: int) -> AttentionLayer:
    return AttentionLayer(spec, tokens)


@functools.cache
def _deltanet(spec: ModelSpec, tokens: int) -> DeltaNetLayer:
    return DeltaNetLayer(spec, tokens)


@functools.cache
def _expert_group(slots: int, intermediate: int) -> ExpertGroup:
    return ExpertGroup(slots, intermediate)


@functools.cache
def _expert_launch(spec: ModelSpec, slots: int) -> ExpertLaunch:
    """Over FP32 blocks (`offload.dispatch.BlockArray`: the checkpoint's experts as a store lays them out)."""
    parts = block_layout(spec, "fp32")
    return ExpertLaunch(_expert_group(slots, spec.moe_intermediate_size), spec.hidden_size,
                        part_offsets(parts, block_bytes(parts)))


@functools.cache
def _head(eps: float) -> Head:
    return Head(eps)


@functools.cache
def _last_head(eps: float) -> LastHead:
    return LastHead(eps)


_EMBEDDING = Embedding()


class CellGraphs:
    """Cells compiled by MindSpore on first call at each shape.

    Instances are shared between engines whose graphs have the same shapes (MindSpore keeps
    compiled graphs per Cell instance), so tests and sweeps compile each shape once per process.
    """

    def __init__(self, spec: ModelSpec):
        self.spec = graph_spec(spec)

    def attention(self, tokens: int) -> AttentionLayer:
        return _attention(self.spec, tokens)

    def deltanet(self, tokens: int) -> DeltaNetLayer:
        return _deltanet(self.spec, tokens)

    def embedding(self, tokens: int) -> Embedding:
        return _EMBEDDING

    def head(self, tokens: int) -> Head:
        return _head(self.spec.rms_norm_eps)

    def last_head(self, tokens: int) -> LastHead:
        return _last_head(self.spec.rms_norm_eps)

    def expert_group(self, tier: Tier, tokens: int) -> ExpertLaunch:
        return _expert_launch(self.spec, tier.group)
