"""A minimal safetensors reader over mmap: headers up front, one tensor's bytes on demand.

The `safetensors` package loads whole tensors in their stored dtype; Ferry wants float32 (the CPU
kernels reject BF16), written straight into a caller's buffer, one expert's rows at a time, so that
converting a 67 GB checkpoint never holds more than the tensors in use.
Format: 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}},
then the data; offsets are relative to the end of the header.
"""
from __future__ import annotations

import json
import math
import mmap
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model.spec import CheckpointError

# Element sizes of every dtype the format defines, so offsets of any tensor can be checked.
ITEM_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}
# Dtypes Ferry converts to float32; BF16 is read as its raw 16 bits.
FLOAT_SOURCES = {"BF16": np.dtype("<u2"), "F16": np.dtype("<f2"), "F32": np.dtype("<f4")}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the format's own limit; a larger length is corruption


class MalformedFileError(CheckpointError):
    """The safetensors header is not valid."""


class TruncatedFileError(CheckpointError):
    """The file ends before the data its header promises."""


class UnsupportedDtypeError(CheckpointError):
    """A tensor's dtype is not one Ferry converts to float32."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: absolute byte range in its file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def _parse_entry(path: Path, name: str, entry, data_start: int) -> TensorInfo:
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise MalformedFileError(f"{path}: header entry for tensor '{name}' lacks dtype, shape or data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in ITEM_SIZES:
        raise UnsupportedDtypeError(f"{path}: tensor '{name}' has unknown dtype '{dtype}'")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise MalformedFileError(f"{path}: tensor '{name}' has invalid shape {shape!r}")
    if not (
        isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
        and 0 <= offsets[0] <= offsets[1]
    ):
        raise MalformedFileError(f"{path}: tensor '{name}' has invalid data_offsets {offsets!r}")
    nbytes = math.prod(shape) * ITEM_SIZES[dtype]
    if offsets[1] - offsets[0] != nbytes:
        raise MalformedFileError(
            f"{path}: tensor '{name}' spans {offsets[1] - offsets[0]} bytes, "
            f"but {dtype} {tuple(shape)} needs {nbytes}"
        )
    return TensorInfo(name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check a file's header against its size, reading no tensor data."""
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        f.seek(0)
        prefix = f.read(8)
        if len(prefix) < 8:
            raise TruncatedFileError(f"{path}: {size} bytes, too short to hold a safetensors header")
        length = int.from_bytes(prefix, "little")
        if length > MAX_HEADER_BYTES:
            raise MalformedFileError(f"{path}: header length {length} is not plausible")
        if 8 + length > size:
            raise TruncatedFileError(f"{path}: header of {length} bytes runs past the end of the {size}-byte file")
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MalformedFileError(f"{path}: header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise MalformedFileError(f"{path}: header is not a JSON object")
    data_start = 8 + length
    tensors = {
        name: _parse_entry(path, name, entry, data_start) for name, entry in header.items() if name != "__metadata__"
    }
    for info in tensors.values():
        if info.end > size:
            raise TruncatedFileError(
                f"{path}: truncated: tensor '{info.name}' ends at byte {info.end}, the file has {size}"
            )
    return tensors


class SafetensorsFile:
    """One safetensors file: its header now, its tensors as float32 when asked."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tensors = read_header(self.path)
        self._map: mmap.mmap | None = None

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def check_dtype(self, name: str) -> None:
        dtype = self.tensors[name].dtype
        if dtype not in FLOAT_SOURCES:
            raise UnsupportedDtypeError(
                f"{self.path}: tensor '{name}' has dtype {dtype}; expected one of {tuple(FLOAT_SOURCES)}"
            )

    def _buffer(self) -> mmap.mmap:
        if self._map is None:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._map

    def read(self, name: str, index: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
        """Tensor `name` (or its slice `[index]` along the first axis) as float32.

        Written into `out` when given (any float32 C-contiguous array of the same size: the caller's
        shape wins), else into a new array; never a view of the file.
        """
        info = self.tensors[name]
        self.check_dtype(name)
        source = FLOAT_SOURCES[info.dtype]
        shape, start = info.shape, info.start
        if index is not None:
            if not 0 <= index < shape[0]:
                raise IndexError(f"{self.path}: index {index} out of range for '{name}' {shape}")
            shape = shape[1:]
            start += index * math.prod(shape) * source.itemsize
        count = math.prod(shape)
        if out is None:
            out = np.empty(shape, np.float32)
        elif out.dtype != np.float32 or out.size != count or not out.flags.c_contiguous:
            raise ValueError(f"out must be C-contiguous float32 of {count} elements for '{name}' {shape}")
        raw = np.frombuffer(self._buffer(), source, count, start).reshape(out.shape)
        if info.dtype == "BF16":
            np.left_shift(raw, 16, out=out.view(np.uint32), dtype=np.uint32)  # bf16 = top half of f32
        else:
            np.copyto(out, raw)
        return out
