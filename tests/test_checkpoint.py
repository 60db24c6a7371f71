"""Checkpoint returns exactly what transformers saved, names the culprit of a bad checkpoint, and
streams a sharded checkpoint layer by layer without holding more than one layer."""
from __future__ import annotations

import json
import math
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints import TinyShape, build_model, write_checkpoint
from model import names
from model.checkpoint import (
    Checkpoint,
    MissingShardError,
    MissingTensorError,
    MissingWeightsError,
    ShapeMismatchError,
    UnmappedTensorError,
)
from model.safetensors_file import MalformedFileError, TruncatedFileError, UnsupportedDtypeError
from model.spec import CheckpointError

INDEX = "model.safetensors.index.json"
TEXT = "model.language_model."
# Written out independently of model.names: canonical name -> HF name inside a layer.
HF_LAYER_NAMES = {
    "input_norm": "input_layernorm.weight",
    "post_attn_norm": "post_attention_layernorm.weight",
    "router": "mlp.gate.weight",
    "shared_gate": "mlp.shared_expert.gate_proj.weight",
    "shared_up": "mlp.shared_expert.up_proj.weight",
    "shared_down": "mlp.shared_expert.down_proj.weight",
    "shared_expert_gate": "mlp.shared_expert_gate.weight",
    **{k: f"self_attn.{k}.weight" for k in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")},
    **{
        k: f"linear_attn.{k}.weight"
        for k in ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "conv1d", "norm", "out_proj")
    },
    "A_log": "linear_attn.A_log",
    "dt_bias": "linear_attn.dt_bias",
}
SHARDED = 20_000  # bytes per shard: dozens of shards for the tiny model


def oracle(shape: TinyShape, dtype: torch.dtype | None = None) -> dict[str, np.ndarray]:
    """The transformers model's parameters, rounded through the storage dtype."""
    dtype = dtype or {"float32": torch.float32, "bfloat16": torch.bfloat16}[shape.dtype]
    state = build_model(shape).state_dict()
    return {name: t.to(dtype).float().numpy() for name, t in state.items()}


def assert_fresh(array: np.ndarray) -> None:
    assert array.dtype == np.float32 and array.flags.c_contiguous and array.flags.owndata


def assert_matches(ck: Checkpoint, params: dict[str, np.ndarray]) -> None:
    spec = ck.spec
    glob = ck.global_weights()
    head = params[TEXT + "embed_tokens.weight"] if spec.tie_word_embeddings else params["lm_head.weight"]
    for key, expected in (
        ("embed", params[TEXT + "embed_tokens.weight"]),
        ("final_norm", params[TEXT + "norm.weight"]),
        ("lm_head", head),
    ):
        assert_fresh(glob[key])
        np.testing.assert_array_equal(glob[key], expected, err_msg=key)
    for layer in range(spec.num_layers):
        dense = ck.layer_weights(layer)
        attention = "self_attn." if spec.layer_types[layer] == "full_attention" else "linear_attn."
        expected_keys = {k for k, hf in HF_LAYER_NAMES.items() if not hf.startswith(("self_attn.", "linear_attn."))}
        expected_keys |= {k for k, hf in HF_LAYER_NAMES.items() if hf.startswith(attention)}
        assert dense.keys() == expected_keys
        for key, value in dense.items():
            expected = params[f"{TEXT}layers.{layer}.{HF_LAYER_NAMES[key]}"]
            if key == "conv1d":
                expected = expected[:, 0, :]
            assert_fresh(value)
            assert value.shape == expected.shape, key
            np.testing.assert_array_equal(value, expected, err_msg=f"layer {layer} {key}")
        gate_up, down = ck.layer_experts(layer)
        prefix = f"{TEXT}layers.{layer}.mlp.experts."
        np.testing.assert_array_equal(gate_up, params[prefix + "gate_up_proj"])
        np.testing.assert_array_equal(down, params[prefix + "down_proj"])
        for expert in (0, spec.num_experts - 1):
            one_gate_up, one_down = ck.expert_weights(layer, expert)
            for array in (gate_up, down, one_gate_up, one_down):
                assert_fresh(array)
            np.testing.assert_array_equal(one_gate_up, gate_up[expert])
            np.testing.assert_array_equal(one_down, down[expert])


