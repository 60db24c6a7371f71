"""The artifact's static graphs: which ones, their input/output signatures, and their MindIR export.

Legend: T launch tokens, S cache capacity (max context), H hidden, V vocabulary, K experts per
token, P rotary dims, KV key/value heads, D head dim, W conv width, C conv channels (DeltaNet),
Hv/Dk/Dv DeltaNet value heads / key dim / value dim, G slots and Ce capacity of an expert tier.

Every Cell takes its weights as inputs (nothing is a Parameter), so one graph per (kind, launch
size) serves every layer of that kind, and one expert-group graph per (tier, launch size) serves
every expert.
A graph is exported from zero-filled inputs of its exact shapes: `np.zeros` maps untouched zero
pages, so even the [V, H] tables of the real model cost no memory here.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model import names
from artifact.dense import dense_dtype
from artifact.manifest import ANY, FileRecord, GraphRecord, TensorSig, TierRecord, kv_cache_rows
from model.spec import ModelSpec
from artifact.store import block_bytes, block_layout, part_offsets, regions

GRAPH_DIR = "graphs"


@dataclass(frozen=True)
class GraphPlan:
    name: str
    kind: str
    tokens: int
    tier: TierRecord | None
    inputs: tuple[TensorSig, ...]
    outputs: tuple[TensorSig, ...]

    @property
    def path(self) -> str:
        return f"{GRAPH_DIR}/{self.name}.mindir"


def _f32(*shape: int) -> TensorSig:
    return TensorSig(tuple(shape), "float32")


def _compute(target: str, *shape: int) -> TensorSig:
    """A tensor in the target's compute dtype (the KV cache): FP32 on the CPU, FP16 on the 310P3."""
    return TensorSig(tuple(shape), "float32" if target == "cpu" else "float16")


def _i32(*shape: int) -> TensorSig:
    return TensorSig(tuple(shape), "int32")


def _layer_weights(spec: ModelSpec, kind: str, order: tuple[str, ...], target: str,
                   expert_dtype: str) -> tuple[TensorSig, ...]:
    layer = spec.layer_types.index(kind)
    table = names.layer_names(spec, layer)
    return tuple(TensorSig(table[key].shape, dense_dtype(key, target, expert_dtype)) for key in order)


def _moe_outputs(spec: ModelSpec, t: int) -> tuple[TensorSig, ...]:
    h, k = spec.hidden_size, spec.num_experts_per_tok
    return _f32(t, h), _f32(t, h), _f32(t, k), _i32(t, k)  # partial, x_moe, top-k weights, top-k experts


def graph_plans(spec: ModelSpec, buckets: tuple[int, ...], tiers: tuple[TierRecord, ...], max_context: int,
                expert_dtype: str, target: str = "cpu") -> list[GraphPlan]:
    """Every graph an artifact holds, with the signatures the runtime will call it with."""
    from graphs.layer import ATTENTION_WEIGHTS, DELTANET_WEIGHTS

    h, v, s = spec.hidden_size, spec.vocab_size, max_context
    kv, d, p = spec.num_key_value_heads, spec.head_dim, spec.rotary_dim
    sizes = (1,) + tuple(b for b in buckets if b != 1)
    plans = []
    for t in sizes:
        table = TensorSig((v, h), dense_dtype("embed", target, expert_dtype))  # = lm_head's
        plans.append(GraphPlan(f"embedding_t{t}", "embedding", t, None, (_i32(t), table), (_f32(t, h),)))
        plans.append(GraphPlan(f"head_t{t}", "head", t, None, (_f32(t, h), _f32(h), table), (_f32(t, v), _i32(t))))
        plans.append(GraphPlan(f"last_head_t{t}", "last_head", t, None, (_f32(t, h), _i32(1), _f32(h), table),
                               (_f32(1, v), _i32(1))))
    if "full_attention" in spec.layer_types:
        weights = _layer_weights(spec, "full_attention", ATTENTION_WEIGHTS, target, expert_dtype)
        cache = _compute(target, kv_cache_rows(s, max(sizes)), kv, d)  # updated in place
        for t in sizes:
            inputs = (_f32(t, h), _f32(t, p), _f32(t, p), cache, cache, _i32()) + weights
            plans.append(GraphPlan(f"attention_t{t}", "attention", t, None, inputs, _moe_outputs(spec, t)))
    if "linear_attention" in spec.layer_types:
        weights = _layer_weights(spec, "linear_attention", DELTANET_WEIGHTS, target, expert_dtype)
        conv = _f32(spec.linear_conv_kernel_dim - 1, spec.conv_dim)
        rec = _f32(spec.linear_num_value_heads, spec.linear_key_head_dim, spec.linear_value_head_dim)
        for t in sizes:
            inputs = (_f32(t, h), conv, rec, _i32()) + weights
            plans.append(GraphPlan(f"deltanet_t{t}", "deltanet", t, None, inputs, _moe_outputs(spec, t) + (conv, rec)))
    parts = block_layout(spec, expert_dtype)
    pool_regions, _ = regions(parts, block_bytes(parts))
    pool = tuple(TensorSig((ANY, ANY), region.dtype.name) for region in pool_regions)  # [S, R] each, the run's
    for tier in tiers:
        g, c = tier.group, tier.capacity
        for t in sizes:  # hidden, x, rows, scale, counts, slots, pool -> hidden
            inputs = (_f32(t, h), _f32(t, h), _i32(g, c), _f32(g, c), _i32(g), _i32(g)) + pool
            plans.append(GraphPlan(f"experts_{expert_dtype}_g{g}_c{c}_t{t}", "expert_group", t, tier, inputs,
                                   (_f32(t, h),)))
    return plans


