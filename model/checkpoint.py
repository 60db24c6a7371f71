"""An HF Qwen3.5-MoE checkpoint as canonical float32 weights, one layer or one expert at a time.

Construction reads only `config.json`, the shard index and the safetensors headers, and checks
every tensor Ferry needs (present, right shape, convertible dtype) and every tensor it does not
(ignored on purpose, else an error), so a bad checkpoint fails before any compute. Tensor bytes
are read only when a method asks for them, straight into freshly allocated float32 arrays.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model import names
from model.names import WeightName
from model.safetensors_file import SafetensorsFile
from model.spec import CheckpointError, ModelSpec, load_spec

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class MissingWeightsError(CheckpointError):
    """The model directory holds neither `model.safetensors` nor a shard index."""


class MissingShardError(CheckpointError):
    """The shard index names a file that is not there."""


class MissingTensorError(CheckpointError):
    """A tensor Ferry needs is not in the checkpoint."""


class ShapeMismatchError(CheckpointError):
    """A tensor's stored shape differs from the one the config implies."""


class UnmappedTensorError(CheckpointError):
    """A checkpoint tensor is neither mapped by `model.names` nor ignored on purpose."""


@dataclass(frozen=True)
class Located:
    """A validated tensor: the file holding it, its full HF name, the shape Ferry reads it as."""

    file: SafetensorsFile
    hf: str
    shape: tuple[int, ...]

    def read(self, index: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
        if out is None:
            out = np.empty(self.shape if index is None else self.shape[1:], np.float32)
        return self.file.read(self.hf, index, out)


@dataclass(frozen=True)
class FusedExperts:
    """A layer's experts stored stacked: gate_up [E, 2I, H], down [E, H, I]."""

    gate_up: Located
    down: Located

    def all(self) -> tuple[np.ndarray, np.ndarray]:
        return self.gate_up.read(), self.down.read()

    def one(self, expert: int) -> tuple[np.ndarray, np.ndarray]:
        return self.gate_up.read(expert), self.down.read(expert)


@dataclass(frozen=True)
class SplitExperts:
    """A layer's experts stored one gate/up/down triple per expert, fused here on read."""

    experts: list[dict[str, Located]]

    def all(self) -> tuple[np.ndarray, np.ndarray]:
        (i, h), count = self.experts[0]["gate"].shape, len(self.experts)
        gate_up = np.empty((count, 2 * i, h), np.float32)
        down = np.empty((count, h, i), np.float32)
        for expert in range(count):
            self._into(expert, gate_up[expert], down[expert])
        return gate_up, down

    def one(self, expert: int) -> tuple[np.ndarray, np.ndarray]:
        i, h = self.experts[expert]["gate"].shape
        gate_up = np.empty((2 * i, h), np.float32)
        down = np.empty((h, i), np.float32)
        self._into(expert, gate_up, down)
        return gate_up, down

    def _into(self, expert: int, gate_up: np.ndarray, down: np.ndarray) -> None:
        triple = self.experts[expert]
        i = triple["gate"].shape[0]
        triple["gate"].read(out=gate_up[:i])
        triple["up"].read(out=gate_up[i:])
        triple["down"].read(out=down)


def _open_files(model_dir: Path) -> tuple[Path, list[SafetensorsFile]]:
    """The file a missing tensor should be reported against, and every weights file."""
    index_path = model_dir / INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index_path}: not a valid shard index ({err!r})") from None
        files = {}
        for tensor, shard in weight_map.items():
            if shard not in files:
                if not (model_dir / shard).is_file():
                    raise MissingShardError(f"{index_path}: shard '{shard}' (holding '{tensor}') does not exist")
                files[shard] = SafetensorsFile(model_dir / shard)
            if tensor not in files[shard]:
                raise MissingTensorError(f"{index_path}: tensor '{tensor}' is not in its shard '{shard}'")
        return index_path, list(files.values())
    single = model_dir / SINGLE_FILE
    if single.is_file():
        return single, [SafetensorsFile(single)]
    raise MissingWeightsError(f"{model_dir}: neither {SINGLE_FILE} nor {INDEX_FILE} found")