@pytest.mark.parametrize(
    "shape",
    [
        TinyShape(),
        TinyShape(dtype="bfloat16", shard_bytes=SHARDED),
        TinyShape(fused=True, shard_bytes=SHARDED, tied=True),
        TinyShape(dtype="bfloat16", fused=True, tied=True),
    ],
    ids=["f32-split-single-untied", "bf16-split-sharded-untied", "f32-fused-sharded-tied", "bf16-fused-single-tied"],
)
def test_values_equal_transformers_parameters(shape: TinyShape, tmp_path: Path):
    write_checkpoint(shape, tmp_path)
    if shape.shard_bytes:
        assert len(set(json.loads((tmp_path / INDEX).read_text())["weight_map"].values())) > 10
    assert_matches(Checkpoint(tmp_path), oracle(shape))


def test_text_only_prefix_and_ignored_heads(tmp_path: Path):
    """`model.` prefixed text checkpoints read the same; vision and MTP tensors are ignored."""
    shape = TinyShape()
    write_checkpoint(shape, tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = {name.replace(TEXT, "model."): t for name, t in load_file(path).items()}
    tensors["mtp.fc.weight"] = torch.zeros(2, 2)
    save_file(tensors, path)
    assert_matches(Checkpoint(tmp_path), oracle(shape))


def test_f16_storage_and_tied_head_present(tmp_path: Path):
    """F16 converts exactly; a tied checkpoint that still stores lm_head reads the embedding as head."""
    shape = TinyShape(tied=True)
    write_checkpoint(shape, tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = {name: t.half() for name, t in load_file(path).items()}
    tensors["lm_head.weight"] = torch.zeros_like(tensors[TEXT + "embed_tokens.weight"])
    save_file(tensors, path)
    assert_matches(Checkpoint(tmp_path), oracle(shape, torch.float16))


@pytest.fixture(scope="module")
def sharded_checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(TinyShape(shard_bytes=SHARDED), tmp_path_factory.mktemp("sharded"))


def edit_shard(model_dir: Path, holder: str, change) -> str:
    """Apply `change(tensors)` to the shard holding tensor `holder`; keep the index in step."""
    index_path = model_dir / INDEX
    index = json.loads(index_path.read_text())
    shard = index["weight_map"][holder]
    tensors = load_file(model_dir / shard)
    change(tensors)
    save_file(tensors, model_dir / shard)
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard}
    index["weight_map"].update(dict.fromkeys(tensors, shard))
    index_path.write_text(json.dumps(index))
    return shard


def index_shard(d: Path, tensor: str) -> str:
    return json.loads((d / INDEX).read_text())["weight_map"][tensor]


ROUTER = TEXT + "layers.1.mlp.gate.weight"
K_NORM = TEXT + "layers.1.self_attn.k_norm.weight"


def delete_tensor(d: Path) -> str:
    edit_shard(d, K_NORM, lambda t: t.pop(K_NORM))
    return rf"{INDEX}.*missing tensor '{K_NORM}'"


def index_lists_absent_tensor(d: Path) -> str:
    shard = index_shard(d, K_NORM)
    tensors = load_file(d / shard)
    tensors.pop(K_NORM)
    save_file(tensors, d / shard)
    return rf"{INDEX}: tensor '{K_NORM}' is not in its shard '{shard}'"


def change_shape(d: Path) -> str:
    shard = edit_shard(d, ROUTER, lambda t: t.update({ROUTER: torch.zeros(9, 64)}))
    return rf"{shard}: tensor '{ROUTER}' has shape \(9, 64\), expected \(8, 64\)"


def int64_dtype(d: Path) -> str:
    shard = edit_shard(d, ROUTER, lambda t: t.update({ROUTER: torch.zeros(8, 64, dtype=torch.int64)}))
    return rf"{shard}: tensor '{ROUTER}' has dtype I64"


def f64_dtype(d: Path) -> str:
    shard = edit_shard(d, ROUTER, lambda t: t.update({ROUTER: torch.zeros(8, 64, dtype=torch.float64)}))
    return rf"{shard}: tensor '{ROUTER}' has dtype F64"


def delete_shard(d: Path) -> str:
    shard = index_shard(d, ROUTER)
    (d / shard).unlink()
    return rf"{INDEX}: shard '{shard}'.*does not exist"


def truncate_file(d: Path) -> str:
    shard = index_shard(d, ROUTER)
    path = d / shard
    path.write_bytes(path.read_bytes()[:-10])
    return rf"{shard}: truncated"


def garble_header(d: Path) -> str:
    shard = index_shard(d, ROUTER)
    path = d / shard
    data = bytearray(path.read_bytes())
    data[8:12] = b"}{]["
    path.write_bytes(bytes(data))
    return rf"{shard}: header is not valid JSON"


def other_model_type(d: Path) -> str:
    config = json.loads((d / "config.json").read_text())
    config["model_type"] = "llama"
    (d / "config.json").write_text(json.dumps(config))
    return r"config.json: model_type 'llama' is not supported"


def unknown_tensor(d: Path) -> str:
    name = TEXT + "layers.0.mlp.extra.weight"
    shard = edit_shard(d, ROUTER, lambda t: t.update({name: torch.zeros(2)}))
    return rf"{shard}: tensor '{name}' is not a weight Ferry knows"


def no_weights(d: Path) -> str:
    for path in d.glob("model*.safetensors*"):
        path.unlink()
    return rf"neither model.safetensors nor {INDEX}"


@pytest.mark.parametrize(
    "corrupt, error",
    [
        (delete_tensor, MissingTensorError),
        (index_lists_absent_tensor, MissingTensorError),
        (change_shape, ShapeMismatchError),
        (int64_dtype, UnsupportedDtypeError),
        (f64_dtype, UnsupportedDtypeError),
        (delete_shard, MissingShardError),
        (truncate_file, TruncatedFileError),
        (garble_header, MalformedFileError),
        (other_model_type, CheckpointError),
        (unknown_tensor, UnmappedTensorError),
        (no_weights, MissingWeightsError),
    ],
    ids=lambda p: p.__name__,
)
def test_bad_checkpoint_names_the_culprit(corrupt, error, sharded_checkpoint: Path, tmp_path: Path):
    model_dir = shutil.copytree(sharded_checkpoint, tmp_path / "ck")
    Checkpoint(model_dir)
    match = corrupt(model_dir)
    with pytest.raises(error, match=match) as caught:
        Checkpoint(model_dir)
    assert isinstance(caught.value, CheckpointError)


def layer_bytes(ck: Checkpoint, layer: int) -> int:
    tables = names.layer_names(ck.spec, layer) | names.fused_expert_names(ck.spec, layer)
    return sum(4 * math.prod(w.shape) for w in tables.values())


def test_layer_streaming_memory_is_bounded_by_one_layer(tmp_path: Path):
    shape = TinyShape(layers=8, hidden=128, experts=32, moe_inter=64, shard_bytes=1 << 20)
    write_checkpoint(shape, tmp_path)
    total = sum(p.stat().st_size for p in tmp_path.glob("*.safetensors"))
    tracemalloc.start()
    try:
        ck = Checkpoint(tmp_path)
        construction_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        for layer in range(ck.spec.num_layers):
            dense = ck.layer_weights(layer)
            del dense
            gate_up, down = ck.layer_experts(layer)
            del gate_up, down
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    largest = max(layer_bytes(ck, layer) for layer in range(ck.spec.num_layers))
    assert total > 6 * largest
    assert construction_peak < largest, "construction should read headers only"
    assert peak < 3 * largest
    assert peak < total / 4
