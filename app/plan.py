"""Memory plan: does a model, at a context length, with a placement, fit the device and the host?

Legend: L layers (La attention, Ld DeltaNet), H hidden, V vocabulary, E experts per layer, K experts
per token, I expert width, S max context, T largest prefill bucket, b bytes per compute element.

Adds up what a run keeps on the device before the first token: the dense weights (everything that
is not a routed expert, resident for the whole run), the expert blocks on the device (the slot
pool `offload.residence` decides, or every expert), the KV cache of the attention layers for S
tokens, the DeltaNet conv and recurrent states, the activations of the largest launch, and a
reserve for the runtime itself; and what the host must hold beside it (its own runtime, pinned
staging for streamed blocks). Expert blocks are the artifact's, in its storage dtype (fp32, fp16,
int8 with scales), at the store's page-aligned stride. The host store itself is read from the
artifact's `experts.bin` through the page cache, which the OS may drop: it is not counted as
resident, only its disk size is noted. On the CPU backend host and device are one memory, so the
two sides are added together and checked against it. A plan that does not fit says which figure
breaks it and the largest setting that would fit, so a run can be refused before anything is loaded.

Sizes are in GiB (2^30 bytes), as the `*_gb` config fields are; bandwidths in GB/s (10^9 bytes/s).
The workspace is an estimate: the activations of the largest launch, counted from the graph
shapes, doubled for the temporaries a compiler keeps alive. The reserve is the device profile's.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from model.names import global_names, layer_names
from model.spec import ModelSpec
from artifact.dense import dense_dtype
from artifact.manifest import kv_cache_rows
from artifact.store import block_layout, block_stride
from offload.policies import DEFAULT_POLICY
from offload.residence import ALL, AUTO, Residence, decide
from offload.tiers import TierSet

GIB = 1 << 30
DTYPE_BYTES = {"float32": 4, "float16": 2}
STATE_BYTES = 4  # DeltaNet states stay FP32: the recurrence accumulates over the whole sequence
DELTANET_CHUNK = 64  # graphs.deltanet.CHUNK, repeated so planning does not import MindSpore


# offload.device.MODELS, named here so that reading a config does not load MindSpore (tests hold them equal)
MEMORY_MODELS = ("shared", "apart")


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
    expert_dtype: str = "fp32"  # the expert storage this device's artifacts use by default
    host_memory_bytes: int | None = None  # None: the host is the device (CPU backend)
    host_reserved_bytes: int = 0  # Python, MindSpore and the driver on the host, beside a card
    memory: str = "shared"  # the memory model (offload.device): shared (host is device) or apart (a card's)

    @property
    def host_is_device(self) -> bool:
        return self.host_memory_bytes is None

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.compute_dtype]

    @property
    def target(self) -> str:
        """The artifact target whose graphs run here: `cpu` on the CPU backend, else the device's name."""
        return "cpu" if self.backend == "CPU" else self.name


@dataclass(frozen=True)
class Placement:
    """Where experts live and compute: a budget in GiB, `auto` or `all`; the rest steers offload."""

    expert_budget_gb: float | str = AUTO
    policy: str = DEFAULT_POLICY
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
    host_items: list[PlanItem]  # what the host holds beside the device (on the CPU backend: the same memory)
    residence: Residence
    expert_bytes: int  # one block at the store's stride, in its storage dtype
    expert_dtype: str
    problems: list[str] = field(default_factory=list)  # why it does not fit; empty when it fits
    notes: list[str] = field(default_factory=list)

    @property
    def total_experts(self) -> int:
        return self.residence.total_experts

    @property
    def slots(self) -> int:
        return self.residence.device_experts

    @property
    def device_total(self) -> int:
        return sum(item.bytes for item in self.items)

    @property
    def host_total(self) -> int:
        return sum(item.bytes for item in self.host_items)

    @property
    def total(self) -> int:
        """What the run needs in the memory it is checked against: on the CPU backend both sides."""
        return self.device_total + (self.host_total if self.device.host_is_device else 0)

    @property
    def fits(self) -> bool:
        return not self.problems

    def item(self, name: str) -> PlanItem:
        return next(item for item in self.items if item.name == name)

    def to_dict(self) -> dict:
        return {
            "title": self.title, "device": asdict(self.device), "max_context": self.max_context,
            "items": [asdict(item) for item in self.items], "host_items": [asdict(item) for item in self.host_items],
            "total_bytes": self.total, "device_bytes": self.device_total, "host_bytes": self.host_total,
            "expert_bytes": self.expert_bytes, "expert_dtype": self.expert_dtype, "slots": self.slots,
            "total_experts": self.total_experts, "streams": self.residence.streams,
            "fits": self.fits, "problems": self.problems, "notes": self.notes,
        }

    def format(self) -> str:
        width = max(len(item.name) for item in self.items + self.host_items)
        lines = [self.title]
        one_memory = self.device.host_is_device
        host_label = "host (the same memory)" if one_memory else f"host ({size(self.device.host_memory_bytes)})"
        for heading, items in (("device", self.items), (host_label, self.host_items)):
            lines.append(f" {heading}")
            lines += [f"  {item.name:<{width}}  {size(item.bytes):>10}  {item.detail}" for item in items]
        lines.append(f"  {'-' * (width + 12)}")
        checks = [("total", self.total, self.device.memory_bytes)]
        if not one_memory:
            checks = [("device total", self.device_total, self.device.memory_bytes),
                      ("host total", self.host_total, self.device.host_memory_bytes)]
        for name, used, capacity in checks:
            free = capacity - used
            verdict = "fits" if self.fits else "DOES NOT FIT" if free < 0 else "REFUSED"
            room = f"{size(free)} free" if free >= 0 else f"over by {size(-free)}"
            lines.append(f"  {name:<{width}}  {size(used):>10}  of {size(capacity)}: {verdict} ({room})")
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