def _where(files: list[SafetensorsFile]) -> dict[str, SafetensorsFile]:
    where: dict[str, SafetensorsFile] = {}
    for file in files:
        for name in file.tensors:
            if name in where:
                raise CheckpointError(f"{file.path}: tensor '{name}' is also in {where[name].path}")
            where[name] = file
    return where


def _text_prefix(where: dict[str, SafetensorsFile]) -> str:
    """`model.language_model.` (multimodal checkpoints) or `model.` (text-only ones)."""
    long, short = names.TEXT_PREFIXES
    return long if any(n.startswith(long) and not names.is_ignored(n) for n in where) else short


class Checkpoint:
    """Validated, lazily read weights of a Qwen3.5-MoE checkpoint directory."""

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        self.spec: ModelSpec = load_spec(self.model_dir)
        self._source, files = _open_files(self.model_dir)
        self._where = _where(files)
        self._prefix = _text_prefix(self._where)
        self._mapped: set[str] = set()
        spec = self.spec
        tied_head = frozenset({"lm_head"} if spec.tie_word_embeddings else ())  # unused when tied, so optional
        self._globals = self._locate_all(names.global_names(spec), optional=tied_head)
        self._layers = [self._locate_all(names.layer_names(spec, i)) for i in range(spec.num_layers)]
        self._experts = [self._locate_experts(i) for i in range(spec.num_layers)]
        for name, file in self._where.items():
            if name not in self._mapped and not names.is_ignored(name):
                raise UnmappedTensorError(f"{file.path}: tensor '{name}' is not a weight Ferry knows")

    def _full_name(self, weight: WeightName) -> str:
        return weight.hf if weight.top_level else self._prefix + weight.hf

    def _locate(self, weight: WeightName) -> Located:
        hf = self._full_name(weight)
        file = self._where.get(hf)
        if file is None:
            raise MissingTensorError(f"{self._source}: missing tensor '{hf}' (expected shape {weight.stored_shape})")
        got = file.tensors[hf].shape
        if got != weight.stored_shape:
            raise ShapeMismatchError(f"{file.path}: tensor '{hf}' has shape {got}, expected {weight.stored_shape}")
        file.check_dtype(hf)
        self._mapped.add(hf)
        return Located(file, hf, weight.shape)

    def _locate_all(self, table: dict[str, WeightName], optional: frozenset[str] = frozenset()) -> dict[str, Located]:
        return {
            key: self._locate(weight)
            for key, weight in table.items()
            if key not in optional or self._full_name(weight) in self._where
        }

    def _locate_experts(self, layer: int) -> FusedExperts | SplitExperts:
        """The fused pair when the checkpoint has it, else one gate/up/down triple per expert."""
        fused = names.fused_expert_names(self.spec, layer)
        if self._full_name(fused["gate_up"]) in self._where:
            return FusedExperts(**self._locate_all(fused))
        count = self.spec.num_experts
        return SplitExperts([self._locate_all(names.per_expert_names(self.spec, layer, e)) for e in range(count)])

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.spec.num_layers:
            raise IndexError(f"layer {layer} out of range for {self.spec.num_layers} layers")

    def global_weights(self) -> dict[str, np.ndarray]:
        """embed [V,H], final_norm [H], lm_head [V,H]; when tied, lm_head is the embed array itself."""
        embed = self._globals["embed"].read()
        return {
            "embed": embed,
            "final_norm": self._globals["final_norm"].read(),
            "lm_head": embed if self.spec.tie_word_embeddings else self._globals["lm_head"].read(),
        }

    def layer_weights(self, layer: int) -> dict[str, np.ndarray]:
        """Dense weights of one layer under their canonical names (see `model.names.layer_names`)."""
        self._check_layer(layer)
        return {key: located.read() for key, located in self._layers[layer].items()}

    def layer_experts(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """All routed experts of a layer: gate_up [E, 2I, H] (gate rows first), down [E, H, I]."""
        self._check_layer(layer)
        return self._experts[layer].all()

    def expert_weights(self, layer: int, expert: int) -> tuple[np.ndarray, np.ndarray]:
        """One routed expert, reading only its bytes: gate_up [2I, H], down [H, I]."""
        self._check_layer(layer)
        if not 0 <= expert < self.spec.num_experts:
            raise IndexError(f"expert {expert} out of range for {self.spec.num_experts} experts")
        return self._experts[layer].one(expert)
