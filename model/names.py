"""The one table from Ferry's canonical weight names to HF tensor names and shapes.

Every rename and reshape of a checkpoint tensor is written here, so the reader, the converter and
the tests agree on what a Qwen3.5-MoE checkpoint must hold. Names are relative to the text model's
prefix (`model.language_model.` or `model.`) unless an entry is `top_level` (the untied LM head).
Legend: V vocab, H hidden, E experts, I expert width, Is shared-expert width.
"""
from __future__ import annotations

from dataclasses import dataclass

from model.spec import ModelSpec

TEXT_PREFIXES = ("model.language_model.", "model.")
# Vision tower and multi-token-prediction head: present in real checkpoints, unused by Ferry.
IGNORED_PREFIXES = tuple(
    f"{outer}{part}" for outer in ("", "model.", "model.language_model.") for part in ("visual.", "mtp.")
)


@dataclass(frozen=True)
class WeightName:
    """One checkpoint tensor: its HF name, its stored shape and the shape Ferry uses."""

    hf: str
    stored_shape: tuple[int, ...]
    shape: tuple[int, ...]
    top_level: bool = False


def _w(hf: str, *shape: int) -> WeightName:
    return WeightName(hf, shape, shape)


def is_ignored(name: str) -> bool:
    return name.startswith(IGNORED_PREFIXES)


def global_names(spec: ModelSpec) -> dict[str, WeightName]:
    v, h = spec.vocab_size, spec.hidden_size
    return {
        "embed": _w("embed_tokens.weight", v, h),
        "final_norm": _w("norm.weight", h),
        "lm_head": WeightName("lm_head.weight", (v, h), (v, h), top_level=True),
    }


def layer_names(spec: ModelSpec, layer: int) -> dict[str, WeightName]:
    """Dense (non-routed-expert) weights of one decoder layer."""
    h, e, s = spec.hidden_size, spec.num_experts, spec.shared_expert_intermediate_size
    p = f"layers.{layer}."
    names = {
        "input_norm": _w(p + "input_layernorm.weight", h),
        "post_attn_norm": _w(p + "post_attention_layernorm.weight", h),
        "router": _w(p + "mlp.gate.weight", e, h),
        "shared_gate": _w(p + "mlp.shared_expert.gate_proj.weight", s, h),
        "shared_up": _w(p + "mlp.shared_expert.up_proj.weight", s, h),
        "shared_down": _w(p + "mlp.shared_expert.down_proj.weight", h, s),
        "shared_expert_gate": _w(p + "mlp.shared_expert_gate.weight", 1, h),
    }
    if spec.layer_types[layer] == "full_attention":
        q = spec.num_attention_heads * spec.head_dim
        kv = spec.num_key_value_heads * spec.head_dim
        a = p + "self_attn."
        names.update(
            q_proj=_w(a + "q_proj.weight", 2 * q, h),  # query and output gate, interleaved per head
            k_proj=_w(a + "k_proj.weight", kv, h),
            v_proj=_w(a + "v_proj.weight", kv, h),
            o_proj=_w(a + "o_proj.weight", h, q),
            q_norm=_w(a + "q_norm.weight", spec.head_dim),
            k_norm=_w(a + "k_norm.weight", spec.head_dim),
        )
    else:
        c, vd, nv = spec.conv_dim, spec.linear_value_dim, spec.linear_num_value_heads
        k = spec.linear_conv_kernel_dim
        a = p + "linear_attn."
        names.update(
            in_proj_qkv=_w(a + "in_proj_qkv.weight", c, h),
            in_proj_z=_w(a + "in_proj_z.weight", vd, h),
            in_proj_b=_w(a + "in_proj_b.weight", nv, h),
            in_proj_a=_w(a + "in_proj_a.weight", nv, h),
            conv1d=WeightName(a + "conv1d.weight", (c, 1, k), (c, k)),  # depthwise: one input channel
            A_log=_w(a + "A_log", nv),
            dt_bias=_w(a + "dt_bias", nv),
            norm=_w(a + "norm.weight", spec.linear_value_head_dim),
            out_proj=_w(a + "out_proj.weight", h, vd),
        )
    return names


def per_expert_names(spec: ModelSpec, layer: int, expert: int) -> dict[str, WeightName]:
    """One routed expert stored as three separate projections."""
    h, i = spec.hidden_size, spec.moe_intermediate_size
    p = f"layers.{layer}.mlp.experts.{expert}."
    return {
        "gate": _w(p + "gate_proj.weight", i, h),
        "up": _w(p + "up_proj.weight", i, h),
        "down": _w(p + "down_proj.weight", h, i),
    }


def fused_expert_names(spec: ModelSpec, layer: int) -> dict[str, WeightName]:
    """All routed experts of a layer stacked: gate rows then up rows, and down."""
    h, e, i = spec.hidden_size, spec.num_experts, spec.moe_intermediate_size
    p = f"layers.{layer}.mlp.experts."
    return {
        "gate_up": _w(p + "gate_up_proj", e, 2 * i, h),
        "down": _w(p + "down_proj", e, h, i),
    }
