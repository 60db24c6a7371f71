"""Device memory plan: does a model, at a context length, with a placement, fit a device?

Legend: L layers (La attention, Ld DeltaNet), H hidden, V vocabulary, E experts per layer, K experts
per token, I expert width, S max context, T largest prefill bucket, b bytes per compute element.

Adds up what a run keeps on the device before the first token: the dense weights (everything that
is not a routed expert, resident for the whole run), the pool of expert slots (sized by the
placement's budget, or every expert), the KV cache of the attention layers for S tokens, the
DeltaNet conv and recurrent states, the activations of the largest launch, and a reserve for the
runtime itself. A plan that does not fit says which figure breaks it and the largest setting that
would fit, so a run can be refused before anything is loaded.

Sizes are in GiB (2^30 bytes), as the `*_gb` config fields are; bandwidths in GB/s (10^9 bytes/s).
The workspace is an estimate: the activations of the largest launch, counted from the graph
shapes, doubled for the temporaries a compiler keeps alive. The reserve is the device profile's.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from convert.names import global_names, layer_names
from convert.spec import ModelSpec
from offload.tiers import TierSet

GIB = 1 << 30
DTYPE_BYTES = {"float32": 4, "float16": 2}
STATE_BYTES = 4  # DeltaNet states stay FP32: the recurrence accumulates over the whole sequence
DELTANET_CHUNK = 64  # graphs.deltanet.CHUNK, repeated so planning does not import MindSpore
AUTO, ALL = "auto", "all"  # expert budgets: the largest pool that fits; every expert resident


@dataclass(frozen=True)
class DeviceProfile:
    """What a run may use on one device. memory and reserve in bytes."""

    name: str
    backend: str  # MindSpore device target: CPU, Ascend
    memory_bytes: int
    reserved_bytes: int
    compute_dtype: str
    h2d_gbps: float | None = None  # host-to-device copy from pinned memory; None: no copy (CPU)
    memory_gbps: float | None = None  # device memory bandwidth, for the decode floor

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.compute_dtype]


@dataclass(frozen=True)
class Placement:
    """Where experts live and compute: a budget in GiB, `auto` or `all`; the rest steers offload."""

    expert_budget_gb: float | str = AUTO
    policy: str = "lru"
    prefetch: bool = False
    host_compute: str | tuple[int, ...] = "never"

    @property
    def budget_label(self) -> str:
        budget = self.expert_budget_gb
        return budget if isinstance(budget, str) else f"{budget:g} GiB"


@dataclass(frozen=True)
class PlanItem:
    name: str
    bytes: int
    detail: str


@dataclass
class MemoryPlan:
    title: str
    device: DeviceProfile
    max_context: int
    items: list[PlanItem]
    expert_bytes: int
    total_experts: int
    slots: int
    problems: list[str] = field(default_factory=list)  # why it does not fit; empty when it fits
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(item.bytes for item in self.items)

    @property
    def fits(self) -> bool:
        return not self.problems

    @property
    def all_resident(self) -> bool:
        return self.slots >= self.total_experts

    def item(self, name: str) -> PlanItem:
        return next(item for item in self.items if item.name == name)

    def to_dict(self) -> dict:
        return {
            "title": self.title, "device": asdict(self.device), "max_context": self.max_context,
            "items": [asdict(item) for item in self.items], "total_bytes": self.total,
            "expert_bytes": self.expert_bytes, "slots": self.slots, "total_experts": self.total_experts,
            "fits": self.fits, "problems": self.problems, "notes": self.notes,
        }

    def format(self) -> str:
        width = max(len(item.name) for item in self.items)
        lines = [self.title]
        for item in self.items:
            lines.append(f"  {item.name:<{width}}  {size(item.bytes):>10}  {item.detail}")
        lines.append(f"  {'-' * (width + 12)}")
        free = self.device.memory_bytes - self.total
        verdict = "fits" if self.fits else "DOES NOT FIT" if free < 0 else "REFUSED"
        room = f"{size(free)} free" if free >= 0 else f"over by {size(-free)}"
        lines.append(f"  {'total':<{width}}  {size(self.total):>10}  of {size(self.device.memory_bytes)}: "
                     f"{verdict} ({room})")
        lines += [f"  {note}" for note in self.notes]
        lines += [f"  problem: {problem}" for problem in self.problems]
        return "\n".join(lines)


def size(nbytes: float) -> str:
    """GiB for anything from 1 GiB up, MiB below."""
    if abs(nbytes) >= GIB:
        return f"{nbytes / GIB:.2f} GiB"
    return f"{nbytes / (1 << 20):.1f} MiB"


def count(n: int) -> str:
    """A parameter count: 2.45 B, 14.2 M."""
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def _params(names: dict) -> int:
    return sum(math.prod(weight.shape) for weight in names.values())


def dense_params(spec: ModelSpec) -> tuple[int, int]:
    """(embedding + head + final norm, all layers) parameters that are not routed experts."""
    table = dict(global_names(spec))
    if spec.tie_word_embeddings:
        table.pop("lm_head")
    layers = sum(_params(layer_names(spec, layer)) for layer in range(spec.num_layers))
    return _params(table), layers


def workspace_elements(spec: ModelSpec, tokens: int, max_context: int, tiers: TierSet) -> tuple[int, str]:
    """Largest activation footprint of one launch (elements), and which launch it is."""
    h, n, kv, d = spec.hidden_size, spec.num_attention_heads, spec.num_key_value_heads, spec.head_dim
    hv, dk, dv = spec.linear_num_value_heads, spec.linear_key_head_dim, spec.linear_value_head_dim
    candidates = {}
    for t in sorted({1, tokens}):
        chunk = min(t, DELTANET_CHUNK)
        moe_input = t * (spec.num_experts + 3 * spec.shared_expert_intermediate_size + 2 * h)
        candidates[f"attention, {t} tokens over {max_context} cached"] = (
            t * (2 * h + 3 * n * d + 2 * kv * d) + 2 * n * t * (max_context + t) + moe_input)
        candidates[f"DeltaNet, {t} tokens"] = (
            t * (2 * h + 2 * spec.conv_dim + 2 * spec.linear_value_dim + 2 * hv)
            + 3 * hv * chunk * chunk + 2 * hv * dk * dv + moe_input)
    for tier in tiers:
        candidates[f"expert group [{tier.group} x {tier.capacity}]"] = (
            tier.group * tier.capacity * (2 * h + 3 * spec.moe_intermediate_size))
    candidates["head, 1 token"] = spec.vocab_size + h
    name = max(candidates, key=candidates.get)
    return candidates[name], name


def plan_memory(spec: ModelSpec, device: DeviceProfile, placement: Placement, max_context: int,
                prefill_tokens: int, tiers: TierSet, model_name: str) -> MemoryPlan:
    """The plan of a run: every item on the device, and what breaks it if it does not fit."""
    b = device.dtype_bytes
    kinds = spec.layer_types
    attention_layers = kinds.count("full_attention")
    deltanet_layers = len(kinds) - attention_layers
    edge, layers = dense_params(spec)
    expert_bytes = spec.expert_params * b
    total_experts = spec.num_layers * spec.num_experts
    kv_bytes = attention_layers * 2 * max_context * spec.num_key_value_heads * spec.head_dim * b
    conv = (spec.linear_conv_kernel_dim - 1) * spec.conv_dim
    recurrent = spec.linear_num_value_heads * spec.linear_key_head_dim * spec.linear_value_head_dim
    work, work_name = workspace_elements(spec, prefill_tokens, max_context, tiers)
    dtype = device.compute_dtype.replace("float", "FP")
    fixed = [
        PlanItem("dense weights", (edge + layers) * b,
                 f"{count(edge + layers)} params, {dtype}: embedding + head {count(edge)}, "
                 f"{spec.num_layers} layers {count(layers)}"),
        PlanItem("KV cache", kv_bytes,
                 f"{attention_layers} attention layers x K,V x {max_context} tokens x {spec.num_key_value_heads} "
                 f"heads x {spec.head_dim}, {dtype}"),
        PlanItem("DeltaNet state", deltanet_layers * (conv + recurrent) * STATE_BYTES,
                 f"{deltanet_layers} layers x (conv {spec.linear_conv_kernel_dim - 1}x{spec.conv_dim} + recurrent "
                 f"{spec.linear_num_value_heads}x{spec.linear_key_head_dim}x{spec.linear_value_head_dim}), FP32"),
        PlanItem("workspace", 2 * work * b, f"2 x largest launch: {work_name}"),
        PlanItem("runtime reserve", device.reserved_bytes, f"{device.name} profile (reserved_gb)"),
    ]
    fixed_bytes = sum(item.bytes for item in fixed)
    room = device.memory_bytes - fixed_bytes  # what is left for expert slots
    min_slots = max(tier.group for tier in tiers)  # one launch of the widest tier needs its G experts in place
    budget = placement.expert_budget_gb
    if budget == ALL:
        slots = total_experts
    elif budget == AUTO:
        slots = max(0, min(room // expert_bytes, total_experts))
    else:
        slots = min(int(budget * GIB) // expert_bytes, total_experts)
    share = f"{slots} of {total_experts} experts ({100 * slots / total_experts:.1f}%)"
    pool = PlanItem("expert slot pool", slots * expert_bytes,
                    f"{share} x {size(expert_bytes)}, budget {placement.budget_label}")
    items = fixed[:1] + [pool] + fixed[1:]
    title = (f"Memory plan: {model_name} on {device.name} ({size(device.memory_bytes)}), "
             f"context {max_context} tokens, {dtype} compute")
    plan = MemoryPlan(title, device, max_context, items, expert_bytes, total_experts, slots)

    largest_fit = max(0, min(room // expert_bytes, total_experts))
    smallest_pool = min_slots * expert_bytes
    if largest_fit < min_slots:  # nothing to choose: the rest leaves no room for one launch's experts
        biggest = max(fixed, key=lambda item: item.bytes)
        plan.problems.append(
            f"{device.name} has {size(device.memory_bytes)}; everything but the experts takes {size(fixed_bytes)} "
            f"(largest: {biggest.name} {size(biggest.bytes)}), leaving {size(max(room, 0))} for expert slots, less "
            f"than the {min_slots} slots ({size(smallest_pool)}) the widest tier launches at once; lower "
            f"max_context (KV cache {size(kv_bytes)}) or use a larger device")
    elif slots < min_slots:
        plan.problems.append(
            f"placement.expert_budget_gb={placement.budget_label} holds {slots} expert slot(s) of {size(expert_bytes)}; "
            f"the widest tier launches {min_slots} experts at once, so the pool needs at least {size(smallest_pool)}")
    elif plan.total > device.memory_bytes:
        largest = math.floor(largest_fit * expert_bytes / GIB * 100) / 100
        plan.problems.append(
            f"needs {size(plan.total)}, {device.name} has {size(device.memory_bytes)}: the expert slot pool "
            f"({size(pool.bytes)}, {share}) is too large; the largest expert budget that fits is {largest:.2f} GiB "
            f"({largest_fit} slots): placement.expert_budget_gb=<= that, or auto")
    plan.notes += _traffic_notes(spec, device, plan, edge, layers, kv_bytes)
    return plan


def _traffic_notes(spec: ModelSpec, device: DeviceProfile, plan: MemoryPlan, edge: int, layers: int,
                   kv_bytes: int) -> list[str]:
    b, expert_bytes = device.dtype_bytes, plan.expert_bytes
    per_token = spec.num_layers * spec.num_experts_per_tok  # routed experts one decode token touches
    notes = []
    if plan.all_resident:
        notes.append(f"experts: all {plan.total_experts} resident, nothing streams")
    else:
        notes.append(f"experts: {plan.total_experts} in host memory ({size(plan.total_experts * expert_bytes)}), "
                     f"{plan.slots} slots on the device")
        if device.h2d_gbps:
            one = expert_bytes / (device.h2d_gbps * 1e9)
            notes.append(f"streaming: one expert in {one * 1e6:.0f} us at {device.h2d_gbps:g} GB/s; a decode token "
                         f"routes to {per_token} experts ({per_token * expert_bytes / 1e9:.2f} GB): "
                         f"{per_token * one * 1e3:.0f} ms if every one misses")
    if device.memory_gbps:
        embedding_unread = 0 if spec.tie_word_embeddings else spec.vocab_size * spec.hidden_size  # one row is read
        head_and_layers = (layers + edge - embedding_unread) * b
        read = head_and_layers + per_token * expert_bytes + kv_bytes
        seconds = read / (device.memory_gbps * 1e9)
        notes.append(f"decode floor at full context: {read / 1e9:.2f} GB read per token at {device.memory_gbps:g} "
                     f"GB/s = {seconds * 1e3:.1f} ms (at most {1 / seconds:.0f} tokens/s)")
    return notes