def expert_block_bytes(spec: ModelSpec, expert_dtype: str) -> int:
    """One expert block of the store in `expert_dtype`, at its page-aligned stride: a slot's size."""
    return block_stride(block_layout(spec, expert_dtype))


def plan_memory(spec: ModelSpec, device: DeviceProfile, placement: Placement, max_context: int,
                prefill_tokens: int, tiers: TierSet, model_name: str, expert_dtype: str | None = None) -> MemoryPlan:
    """The plan of a run: every item on the device and on the host, and what breaks it if it does not fit.

    `expert_dtype` is the storage of the expert blocks (the artifact's; default the device's)."""
    b = device.dtype_bytes
    expert_dtype = expert_dtype or device.expert_dtype
    dense = dense_dtype("embed", device.target, expert_dtype)  # the matrices' (the few norm vectors are FP32)
    dense_b = DTYPE_BYTES[dense]
    kinds = spec.layer_types
    attention_layers = kinds.count("full_attention")
    deltanet_layers = len(kinds) - attention_layers
    edge, layers = dense_params(spec)
    expert_bytes = expert_block_bytes(spec, expert_dtype)
    total_experts = spec.num_layers * spec.num_experts
    kv_rows = kv_cache_rows(max_context, prefill_tokens)  # as the engine allocates them: padding rows too
    kv_bytes = attention_layers * 2 * kv_rows * spec.num_key_value_heads * spec.head_dim * b
    conv = (spec.linear_conv_kernel_dim - 1) * spec.conv_dim
    recurrent = spec.linear_num_value_heads * spec.linear_key_head_dim * spec.linear_value_head_dim
    work, work_name = workspace_elements(spec, prefill_tokens, max_context, tiers)
    dtype = device.compute_dtype.replace("float", "FP")
    dense_label = dense.replace("float", "FP")
    # On the CPU backend in the shared memory model the untied embedding table is used where it lies in the
    # mapped dense file: a token reads one row, so the table is page cache the OS may drop, not memory the run
    # holds. (Tied, the head reads all of it every token.) A card, and `apart`, hold it with the other dense
    # weights.
    shared = device.host_is_device and device.memory == "shared"
    mapped_embedding = spec.vocab_size * spec.hidden_size if shared and not spec.tie_word_embeddings else 0
    held = edge + layers - mapped_embedding
    fixed = [
        PlanItem("dense weights", held * dense_b,
                 f"{count(held)} params, {dense_label}: " + ("head" if mapped_embedding else "embedding + head")
                 + f" {count(edge - mapped_embedding)}, {spec.num_layers} layers {count(layers)}"),
        PlanItem("KV cache", kv_bytes,
                 f"{attention_layers} attention layers x K,V x {kv_rows} rows x {spec.num_key_value_heads} "
                 f"heads x {spec.head_dim}, {dtype}"),
        PlanItem("DeltaNet state", deltanet_layers * (conv + recurrent) * STATE_BYTES,
                 f"{deltanet_layers} layers x (conv {spec.linear_conv_kernel_dim - 1}x{spec.conv_dim} + recurrent "
                 f"{spec.linear_num_value_heads}x{spec.linear_key_head_dim}x{spec.linear_value_head_dim}), FP32"),
        PlanItem("workspace", 2 * work * b, f"2 x largest launch: {work_name}"),
        PlanItem("runtime reserve", device.reserved_bytes, f"{device.name} profile (reserved_gb)"),
    ]
    min_slots = max(tier.group for tier in tiers)  # one launch of the widest tier needs its G experts in place
    store_bytes = total_experts * expert_bytes
    store = PlanItem("expert store", 0, f"experts.bin, {total_experts} x {size(expert_bytes)} {expert_dtype} = "
                                        f"{size(store_bytes)} on disk, read through the page cache (not held)")
    host_items = [store]
    if mapped_embedding:
        host_items.insert(0, PlanItem("embedding table", 0, f"{count(mapped_embedding)} params, {dense_label}: "
                                      f"{size(mapped_embedding * dense_b)} mapped from dense.safetensors, one row read per "
                                      f"token through the page cache (not held)"))
    if not device.host_is_device:
        host_items = [PlanItem("host runtime", device.host_reserved_bytes, f"{device.name} profile (host_reserved_gb)"),
                      PlanItem("pinned staging", 2 * min_slots * expert_bytes,
                               f"2 x {min_slots} blocks: the widest launch's copies, double-buffered"), store]
    host_bytes = sum(item.bytes for item in host_items) if device.host_is_device else 0
    fixed_bytes = sum(item.bytes for item in fixed) + host_bytes
    room = device.memory_bytes - fixed_bytes  # what is left for expert blocks on the device
    residence = decide(placement.expert_budget_gb, expert_bytes, room, total_experts, placement.policy,
                       placement.prefetch, placement.host_compute)
    slots = residence.device_experts
    share = f"{slots} of {total_experts} experts ({100 * slots / total_experts:.1f}%)"
    pool = PlanItem("expert slot pool" if residence.streams else "experts (all resident)", slots * expert_bytes,
                    f"{share} x {size(expert_bytes)} {expert_dtype}, budget {placement.budget_label}")
    items = fixed[:1] + [pool] + fixed[1:]
    title = (f"Memory plan: {model_name} on {device.name} ({size(device.memory_bytes)}), "
             f"context {max_context} tokens, {dtype} compute, {expert_dtype} experts")
    plan = MemoryPlan(title, device, max_context, items, host_items, residence, expert_bytes, expert_dtype)

    largest_fit = max(0, min(room // expert_bytes, total_experts))
    smallest_pool = min_slots * expert_bytes
    if largest_fit < min_slots:  # nothing to choose: the rest leaves no room for one launch's experts
        biggest = max(fixed, key=lambda item: item.bytes)
        remedy = {"KV cache": f"lower max_context (KV cache {size(kv_bytes)})",
                  "workspace": "lower the largest prefill bucket or tier capacity (the workspace is 2 x the largest "
                               f"launch: {work_name})",
                  "runtime reserve": "lower device.reserved_gb if the runtime needs less"}.get(biggest.name,
                                                                                              "use a smaller model")
        plan.problems.append(
            f"{device.name} has {size(device.memory_bytes)}; everything but the experts takes {size(fixed_bytes)} "
            f"(largest: {biggest.name} {size(biggest.bytes)}), leaving {size(max(room, 0))} for expert slots, less "
            f"than the {min_slots} slots ({size(smallest_pool)}) the widest tier launches at once; {remedy}, "
            f"or use a larger device")
    elif slots < min_slots:
        plan.problems.append(
            f"placement.expert_budget_gb={placement.budget_label} holds {slots} expert slot(s) of {size(expert_bytes)}; "
            f"the widest tier launches {min_slots} experts at once, so the pool needs at least {size(smallest_pool)}")
    elif plan.total > device.memory_bytes:
        largest = math.floor(largest_fit * expert_bytes / GIB * 100) / 100
        plan.problems.append(
            f"needs {size(plan.total)}, {device.name} has {size(device.memory_bytes)}: the expert "
            f"{'slot pool' if residence.streams else 'blocks'} ({size(pool.bytes)}, {share}) are too large; the "
            f"largest expert budget that fits is {largest:.2f} GiB ({largest_fit} slots): "
            f"placement.expert_budget_gb=<= that, or auto")
    if not device.host_is_device and plan.host_total > device.host_memory_bytes:
        plan.problems.append(f"the host needs {size(plan.host_total)} beside the device and has "
                             f"{size(device.host_memory_bytes)} (device.host_memory_gb)")
    plan.notes += _traffic_notes(spec, device, plan, edge, layers, kv_bytes, dense_b)
    return plan


def _traffic_notes(spec: ModelSpec, device: DeviceProfile, plan: MemoryPlan, edge: int, layers: int,
                   kv_bytes: int, dense_b: int) -> list[str]:
    expert_bytes = plan.expert_bytes
    per_token = spec.num_layers * spec.num_experts_per_tok  # routed experts one decode token touches
    notes = [f"experts: {plan.residence.describe()}" + ("" if plan.residence.streams else ", nothing streams")]
    if plan.residence.streams and device.h2d_gbps:
        one = expert_bytes / (device.h2d_gbps * 1e9)
        notes.append(f"streaming: one expert in {one * 1e6:.0f} us at {device.h2d_gbps:g} GB/s; a decode token "
                     f"routes to {per_token} experts ({per_token * expert_bytes / 1e9:.2f} GB): "
                     f"{per_token * one * 1e3:.0f} ms if every one misses")
    if device.memory_gbps:
        embedding_unread = 0 if spec.tie_word_embeddings else spec.vocab_size * spec.hidden_size  # one row is read
        head_and_layers = (layers + edge - embedding_unread) * dense_b
        read = head_and_layers + per_token * expert_bytes + kv_bytes
        seconds = read / (device.memory_gbps * 1e9)
        notes.append(f"decode floor at full context: {read / 1e9:.2f} GB read per token at {device.memory_gbps:g} "
                     f"GB/s = {seconds * 1e3:.1f} ms (at most {1 / seconds:.0f} tokens/s)")
    return notes