def build_cell(plan: GraphPlan, spec: ModelSpec, expert_dtype: str, target: str = "cpu"):
    """The Cell a plan exports (the same classes the eager engine runs); only a cpu artifact's expert
    groups, decode layer launches and the last-row head call Ferry's CPU kernels."""
    from graphs.embed_head import Embedding, Head, LastHead
    from graphs.layer import AttentionLayer, DeltaNetLayer
    from graphs.moe import GROUPS, ExpertLaunch

    if plan.kind == "embedding":
        return Embedding()
    if plan.kind == "head":
        return Head(spec.rms_norm_eps, cpu_kernels=target == "cpu")
    if plan.kind == "last_head":
        return LastHead(spec.rms_norm_eps, cpu_kernels=target == "cpu")
    if plan.kind == "attention":
        return AttentionLayer(spec, plan.tokens, cpu_kernels=target == "cpu")
    if plan.kind == "deltanet":
        return DeltaNetLayer(spec, plan.tokens, cpu_kernels=target == "cpu")
    parts = block_layout(spec, expert_dtype)
    return ExpertLaunch(GROUPS[expert_dtype](plan.tier.group, spec.moe_intermediate_size, cpu_kernels=target == "cpu"),
                        spec.hidden_size, part_offsets(parts, block_bytes(parts)))


def zero_inputs(signature: tuple[TensorSig, ...]) -> list:
    """Inputs to export a graph with: zeros of each shape, or a shape-only tensor where a dimension is ANY."""
    import mindspore as ms

    return [ms.Tensor(shape=[None if d == ANY else d for d in sig.shape], dtype=getattr(ms, sig.dtype))
            if ANY in sig.shape else ms.Tensor.from_numpy(np.zeros(sig.shape, sig.dtype)) for sig in signature]


# MindIR bytes of graphs already exported by this process, by everything a graph depends on, so
# that converting one model to several storage formats (benchmarks, tests) exports each graph once.
_EXPORTED: dict[tuple, bytes] = {}


def export_graph(plan: GraphPlan, spec: ModelSpec, expert_dtype: str, root: Path, target: str = "cpu") -> GraphRecord:
    """Export one graph as `root / plan.path` and return its manifest record; an expert group that calls
    Ferry's CPU kernels is recorded without a file (see `artifact.manifest.GraphRecord.file`)."""
    import mindspore as ms
    from runtime.graph_set import graph_spec  # the spec with fields no layer graph depends on blanked

    if plan.kind == "expert_group" and build_cell(plan, spec, expert_dtype, target).use_kernel:
        return GraphRecord(plan.name, plan.kind, plan.tokens, plan.tier, None, plan.inputs, plan.outputs)
    path = root / plan.path
    path.parent.mkdir(parents=True, exist_ok=True)
    key = (plan, graph_spec(spec), expert_dtype if plan.kind == "expert_group" else None, target)  # plan: signatures
    if key in _EXPORTED:
        path.write_bytes(_EXPORTED[key])
    else:
        cell = build_cell(plan, spec, expert_dtype, target)
        ms.export(cell, *zero_inputs(plan.inputs), file_name=str(path.with_suffix("")), file_format="MINDIR")
        if not path.is_file():
            raise RuntimeError(f"mindspore.export did not write {path}")
        _EXPORTED[key] = path.read_bytes()
    return GraphRecord(plan.name, plan.kind, plan.tokens, plan.tier, file_record(root, plan.path),
                       plan.inputs, plan.outputs)


def file_record(root: Path, relative: str) -> FileRecord:
    from artifact.reader import sha256_of

    path = root / relative
    return FileRecord(relative, path.stat().st_size, sha256_of(path))
