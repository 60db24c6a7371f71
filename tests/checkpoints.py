"""Tiny random Qwen3.5-MoE checkpoints written by `transformers`, the numerical oracle.

Weights are drawn so that activations and logits are of order 1 and the router's probabilities are
well separated (no top-k decided by a tie), which makes a 1e-4 logit tolerance meaningful.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration


@dataclass(frozen=True)
class TinyShape:
    vocab: int = 160
    hidden: int = 64
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    lin_k_heads: int = 2
    lin_v_heads: int = 4
    lin_k_dim: int = 8
    lin_v_dim: int = 8
    experts: int = 8
    top_k: int = 2
    moe_inter: int = 32
    shared_inter: int = 32
    interval: int = 2
    tied: bool = False
    fused: bool = False  # write experts as experts.gate_up_proj / experts.down_proj
    dtype: str = "float32"  # storage dtype: float32 or bfloat16
    shard_bytes: int | None = None  # write shards of at most this size plus an index
    seed: int = 0
    eos: list[int] = field(default_factory=lambda: [1])

    def variant(self, **changes) -> "TinyShape":
        return replace(self, **changes)


def hf_config(shape: TinyShape) -> Qwen3_5MoeConfig:
    text = dict(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim,
        linear_conv_kernel_dim=4,
        linear_key_head_dim=shape.lin_k_dim,
        linear_value_head_dim=shape.lin_v_dim,
        linear_num_key_heads=shape.lin_k_heads,
        linear_num_value_heads=shape.lin_v_heads,
        moe_intermediate_size=shape.moe_inter,
        shared_expert_intermediate_size=shape.shared_inter,
        num_experts_per_tok=shape.top_k,
        num_experts=shape.experts,
        full_attention_interval=shape.interval,
        tie_word_embeddings=shape.tied,
        eos_token_id=shape.eos,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
    )
    vision = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=shape.hidden)
    return Qwen3_5MoeConfig(text_config=text, vision_config=vision, tie_word_embeddings=shape.tied)


@torch.no_grad()
def _randomise(model: Qwen3_5MoeForConditionalGeneration, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "visual" in name:
            continue
        if name.endswith("norm.weight") and "linear_attn.norm" not in name:
            values = torch.randn(param.shape, generator=gen) * 0.1  # (1 + w) norms
        elif "linear_attn.norm" in name:
            values = 1.0 + torch.randn(param.shape, generator=gen) * 0.1
        elif name.endswith("A_log"):
            values = torch.empty(param.shape).uniform_(0.01, 4.0, generator=gen).log()
        elif name.endswith("dt_bias"):
            values = torch.randn(param.shape, generator=gen) * 0.5
        elif name.endswith("embed_tokens.weight"):
            # tied: the embedding is also the head, so keep logits of order 1
            scale = param.shape[-1] ** -0.5 if model.config.tie_word_embeddings else 1.0
            values = torch.randn(param.shape, generator=gen) * scale
        elif name.endswith("mlp.gate.weight"):
            values = torch.randn(param.shape, generator=gen) * (3.0 / param.shape[-1] ** 0.5)
        else:
            fan_in = param.shape[-1]
            values = torch.randn(param.shape, generator=gen) / fan_in**0.5
        param.copy_(values.to(param.dtype))
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.language_model.embed_tokens.weight


def build_model(shape: TinyShape) -> Qwen3_5MoeForConditionalGeneration:
    torch.manual_seed(shape.seed)
    model = Qwen3_5MoeForConditionalGeneration(hf_config(shape)).eval()
    _randomise(model, shape.seed)
    return model


def _fuse_experts(model_dir: Path, shape: TinyShape) -> None:
    """Rewrite per-expert tensors in the fused [E, 2I, H] / [E, H, I] layout.

    Each layer's fused pair goes to the shard that held its expert 0, so sharded checkpoints stay sharded.
    """
    index_path = model_dir / "model.safetensors.index.json"
    shards = {path.name: load_file(path) for path in sorted(model_dir.glob("*.safetensors"))}
    owner = {name: shard for shard, tensors in shards.items() for name in tensors}
    everything = {name: t for tensors in shards.values() for name, t in tensors.items()}
    prefixes = sorted({k.split(".mlp.experts.")[0] for k in everything if ".mlp.experts." in k})
    for prefix in prefixes:
        def take(e, proj):
            name = f"{prefix}.mlp.experts.{e}.{proj}.weight"
            shards[owner[name]].pop(name)
            return everything[name]

        home = owner[f"{prefix}.mlp.experts.0.gate_proj.weight"]
        gate_up = [torch.cat([take(e, "gate_proj"), take(e, "up_proj")], dim=0) for e in range(shape.experts)]
        down = [take(e, "down_proj") for e in range(shape.experts)]
        shards[home][f"{prefix}.mlp.experts.gate_up_proj"] = torch.stack(gate_up)
        shards[home][f"{prefix}.mlp.experts.down_proj"] = torch.stack(down)
    for shard, tensors in shards.items():
        save_file(tensors, model_dir / shard, metadata={"format": "pt"})
    if index_path.exists():
        index = json.loads(index_path.read_text())
        index["weight_map"] = {name: shard for shard, tensors in shards.items() for name in tensors}
        index_path.write_text(json.dumps(index, indent=2))


def write_checkpoint(shape: TinyShape, model_dir: Path) -> Path:
    """Save a random model of `shape` to `model_dir` in HF layout and return the directory."""
    model = build_model(shape)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[shape.dtype]
    kwargs = {"max_shard_size": shape.shard_bytes} if shape.shard_bytes else {}
    model.to(dtype).save_pretrained(model_dir, **kwargs)
    if shape.fused:
        _fuse_experts(Path(model_dir), shape)
    return Path(model_dir)


def load_oracle(model_dir: Path) -> Qwen3_5MoeForConditionalGeneration:
    """The transformers model read back from disk in FP32: what Ferry must reproduce."""
    return Qwen3_5MoeForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
