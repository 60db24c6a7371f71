"""The expert store: one aligned block per (layer, expert), in the layout the expert-group graph takes.

Legend: H hidden, I expert intermediate width, L layers, E experts per layer.

A block holds one slot's inputs of the expert-group graph, back to back at 64-byte offsets:
    fp32  gate_up float32 [2I, H] (gate rows, then up rows), down float32 [H, I]
    fp16  the same in float16 (BF16 -> FP16: values above 65504 are clamped to +-65504; values
          below the smallest FP16 subnormal round to zero; both are counted in the report)
    int8  gate_up int8 [2I, H], down int8 [H, I], gate_up_scale float32 [2I], down_scale float32 [H]:
          symmetric per-output-channel (per row) quantisation, w ~= q * scale, scale = max|row| / 127
Blocks sit `stride` bytes apart (a multiple of ALIGNMENT, page-sized, so a block can be mapped,
pinned or read with O_DIRECT on its own), layer-major: block (l, e) is number l * E + e. Streaming
an expert is one contiguous read of `block_bytes` bytes, and a block's checksum covers exactly those.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from artifact.manifest import BlockPart, ExpertBlock, ExpertStoreRecord, StorageReport
from model.spec import CheckpointError, ModelSpec

ALIGNMENT = 4096  # block stride unit: a page
PART_ALIGNMENT = 64  # offset of each array inside a block: a cache line
FP16_MAX = float(np.finfo(np.float16).max)  # 65504
FP16_TINY = float(np.finfo(np.float16).tiny)  # 2**-14, the smallest normal FP16
INT8_LEVELS = 127  # symmetric: -127..127, so that -q is always representable

HANDLING = {
    "fp32": "stored exactly (BF16 and FP16 sources widen to FP32 without loss)",
    "fp16": (f"values with |w| > {FP16_MAX:g} clamped to +-{FP16_MAX:g}; values below 2^-24 rounded to zero; "
             f"values below 2^-14 kept as FP16 subnormals with fewer significant bits"),
    "int8": (f"per output channel (row) w ~= q * scale, q in [-{INT8_LEVELS}, {INT8_LEVELS}], "
             f"scale = max|row| / {INT8_LEVELS}; all-zero rows get scale 1"),
}


class NonFiniteWeightError(CheckpointError):
    """An expert weight is NaN or infinite: the checkpoint is broken, no storage format can hold it."""


def _align(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def block_layout(spec: ModelSpec, dtype: str) -> tuple[BlockPart, ...]:
    """The arrays of one block, in the order the expert-group graph takes them per slot."""
    h, i = spec.hidden_size, spec.moe_intermediate_size
    if dtype not in HANDLING:
        raise ValueError(f"expert storage dtype must be one of {tuple(HANDLING)}, got {dtype!r}")
    weight = {"fp32": "float32", "fp16": "float16", "int8": "int8"}[dtype]
    arrays = [("gate_up", weight, (2 * i, h)), ("down", weight, (h, i))]
    if dtype == "int8":
        arrays += [("gate_up_scale", "float32", (2 * i,)), ("down_scale", "float32", (h,))]
    parts, offset = [], 0
    for name, part_dtype, shape in arrays:
        part = BlockPart(name, part_dtype, shape, offset)
        parts.append(part)
        offset = _align(offset + part.nbytes, PART_ALIGNMENT)
    return tuple(parts)


def block_bytes(parts: tuple[BlockPart, ...]) -> int:
    return max(p.offset + p.nbytes for p in parts)


def block_stride(parts: tuple[BlockPart, ...], alignment: int = ALIGNMENT) -> int:
    return _align(block_bytes(parts), alignment)


@dataclass(frozen=True)
class Region:
    """The bytes [start, end) of a block that hold its parts of one dtype: one tensor of the device's expert
    pool (`offload.device.ExpertPool`), each of whose rows holds this region of one block from its start."""

    dtype: np.dtype
    start: int
    end: int


def regions(parts, block_bytes: int) -> tuple[tuple[Region, ...], tuple[int, ...]]:
    """A block's dtype regions, in order, tiling [0, block_bytes) (the alignment gap before a region belongs
    to the one before it), and the region of each part. The block layout keeps the parts of one dtype
    together (weights, then int8's scales): a layout that does not is refused."""
    starts: list[tuple[np.dtype, int]] = []
    of_part = []
    for part in parts:
        dtype = np.dtype(part.dtype)
        if not starts or starts[-1][0] != dtype:
            if any(d == dtype for d, _ in starts):
                raise ValueError(f"block part {part.name} ({dtype}) is not next to the other {dtype} parts")
            starts.append((dtype, 0 if not starts else part.offset))
        of_part.append(len(starts) - 1)
    ends = [start for _, start in starts[1:]] + [block_bytes]
    return tuple(Region(d, start, end) for (d, start), end in zip(starts, ends)), tuple(of_part)


def part_offsets(parts, block_bytes: int) -> tuple[int, ...]:
    """Where each part starts in its region, in elements of its dtype: where the expert-launch graph finds
    it in a row of the pool tensor holding that region (`graphs.moe.ExpertLaunch`)."""
    found, of_part = regions(parts, block_bytes)
    return tuple((part.offset - found[r].start) // np.dtype(part.dtype).itemsize for part, r in zip(parts, of_part))


@dataclass
class _ReportTotals:
    """Running sums behind a StorageReport."""

    dtype: str
    values: int = 0
    nonzero_to_zero: int = 0
    overflow: int = 0
    subnormal: int = 0
    zero_channels: int = 0
    max_abs: float = 0.0
    error_sq: float = 0.0
    value_sq: float = 0.0
    worst: tuple[float, int, int] = (0.0, 0, 0)  # (relative RMS error, layer, expert)

    def add_block(self, layer: int, expert: int, error_sq: float, value_sq: float) -> None:
        self.error_sq += error_sq
        self.value_sq += value_sq
        relative = math.sqrt(error_sq / value_sq) if value_sq else 0.0
        if relative > self.worst[0]:
            self.worst = (relative, layer, expert)

    def report(self) -> StorageReport:
        return StorageReport(
            dtype=self.dtype, values=self.values, nonzero_to_zero=self.nonzero_to_zero, overflow=self.overflow,
            subnormal=self.subnormal, zero_channels=self.zero_channels, max_abs=self.max_abs,
            relative_rms_error=math.sqrt(self.error_sq / self.value_sq) if self.value_sq else 0.0,
            worst_layer=self.worst[1], worst_expert=self.worst[2], worst_relative_rms_error=self.worst[0],
            handling=HANDLING[self.dtype],
        )


def _to_fp16(w: np.ndarray, low: float, high: float, totals: _ReportTotals) -> tuple[np.ndarray, float]:
    """FP16 copy of FP32 `w` (whose min and max are `low`, `high`), clamped to the FP16 range; returns
    it and its squared error.

    A BF16 value (FP32 with the low 16 bits zero: every value of a BF16 checkpoint) within FP16's
    range and at or above its smallest normal (2^-14) is exact in FP16, BF16 having fewer significand
    bits, so for BF16 input only the smaller values are converted back to measure the error. (numpy's
    FP16 casts are slow: this halves the time of an FP16 convert.)"""
    error_sq = 0.0
    if high > FP16_MAX or low < -FP16_MAX:
        magnitude = np.abs(w)
        outside = magnitude[magnitude > FP16_MAX]
        totals.overflow += outside.size
        error_sq += float(np.dot(outside - FP16_MAX, outside - FP16_MAX))
        w = np.clip(w, -FP16_MAX, FP16_MAX)
    stored = w.astype(np.float16)
    if (w.view(np.uint32) & 0xFFFF).any():  # not all BF16 values: compare every value
        source = w.ravel()
        back = stored.astype(np.float32).ravel()
    else:
        source = w[np.abs(w) < FP16_TINY]
        back = source.astype(np.float16).astype(np.float32)
    error = back - source
    magnitude = np.abs(back)
    totals.nonzero_to_zero += int(np.count_nonzero(magnitude == 0)) - int(np.count_nonzero(source == 0))
    totals.subnormal += int(np.count_nonzero((magnitude > 0) & (magnitude < FP16_TINY)))
    return stored, error_sq + float(np.dot(error, error))


def _to_int8(w: np.ndarray, totals: _ReportTotals) -> tuple[np.ndarray, np.ndarray, float]:
    """Per-row symmetric INT8 of FP32 `w` [out, in]: (q int8, scale float32 [out], squared error)."""
    row_max = np.maximum(w.max(axis=1), -w.min(axis=1))  # [out]
    zero_rows = row_max == 0
    totals.zero_channels += int(np.count_nonzero(zero_rows))
    scale = np.where(zero_rows, 1.0, row_max / INT8_LEVELS).astype(np.float32)  # [out]
    q = np.divide(w, scale[:, None])
    np.rint(q, out=q)
    np.clip(q, -INT8_LEVELS, INT8_LEVELS, out=q)
    q8 = q.astype(np.int8)
    totals.nonzero_to_zero += int(np.count_nonzero(q == 0)) - int(np.count_nonzero(w == 0))
    np.multiply(q, scale[:, None], out=q)
    error = np.subtract(q, w, out=q).ravel()
    return q8, scale, float(np.dot(error, error))


def encode_expert(dtype: str, gate_up: np.ndarray, down: np.ndarray, totals: _ReportTotals,
                  where: str = "") -> tuple[list[np.ndarray], float, float]:
    """One expert's FP32 weights as the block's arrays in `block_layout` order, with the squared
    error of storing them and their squared norm (for the report)."""
    value_sq, ranges = 0.0, []
    for w in (gate_up, down):
        low, high = float(w.min()), float(w.max())  # NaN propagates into both
        if not (np.isfinite(low) and np.isfinite(high)):
            raise NonFiniteWeightError(f"{where}: expert weights hold NaN or infinite values")
        ranges.append((low, high))
        flat = w.ravel()
        value_sq += float(np.dot(flat, flat))
        totals.values += w.size
        totals.max_abs = max(totals.max_abs, high, -low)
    if dtype == "fp32":
        return [gate_up, down], 0.0, value_sq
    if dtype == "fp16":
        (gu, e1), (dn, e2) = _to_fp16(gate_up, *ranges[0], totals), _to_fp16(down, *ranges[1], totals)
        return [gu, dn], e1 + e2, value_sq
    if dtype == "int8":
        (gu, gu_scale, e1), (dn, dn_scale, e2) = _to_int8(gate_up, totals), _to_int8(down, totals)
        return [gu, dn, gu_scale, dn_scale], e1 + e2, value_sq
    raise ValueError(f"expert storage dtype must be one of fp32, fp16, int8; got {dtype!r}")


def decode_block(arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """FP32 gate_up and down from a block's arrays (dequantised for int8): what the graph computes with."""
    gate_up = arrays["gate_up"].astype(np.float32, copy=False)  # fp32: the stored arrays themselves
    down = arrays["down"].astype(np.float32, copy=False)
    if "gate_up_scale" in arrays:  # int8: astype made copies, scaled in place
        gate_up *= arrays["gate_up_scale"][:, None]
        down *= arrays["down_scale"][:, None]
    return gate_up, down


class StoreWriter:
    """Writes blocks in (layer, expert) order, hashing each, and returns the manifest's record."""

    def __init__(self, path: Path, relative: str, spec: ModelSpec, dtype: str):
        self.path, self.relative, self.spec, self.dtype = Path(path), relative, spec, dtype
        self.parts = block_layout(spec, dtype)
        self.block_bytes = block_bytes(self.parts)
        self.stride = block_stride(self.parts)
        self.buffer = np.zeros(self.stride, np.uint8)  # one block, reused; padding stays zero
        self.blocks: list[ExpertBlock] = []
        self.totals = _ReportTotals(dtype)
        self.file = open(self.path, "wb")

    def write(self, layer: int, expert: int, gate_up: np.ndarray, down: np.ndarray) -> int:
        """Encode and append one expert; returns the bytes written."""
        e = self.spec.num_experts
        if len(self.blocks) != layer * e + expert:
            raise ValueError(f"expert blocks must be written in order: got layer {layer} expert {expert} "
                             f"as block {len(self.blocks)}")
        arrays, error_sq, value_sq = encode_expert(self.dtype, gate_up, down, self.totals,
                                                   f"layer {layer} expert {expert}")
        for part, array in zip(self.parts, arrays):
            if array.shape != part.shape:
                raise ValueError(f"layer {layer} expert {expert}: {part.name} has shape {array.shape}, "
                                 f"expected {part.shape}")
            target = self.buffer[part.offset : part.offset + part.nbytes]
            target.view(part.dtype)[:] = np.ascontiguousarray(array, dtype=part.dtype).ravel()
        self.totals.add_block(layer, expert, error_sq, value_sq)
        content = memoryview(self.buffer)[: self.block_bytes]
        offset = len(self.blocks) * self.stride
        self.blocks.append(ExpertBlock(layer, expert, offset, hashlib.sha256(content).hexdigest()))
        self.file.write(self.buffer)
        return self.stride

    def close(self) -> ExpertStoreRecord:
        self.file.flush()
        size = self.file.tell()
        self.file.close()
        return ExpertStoreRecord(
            path=self.relative, size=size, dtype=self.dtype, alignment=ALIGNMENT, block_bytes=self.block_bytes,
            stride=self.stride, parts=self.parts, blocks=tuple(self.blocks), report=self.totals.report(),
        )

    def abort(self) -> None:
        self.file.close()
