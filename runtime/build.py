"""Assemble an engine: from an artifact (what every run does), or from an HF checkpoint's eager Cells
(the reference path the tests hold against transformers)."""
from __future__ import annotations

from pathlib import Path

from model.checkpoint import Checkpoint
from model.spec import ModelSpec
from offload.device import DeviceMemory
from offload.dispatch import ExpertDispatcher, ResidentExperts
from offload.residence import Residence
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
                           max_context: int = 1024, memory: str = "shared") -> Engine:
    """Eager Cells over an HF checkpoint read into memory, every expert resident in FP32: the
    reference engine of the tests (small checkpoints only); runs go through artifacts."""
    configure()
    checkpoint = Checkpoint(model_dir)
    spec = checkpoint.spec
    device = DeviceMemory(memory)
    experts = ResidentExperts(spec, [checkpoint.layer_experts(layer) for layer in range(spec.num_layers)], device)
    graphs = CellGraphs(spec)
    dispatcher = ExpertDispatcher(spec, tiers or default_tiers(spec), experts, graphs, device)
    return Engine(checkpoint, dispatcher, graphs, buckets, max_context)


def engine_from_artifact(artifact_dir: str | Path, residence: Residence | None = None, *, verify: str = "lazy",
                         expect: ModelSpec | None = None, policy_kwargs: dict | None = None,
                         prefetch_limit: int | None = None, record_requests: bool = False,
                         host_blas_threads: int | None = 1, memory: str = "shared",
                         device: DeviceMemory | None = None) -> Engine:
    """An engine over a converted artifact: its exported graphs, dense weights and expert store, with
    the experts where `residence` (`offload.residence`) puts them; None: every expert resident.

    Resident: the store is mapped and each block is used in place. Streamed: a pool of
    `residence.slots` slots in the store's block format, filled from `experts.bin` by `pread`,
    evicted by `residence.policy` (`belady` needs `policy_kwargs={"trace": requests}`, the requests
    of an earlier run made with `record_requests=True`, in `engine.dispatcher.weights.requests`);
    prefetch takes each layer's router from the artifact's dense weights and streams up to
    `prefetch_limit` experts (default top-k) of the next layer; host compute reads blocks from the
    store in its storage dtype. Tiers, buckets and max_context are the ones it was exported with.
    `verify` as in `Artifact.open`; `expect` refuses an artifact of another model. `memory` is the memory
    model (`offload.device`: `shared` or `apart`); `device` a `DeviceMemory` to use instead (tests). When prefetch or
    host compute is on, numpy's BLAS is set to `host_blas_threads` threads for the whole process (1:
    its spinning threads otherwise slow MindSpore's kernels and host experts, see `offload.placement`).
    """
    from artifact.reader import Artifact
    from runtime.exported import ExportedGraphs

    configure()
    artifact = Artifact.open(artifact_dir, verify=verify, expect=expect)
    manifest, spec = artifact.manifest, artifact.spec
    tiers = from_config([{"capacity": t.capacity, "group": t.group} for t in manifest.tiers])
    graphs = ExportedGraphs(artifact)
    device = device or DeviceMemory(memory)
    if residence is None or not residence.streams:
        from offload.store_weights import StoreExperts

        experts = StoreExperts(artifact.experts, device, verify=verify != "none")
        dispatcher = ExpertDispatcher(spec, tiers, experts, graphs, device)
    else:
        dispatcher = _streaming_dispatcher(artifact, tiers, graphs, device, residence, policy_kwargs, prefetch_limit,
                                           record_requests, host_blas_threads)
    return Engine(artifact, dispatcher, graphs, Buckets(manifest.buckets), manifest.max_context, artifact.kv_dtype)


def _streaming_dispatcher(artifact, tiers: TierSet, graphs, device: DeviceMemory, residence: Residence, policy_kwargs,
                          prefetch_limit, record_requests, host_blas_threads) -> ExpertDispatcher:
    from offload.counters import OffloadCounters
    from offload.offloaded import OffloadedExperts
    from offload.placement import limit_blas_threads, measure_costs, placement_from_config
    from offload.policies import make_policy
    from offload.prefetch import Prefetcher, RouterPredictor

    spec, store = artifact.spec, artifact.experts
    widest = max(t.group for t in tiers)
    if residence.slots < widest:
        raise ValueError(f"a pool of {residence.slots} expert slots cannot hold the widest tier launch "
                         f"({widest} experts at once)")
    stats = OffloadCounters.create(spec.num_layers, tiers)
    if (residence.prefetch or residence.host_compute) and host_blas_threads is not None:
        limit_blas_threads(host_blas_threads)
    where = placement_from_config(residence.host_compute, spec.num_layers, spec.num_experts,
                                  measure=lambda: measure_costs(store, tiers, graphs.expert_group,
                                                                max(artifact.manifest.launch_sizes()), device))
    experts = OffloadedExperts(store, residence.slots, make_policy(residence.policy, **(policy_kwargs or {})), stats,
                               record_requests=record_requests, device=device)
    dispatcher = ExpertDispatcher(spec, tiers, experts, graphs, device, placement=where, host_store=store, stats=stats)
    if residence.prefetch:
        predictor = RouterPredictor([artifact.layer_weights(layer)["router"] for layer in range(spec.num_layers)],
                                    spec.num_experts_per_tok)
        fixed = where.host_layers or where.host_experts  # experts never streamed: not worth guessing
        dispatcher.prefetcher = Prefetcher(predictor, experts.prefetch, spec.num_layers,
                                           prefetch_limit or spec.num_experts_per_tok,
                                           skip=where.fixed_on_host if fixed else None)
    return dispatcher
