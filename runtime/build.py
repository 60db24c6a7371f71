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


def engine_with_offload(model_dir: str | Path, *, budget_bytes: int | None = None,
                        expert_budget_gb: float | None = None, policy: str = "lru",
                        policy_kwargs: dict | None = None, prefetch: bool = False, prefetch_limit: int | None = None,
                        placement: dict | None = None, store: str = "ram", store_path: str | Path | None = None,
                        store_populate: bool = False,
                        tiers: TierSet | None = None, buckets: Buckets = Buckets(), max_context: int = 1024,
                        device_memory_bytes: int | None = None, record_requests: bool = False,
                        host_blas_threads: int | None = 1) -> Engine:
    """An engine whose routed experts stream from a host store into a slot pool of a byte budget.

    Give the budget as `budget_bytes` or `expert_budget_gb` (GiB, as config writes it); it is refused at start
    when it exceeds `device_memory_bytes` (default: this machine's RAM, the CPU backend's device
    memory) or cannot hold the widest tier launch (`offload.budget`). `policy` names an eviction
    policy (`lru`, `lfu`, `decay`, `belady`; belady needs `policy_kwargs={"trace": requests}`, the
    requests of an earlier run made with `record_requests=True`, found in
    `engine.dispatcher.weights.requests`). `prefetch` streams the next layer's likely experts on a
    background thread, `prefetch_limit` of them per layer (default top-k). `placement` is the
    CPU/NPU split config (`offload.placement.placement_from_config`). `store` is `ram` or `mmap`
    (then `store_path` is the block file, written on first use; `store_populate` maps all of it at
    start, see `MappedExpertStore`). Counters: `engine.dispatcher.stats`. When prefetch or host
    compute is on, numpy's BLAS is set to `host_blas_threads` threads for the whole process (1:
    its spinning threads otherwise slow MindSpore's kernels and host experts, see
    `offload.placement`); None leaves it alone.
    """
    from offload.budget import gib, plan_slots
    from offload.counters import OffloadCounters
    from offload.host_store import open_store
    from offload.offloaded import OffloadedExperts
    from offload.placement import limit_blas_threads, measure_costs, placement_from_config
    from offload.policies import make_policy
    from offload.prefetch import Prefetcher, RouterPredictor

    configure()
    if (budget_bytes is None) == (expert_budget_gb is None):
        raise ValueError("give the expert budget as exactly one of budget_bytes and expert_budget_gb")
    checkpoint = Checkpoint(model_dir)
    spec = checkpoint.spec
    tiers = tiers or default_tiers(spec)
    host = open_store(checkpoint, store, store_path, store_populate)
    budget = budget_bytes if budget_bytes is not None else gib(expert_budget_gb)
    plan = plan_slots(budget, host.layout.nbytes, tiers, spec.num_layers * spec.num_experts, device_memory_bytes)
    graphs = CellGraphs(spec, max_context)
    stats = OffloadCounters.create(spec.num_layers, tiers)
    uses_numpy = prefetch or bool(placement and (placement.get("mode") == "auto" or placement.get("host_layers")
                                                 or placement.get("host_experts")))
    if uses_numpy and host_blas_threads is not None:
        limit_blas_threads(host_blas_threads)
    where = placement_from_config(placement, spec.num_layers, spec.num_experts,
                                  measure=lambda: measure_costs(host, tiers, graphs.expert_group))
    experts = OffloadedExperts(host, plan.num_slots, make_policy(policy, **(policy_kwargs or {})), stats,
                               record_requests=record_requests)
    dispatcher = ExpertDispatcher(spec, tiers, experts, graphs, placement=where, host_store=host, stats=stats)
    dense = _RouterKeeper(checkpoint)
    engine = Engine(dense, dispatcher, graphs, buckets, max_context)
    if prefetch:
        predictor = RouterPredictor([dense.routers[layer] for layer in range(spec.num_layers)],
                                    spec.num_experts_per_tok)
        fixed = where.host_layers or where.host_experts  # experts never streamed: not worth guessing
        dispatcher.prefetcher = Prefetcher(predictor, experts.prefetch, spec.num_layers,
                                           prefetch_limit or spec.num_experts_per_tok,
                                           skip=where.fixed_on_host if fixed else None)
    return engine


class _RouterKeeper:
    """The checkpoint as dense weights for the engine, keeping each layer's router [E, H] for prefetch."""

    def __init__(self, checkpoint: Checkpoint):
        self.checkpoint = checkpoint
        self.spec = checkpoint.spec
        self.routers = {}

    def global_weights(self):
        return self.checkpoint.global_weights()

    def layer_weights(self, layer: int):
        weights = self.checkpoint.layer_weights(layer)
        self.routers[layer] = weights["router"]
        return weights


def engine_from_artifact(artifact_dir: str | Path, verify: str = "lazy", expect: ModelSpec | None = None) -> Engine:
    """An engine over a converted artifact: its exported graphs, dense weights and expert store,
    every expert resident (mapped). Tiers, buckets and max_context are the ones it was exported with.
    `verify` as in `Artifact.open`; `expect` refuses an artifact of another model."""
    from convert.artifact import Artifact
    from offload.store_weights import StoreExperts
    from runtime.exported import ExportedGraphs

    configure()
    artifact = Artifact.open(artifact_dir, verify=verify, expect=expect)
    manifest = artifact.manifest
    tiers = from_config([{"capacity": t.capacity, "group": t.group} for t in manifest.tiers])
    graphs = ExportedGraphs(artifact)
    experts = StoreExperts(artifact.experts, verify=verify != "none")
    dispatcher = ExpertDispatcher(artifact.spec, tiers, experts, graphs)
    return Engine(artifact, dispatcher, graphs, Buckets(manifest.buckets), manifest.max_context)
