"""Dense weights (everything but the routed experts) as one safetensors file, written streaming.

The header is computed up front from the model spec, so tensors can be appended one at a time
(or a large one in row chunks) while the file's SHA-256 is computed on the way out: the writer
never holds more than the piece it is given. Data starts at a 64-byte boundary (the header is
padded with spaces, as the format allows), so every tensor can be mapped and used in place.
The projection matrices (everything a graph multiplies by: embedding and head, attention and
DeltaNet projections, router, shared expert) are FP16 in every artifact but a `cpu` one with FP32
experts: FP16 is the 310P3's matmul type, and on the CPU an artifact with narrow experts keeps its
dense matrices narrow too, so a decode token reads about half the bytes (its graphs widen them to
FP32 where they multiply). An fp32 `cpu` artifact is FP32 throughout, the format that equals
transformers. The small vectors the graphs use elementwise (norms, conv, A_log, dt_bias) stay FP32.
FP16 values beyond +-65504 are clamped.

Names: `embed` [V, H], `final_norm` [H], `lm_head` [V, H] (absent when tied), and
`layers.{i}.{name}` for each canonical name of `model.names.layer_names` in its Ferry shape.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Iterable

import numpy as np

from model import names
from artifact.manifest import DenseRecord, DenseTensor, FileRecord
from model.spec import ModelSpec

DATA_ALIGNMENT = 64
MATRICES = frozenset({"embed", "lm_head", "q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkv", "in_proj_z",
                      "in_proj_b", "in_proj_a", "out_proj", "router", "shared_gate", "shared_up", "shared_down",
                      "shared_expert_gate"})
SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16"}
FP16_MAX = float(np.finfo(np.float16).max)


def dense_dtype(key: str, target: str, expert_dtype: str) -> str:
    """The stored (and graph input) dtype of dense tensor `key` (canonical name) in a `target` artifact
    whose experts are stored as `expert_dtype`."""
    narrow = target != "cpu" or expert_dtype != "fp32"
    return "float16" if narrow and key in MATRICES else "float32"


def tensor_bytes(tensor: DenseTensor) -> int:
    """Bytes of one dense tensor as stored."""
    return np.dtype(tensor.dtype).itemsize * math.prod(tensor.shape)


def dense_plan(spec: ModelSpec, target: str, expert_dtype: str) -> list[DenseTensor]:
    """Every dense tensor of the artifact, in file order: globals first, then layer by layer."""
    plan = [DenseTensor(key, w.shape, dense_dtype(key, target, expert_dtype))
            for key, w in names.global_names(spec).items() if not (key == "lm_head" and spec.tie_word_embeddings)]
    for layer in range(spec.num_layers):
        plan += [DenseTensor(f"layers.{layer}.{key}", w.shape, dense_dtype(key, target, expert_dtype))
                 for key, w in names.layer_names(spec, layer).items()]
    return plan


def layer_tensor(layer: int, key: str) -> str:
    return f"layers.{layer}.{key}"


class DenseWriter:
    """Appends the planned tensors in order; `close` returns the manifest's record of the file."""

    def __init__(self, path: Path, relative: str, spec: ModelSpec, target: str, expert_dtype: str):
        self.relative = relative
        self.spec = spec
        self.plan = dense_plan(spec, target, expert_dtype)
        header, offset = {}, 0
        for tensor in self.plan:
            nbytes = tensor_bytes(tensor)
            header[tensor.name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                                   "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        header["__metadata__"] = {"format": "ferry-dense"}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-(8 + len(raw)) % DATA_ALIGNMENT)
        self.file = open(path, "wb")
        self.hash = hashlib.sha256()
        self._emit(len(raw).to_bytes(8, "little") + raw)
        self.next = 0  # index into plan of the tensor expected next

    def _emit(self, data) -> None:
        self.file.write(data)
        self.hash.update(data)

    def write(self, name: str, pieces: np.ndarray | Iterable[np.ndarray]) -> int:
        """Append tensor `name` (FP32), whole or as consecutive row chunks, in its planned dtype; returns
        the bytes written."""
        if self.next >= len(self.plan) or self.plan[self.next].name != name:
            expected = self.plan[self.next].name if self.next < len(self.plan) else "nothing"
            raise ValueError(f"dense tensors must be written in plan order: got '{name}', expected '{expected}'")
        shape, dtype = self.plan[self.next].shape, self.plan[self.next].dtype
        if isinstance(pieces, np.ndarray):
            pieces = [pieces]
        written = 0
        for piece in pieces:
            if piece.dtype != np.float32 or piece.shape[1:] != shape[1:]:
                raise ValueError(f"dense tensor '{name}': got a {piece.dtype} piece of shape {piece.shape}, "
                                 f"expected float32 rows of {shape}")
            if dtype == "float16":
                piece = np.clip(piece, -FP16_MAX, FP16_MAX).astype(np.float16)
            data = memoryview(np.ascontiguousarray(piece)).cast("B")
            self._emit(data)
            written += data.nbytes
        need = np.dtype(dtype).itemsize * math.prod(shape)
        if written != need:
            raise ValueError(f"dense tensor '{name}': wrote {written} bytes, its {dtype} shape {shape} needs {need}")
        self.next += 1
        return written

    def close(self) -> DenseRecord:
        if self.next != len(self.plan):
            raise ValueError(f"dense file closed before '{self.plan[self.next].name}' was written")
        self.file.flush()
        size = self.file.tell()
        self.file.close()
        return DenseRecord(FileRecord(self.relative, size, self.hash.hexdigest()), tuple(self.plan),
                           tied_head=self.spec.tie_word_embeddings)

    def abort(self) -> None:
        self.file.close()
