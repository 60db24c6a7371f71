"""The model's architecture as one typed record, parsed from an HF `config.json`.

Everything downstream (graphs, runtime, offload, manifest) sizes itself from a `ModelSpec`, so the
config is read and validated once, here, and a bad field fails with its name and the file.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

SUPPORTED_MODEL_TYPES = ("qwen3_5_moe", "qwen3_5_moe_text")
LAYER_TYPES = ("linear_attention", "full_attention")


class CheckpointError(ValueError):
    """A checkpoint or artifact is not what Ferry expects; the message names the file and field."""


@dataclass(frozen=True)
class ModelSpec:
    """Shapes and constants of a Qwen3.5/3.6-MoE text model."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    layer_types: tuple[str, ...]
    rms_norm_eps: float
    tie_word_embeddings: bool
    # full attention
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rotary_dim: int  # leading dims of each head that RoPE rotates (partial_rotary_factor * head_dim)
    rope_theta: float
    # Gated DeltaNet
    linear_num_key_heads: int
    linear_num_value_heads: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    linear_conv_kernel_dim: int
    # MoE
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    shared_expert_intermediate_size: int
    eos_token_ids: tuple[int, ...] = ()

    @property
    def linear_key_dim(self) -> int:
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def linear_value_dim(self) -> int:
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def conv_dim(self) -> int:
        """Channels of the DeltaNet causal conv: q, k and v side by side."""
        return 2 * self.linear_key_dim + self.linear_value_dim

    @property
    def expert_params(self) -> int:
        """Parameters of one routed expert: gate, up and down projections."""
        return 3 * self.moe_intermediate_size * self.hidden_size

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelSpec":
        fields = dict(data)
        fields["layer_types"] = tuple(fields["layer_types"])
        fields["eos_token_ids"] = tuple(fields.get("eos_token_ids", ()))
        return cls(**fields)


def _require(cfg: dict, key: str, source: Path, kind: type):
    if key not in cfg:
        raise CheckpointError(f"{source}: missing field '{key}'")
    value = cfg[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise CheckpointError(f"{source}: field '{key}' should be {kind.__name__}, got {value!r}")
    return value


def _positive(cfg: dict, key: str, source: Path) -> int:
    value = _require(cfg, key, source, int)
    if value <= 0:
        raise CheckpointError(f"{source}: field '{key}' must be positive, got {value}")
    return value


def _rope(text: dict, source: Path) -> tuple[float, float]:
    """rope_theta and partial_rotary_factor, from `rope_parameters` or the older flat fields."""
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "mrope"):
        raise CheckpointError(f"{source}: rope type '{rope_type}' is not supported (expected 'default')")
    theta = rope.get("rope_theta", text.get("rope_theta"))
    if theta is None:
        raise CheckpointError(f"{source}: missing field 'rope_parameters.rope_theta'")
    factor = rope.get("partial_rotary_factor", text.get("partial_rotary_factor", 0.25))
    return float(theta), float(factor)


def _layer_types(text: dict, num_layers: int, source: Path) -> tuple[str, ...]:
    types = text.get("layer_types")
    if types is None:
        interval = text.get("full_attention_interval", 4)
        if not isinstance(interval, int) or interval <= 0:
            raise CheckpointError(f"{source}: field 'full_attention_interval' must be a positive int")
        types = ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(num_layers)]
    types = tuple(types)
    if len(types) != num_layers:
        raise CheckpointError(
            f"{source}: 'layer_types' has {len(types)} entries, 'num_hidden_layers' is {num_layers}"
        )
    for i, kind in enumerate(types):
        if kind not in LAYER_TYPES:
            raise CheckpointError(f"{source}: layer_types[{i}] is '{kind}', expected one of {LAYER_TYPES}")
    return types


def _eos(top: dict, text: dict, generation: dict) -> tuple[int, ...]:
    for source in (generation, text, top):
        eos = source.get("eos_token_id")
        if eos is not None:
            return tuple(eos) if isinstance(eos, list) else (int(eos),)
    return ()


def spec_from_config(config: dict, source: Path, generation: dict | None = None) -> ModelSpec:
    """Validate an HF config (text fields nested under `text_config` or flat) into a ModelSpec."""
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"{source}: model_type '{model_type}' is not supported (expected one of {SUPPORTED_MODEL_TYPES})"
        )
    text = config.get("text_config") or config
    num_layers = _positive(text, "num_hidden_layers", source)
    theta, factor = _rope(text, source)
    head_dim = _positive(text, "head_dim", source)
    rotary_dim = int(head_dim * factor)
    if rotary_dim % 2 or not 0 < rotary_dim <= head_dim:
        raise CheckpointError(f"{source}: partial_rotary_factor {factor} gives odd or empty rotary dim {rotary_dim}")
    spec = ModelSpec(
        vocab_size=_positive(text, "vocab_size", source),
        hidden_size=_positive(text, "hidden_size", source),
        num_layers=num_layers,
        layer_types=_layer_types(text, num_layers, source),
        rms_norm_eps=_require(text, "rms_norm_eps", source, float),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
        num_attention_heads=_positive(text, "num_attention_heads", source),
        num_key_value_heads=_positive(text, "num_key_value_heads", source),
        head_dim=head_dim,
        rotary_dim=rotary_dim,
        rope_theta=theta,
        linear_num_key_heads=_positive(text, "linear_num_key_heads", source),
        linear_num_value_heads=_positive(text, "linear_num_value_heads", source),
        linear_key_head_dim=_positive(text, "linear_key_head_dim", source),
        linear_value_head_dim=_positive(text, "linear_value_head_dim", source),
        linear_conv_kernel_dim=_positive(text, "linear_conv_kernel_dim", source),
        num_experts=_positive(text, "num_experts", source),
        num_experts_per_tok=_positive(text, "num_experts_per_tok", source),
        moe_intermediate_size=_positive(text, "moe_intermediate_size", source),
        shared_expert_intermediate_size=_positive(text, "shared_expert_intermediate_size", source),
        eos_token_ids=_eos(config, text, generation or {}),
    )
    if spec.num_attention_heads % spec.num_key_value_heads:
        raise CheckpointError(f"{source}: num_attention_heads is not a multiple of num_key_value_heads")
    if spec.linear_num_value_heads % spec.linear_num_key_heads:
        raise CheckpointError(f"{source}: linear_num_value_heads is not a multiple of linear_num_key_heads")
    if spec.num_experts_per_tok > spec.num_experts:
        raise CheckpointError(f"{source}: num_experts_per_tok exceeds num_experts")
    if text.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{source}: hidden_act '{text['hidden_act']}' is not supported (expected 'silu')")
    return spec


def load_spec(model_dir: str | Path) -> ModelSpec:
    """Read `config.json` (and `generation_config.json` for EOS ids, when present) from a checkpoint."""
    model_dir = Path(model_dir)
    path = model_dir / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: no config.json in the model directory")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    generation_path = model_dir / "generation_config.json"
    generation = json.loads(generation_path.read_text()) if generation_path.is_file() else {}
    return spec_from_config(config, path, generation)
