"""Random checkpoints of any Qwen3.5-MoE shape, written in HF layout without transformers.

The demo model and the real-width benchmarks need checkpoints nobody can download here. This
writes `config.json` (flat, `qwen3_5_moe_text`, loadable by transformers' Qwen3_5MoeForCausalLM),
one safetensors shard per layer plus an index, fused experts, BF16 or F32 storage. It streams one
layer at a time and renames a finished temporary directory into place, so an interrupted write
leaves no checkpoint behind.

Weights are scaled so activations stay of order 1 and the router's choices are well separated.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np

from model.names import fused_expert_names, global_names, layer_names
from model.spec import ModelSpec

PREFIX = "model."


def to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even FP32 -> BF16, as uint16 bit patterns."""
    bits = np.ascontiguousarray(values, np.float32).view(np.uint32)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    return (rounded >> 16).astype(np.uint16)


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], dtype: str) -> None:
    """Write float32 arrays as F32 or BF16 safetensors (the safetensors package has no numpy BF16)."""
    encoded = {name: to_bf16_bits(a) if dtype == "BF16" else np.ascontiguousarray(a, np.float32)
               for name, a in tensors.items()}
    header, offset = {}, 0
    for name, data in encoded.items():
        header[name] = {"dtype": dtype, "shape": list(tensors[name].shape), "data_offsets": [offset, offset + data.nbytes]}
        offset += data.nbytes
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for data in encoded.values():
            f.write(data.tobytes())


def hf_config(spec: ModelSpec) -> dict:
    kinds = spec.layer_types
    return {
        "architectures": ["Qwen3_5MoeForCausalLM"],
        "model_type": "qwen3_5_moe_text",
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "num_hidden_layers": spec.num_layers,
        "layer_types": list(kinds),
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "head_dim": spec.head_dim,
        "linear_num_key_heads": spec.linear_num_key_heads,
        "linear_num_value_heads": spec.linear_num_value_heads,
        "linear_key_head_dim": spec.linear_key_head_dim,
        "linear_value_head_dim": spec.linear_value_head_dim,
        "linear_conv_kernel_dim": spec.linear_conv_kernel_dim,
        "num_experts": spec.num_experts,
        "num_experts_per_tok": spec.num_experts_per_tok,
        "moe_intermediate_size": spec.moe_intermediate_size,
        "shared_expert_intermediate_size": spec.shared_expert_intermediate_size,
        "rms_norm_eps": spec.rms_norm_eps,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "rope_parameters": {"rope_type": "default", "rope_theta": spec.rope_theta,
                            "partial_rotary_factor": spec.rotary_dim / spec.head_dim},
        "eos_token_id": list(spec.eos_token_ids) or None,
    }


def _draw(rng: np.random.Generator, canonical: str, shape: tuple[int, ...]) -> np.ndarray:
    """One weight, scaled by its role (see the module docstring)."""
    if canonical.endswith("norm") and canonical != "norm":
        return rng.standard_normal(shape, np.float32) * 0.1  # (1 + w) norms
    if canonical == "norm":
        return 1.0 + rng.standard_normal(shape, np.float32) * 0.1  # DeltaNet's plain-w gated norm
    if canonical == "A_log":
        return np.log(rng.uniform(0.01, 4.0, shape)).astype(np.float32)
    if canonical == "dt_bias":
        return rng.standard_normal(shape, np.float32) * 0.5
    if canonical == "embed":
        return rng.standard_normal(shape, np.float32)
    scale = 3.0 if canonical == "router" else 1.0
    return rng.standard_normal(shape, np.float32) * np.float32(scale / shape[-1] ** 0.5)


def write_random_checkpoint(spec: ModelSpec, out_dir: str | Path, dtype: str = "BF16", seed: int = 0) -> Path:
    """Write a random checkpoint of `spec` to `out_dir` (which must not exist) and return it."""
    if dtype not in ("BF16", "F32"):
        raise ValueError(f"dtype must be BF16 or F32, got {dtype}")
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists; remove it first")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        rng = np.random.default_rng(seed)
        weight_map = {}
        shards = spec.num_layers + 1
        for layer in range(spec.num_layers):
            names = dict(layer_names(spec, layer))
            tensors = {PREFIX + n.hf: _draw(rng, canonical, n.stored_shape) for canonical, n in names.items()}
            for part, n in fused_expert_names(spec, layer).items():
                tensors[PREFIX + n.hf] = _draw(rng, "expert_" + part, n.stored_shape)
            shard = f"model-{layer + 1:05d}-of-{shards:05d}.safetensors"
            write_safetensors(tmp / shard, tensors, dtype)
            weight_map.update(dict.fromkeys(tensors, shard))
            del tensors
        tensors = {}
        for canonical, n in global_names(spec).items():
            if canonical == "lm_head" and spec.tie_word_embeddings:
                continue
            tensors[n.hf if n.top_level else PREFIX + n.hf] = _draw(rng, canonical, n.stored_shape)
        shard = f"model-{shards:05d}-of-{shards:05d}.safetensors"
        write_safetensors(tmp / shard, tensors, dtype)
        weight_map.update(dict.fromkeys(tensors, shard))
        (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        (tmp / "config.json").write_text(json.dumps(hf_config(spec), indent=1))
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
