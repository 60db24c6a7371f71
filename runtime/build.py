"""Assemble an engine from an HF checkpoint directory, every expert resident."""
from __future__ import annotations

from pathlib import Path

from convert.checkpoint import Checkpoint
from convert.spec import ModelSpec
from offload.dispatch import ExpertDispatcher, ResidentExperts
from offload.tiers import TierSet, from_config
from runtime.backend import configure
from runtime.engine import Buckets, Engine
from runtime.graph_set import CellGraphs


def default_tiers(spec: ModelSpec) -> TierSet:
    """Decode puts one token on each of top-k experts: one launch of K slots of capacity 1.
    Prefill spreads more tokens per expert: a mid tier and a wide one."""
    k = spec.num_experts_per_tok
    return from_config([{"capacity": 1, "group": k}, {"capacity": 8, "group": 4}, {"capacity": 64, "group": 2}])


def engine_from_checkpoint(model_dir: str | Path, tiers: TierSet | None = None, buckets: Buckets = Buckets(),
                           max_context: int = 1024) -> Engine:
    configure()
    checkpoint = Checkpoint(model_dir)
    spec = checkpoint.spec
    experts = ResidentExperts([checkpoint.layer_experts(layer) for layer in range(spec.num_layers)])
    graphs = CellGraphs(spec, max_context)
    dispatcher = ExpertDispatcher(spec, tiers or default_tiers(spec), experts, graphs)
    return Engine(checkpoint, dispatcher, graphs, buckets, max_context)
