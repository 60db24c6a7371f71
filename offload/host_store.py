"""Host expert store: every routed expert's weights in host memory, the source that slots stream from.

Legend: L layers, E experts per layer, H hidden, I expert intermediate width.

A *block* is what one device slot holds for one `(layer, expert)`, in the layout the expert-group
graph takes: gate_up [2I, H] (gate rows, then up rows) and down [H, I], float32. A store only has
to hand out a block's arrays (`expert_block`); the slot pool copies them into a slot, and host
compute (`offload.placement`) reads them in place. Two stores here:

- `HostExpertStore`: blocks held in RAM, one `[E, 2I, H]` / `[E, H, I]` pair per layer;
- `MappedExpertStore`: a file of page-aligned blocks, memory-mapped, written once from a checkpoint
  by `write_block_file`, so a run's RSS holds only the blocks the page cache keeps.

Another store (e.g. the converter's artifact) plugs in by offering the same three members:
`layout`, `num_layers`, `num_experts` and `expert_block(layer, expert)`. A store whose blocks need
converting (BF16, INT8) may add `copy_block(layer, expert, out)` to convert straight into a slot.

Page-locked memory: MindSpore 2.10's `Tensor.pin_memory()` needs the Ascend plugin (on the CPU
backend it fails creating an Ascend device context), so on the CPU backend blocks stay in
ordinary pageable memory, which is the same DRAM the "device" slots live in.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from convert.spec import ModelSpec

PAGE = 4096
BLOCK_FILE_VERSION = 1


@dataclass(frozen=True)
class BlockLayout:
    """Shapes and dtypes of the arrays of one expert block, in the order the expert-group graph takes
    them (FP32: gate_up, down; a narrower store may add arrays, e.g. INT8 weights then their scales)."""

    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...] = ("float32", "float32")

    def __post_init__(self):
        if len(self.shapes) != len(self.dtypes):
            raise ValueError(f"BlockLayout has {len(self.shapes)} shapes but {len(self.dtypes)} dtypes")

    @classmethod
    def for_spec(cls, spec: ModelSpec) -> "BlockLayout":
        h, i = spec.hidden_size, spec.moe_intermediate_size
        return cls(((2 * i, h), (h, i)))

    @property
    def array_bytes(self) -> tuple[int, ...]:
        return tuple(math.prod(shape) * np.dtype(dtype).itemsize for shape, dtype in zip(self.shapes, self.dtypes))

    @property
    def nbytes(self) -> int:
        """Bytes one stream of this block copies into a slot."""
        return sum(self.array_bytes)


class ExpertStore(Protocol):
    layout: BlockLayout
    num_layers: int
    num_experts: int

    def expert_block(self, layer: int, expert: int) -> tuple[np.ndarray, ...]: ...


def aligned_empty(shape: Sequence[int], dtype: str = "float32", align: int = PAGE) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on an `align`-byte boundary."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + align, np.uint8)
    start = -raw.ctypes.data % align
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def check_block(store: ExpertStore, layer: int, expert: int) -> None:
    if not 0 <= layer < store.num_layers:
        raise IndexError(f"layer {layer} out of range for a store of {store.num_layers} layers")
    if not 0 <= expert < store.num_experts:
        raise IndexError(f"expert {expert} out of range for a store of {store.num_experts} experts")


def check_matches(store: ExpertStore, spec: ModelSpec) -> None:
    """Refuse a store built for another model: layers, experts and block shapes must agree."""
    want = BlockLayout.for_spec(spec)
    got = (store.num_layers, store.num_experts, store.layout)
    if got != (spec.num_layers, spec.num_experts, want):
        raise ValueError(
            f"expert store holds {store.num_layers} layers x {store.num_experts} experts of {store.layout}, "
            f"the model needs {spec.num_layers} x {spec.num_experts} of {want}"
        )


class HostExpertStore:
    """Every block in RAM: per layer, gate_up [E, 2I, H] and down [E, H, I]; blocks are views."""

    def __init__(self, layers: Sequence[tuple[np.ndarray, np.ndarray]]):
        if not layers:
            raise ValueError("HostExpertStore needs at least one layer")
        e, two_i, h = layers[0][0].shape
        self.layout = BlockLayout(((two_i, h), (h, two_i // 2)))
        self.num_layers, self.num_experts = len(layers), e
        for index, (gate_up, down) in enumerate(layers):
            for name, array, shape in (("gate_up", gate_up, (e, two_i, h)), ("down", down, (e, h, two_i // 2))):
                if array.shape != shape or array.dtype != np.float32 or not array.flags.c_contiguous:
                    raise ValueError(
                        f"layer {index} {name}: expected C-contiguous float32 {shape}, got {array.dtype} {array.shape}"
                    )
        self.layers = list(layers)

    @classmethod
    def from_checkpoint(cls, checkpoint) -> "HostExpertStore":
        """Read every layer's experts (`Checkpoint.layer_experts`) into RAM."""
        return cls([checkpoint.layer_experts(layer) for layer in range(checkpoint.spec.num_layers)])

    def expert_block(self, layer: int, expert: int) -> tuple[np.ndarray, np.ndarray]:
        check_block(self, layer, expert)
        gate_up, down = self.layers[layer]
        return gate_up[expert], down[expert]


def _header_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def write_block_file(checkpoint, path: str | Path) -> Path:
    """Write every expert of `checkpoint` as page-aligned float32 blocks, one layer in memory at a time.

    Block (layer, expert) starts at byte `(layer * E + expert) * stride`; its arrays follow each
    other in `BlockLayout` order. A JSON header beside the file (`<path>.json`) records the layout.
    Written under temporary names and renamed at the end, so a failed write leaves no store behind.
    """
    path = Path(path)
    spec = checkpoint.spec
    layout = BlockLayout.for_spec(spec)
    stride = -(-layout.nbytes // PAGE) * PAGE
    header = {
        "format_version": BLOCK_FILE_VERSION,
        "num_layers": spec.num_layers,
        "num_experts": spec.num_experts,
        "shapes": [list(s) for s in layout.shapes],
        "dtypes": list(layout.dtypes),
        "stride": stride,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.truncate(spec.num_layers * spec.num_experts * stride)
            for layer in range(spec.num_layers):
                gate_up, down = checkpoint.layer_experts(layer)
                for expert in range(spec.num_experts):
                    f.seek((layer * spec.num_experts + expert) * stride)
                    f.write(gate_up[expert].tobytes())
                    f.write(down[expert].tobytes())
        header_tmp = _header_path(Path(tmp))
        header_tmp.write_text(json.dumps(header, indent=1))
        os.replace(header_tmp, _header_path(path))
        os.replace(tmp, path)
    except BaseException:
        for leftover in (Path(tmp), _header_path(Path(tmp))):
            leftover.unlink(missing_ok=True)
        raise
    return path


class MappedExpertStore:
    """Blocks memory-mapped from a file written by `write_block_file`; blocks are read-only views.

    A mapped page costs a page fault the first time the process touches it: measured here, a
    12 MiB block (real width, FP32) copies in ~7 ms on first touch and ~1.5-2 ms once mapped.
    `populate=True` maps every page at start (Linux `MAP_POPULATE`: 1.3 s for 6 GiB here), for a
    store that fits in RAM; without it, pages map on first use and the OS may drop cold ones.
    """

    def __init__(self, path: str | Path, populate: bool = False):
        self.path = Path(path)
        header_path = _header_path(self.path)
        try:
            header = json.loads(header_path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{header_path}: no block-file header beside {self.path}") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"{header_path}: not valid JSON ({err})") from None
        for key in ("format_version", "num_layers", "num_experts", "shapes", "dtypes", "stride"):
            if key not in header:
                raise ValueError(f"{header_path}: missing field '{key}'")
        if header["format_version"] != BLOCK_FILE_VERSION:
            raise ValueError(f"{header_path}: format_version {header['format_version']}, expected {BLOCK_FILE_VERSION}")
        self.layout = BlockLayout(tuple(tuple(s) for s in header["shapes"]), tuple(header["dtypes"]))
        self.num_layers, self.num_experts = header["num_layers"], header["num_experts"]
        self.stride = header["stride"]
        if self.stride < self.layout.nbytes or self.stride % PAGE:
            raise ValueError(f"{header_path}: stride {self.stride} cannot hold page-aligned blocks of "
                             f"{self.layout.nbytes} bytes")
        expected = self.num_layers * self.num_experts * self.stride
        size = self.path.stat().st_size
        if size != expected:
            raise ValueError(f"{self.path}: {size} bytes, its header describes {expected}")
        with open(self.path, "rb") as f:
            flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
            self._mmap = mmap.mmap(f.fileno(), 0, flags=flags, prot=mmap.PROT_READ)
        self._map = np.frombuffer(self._mmap, np.uint8)
        self._offsets = np.cumsum((0,) + self.layout.array_bytes[:-1])

    def expert_block(self, layer: int, expert: int) -> tuple[np.ndarray, ...]:
        check_block(self, layer, expert)
        base = (layer * self.num_experts + expert) * self.stride
        return tuple(
            np.ndarray(shape, dtype, self._map, base + int(offset))
            for shape, dtype, offset in zip(self.layout.shapes, self.layout.dtypes, self._offsets)
        )


def open_store(checkpoint, kind: str = "ram", path: str | Path | None = None,
               populate: bool = False) -> HostExpertStore | MappedExpertStore:
    """`ram`: read every expert into memory; `mmap`: map `path` (every page at start if `populate`),
    writing it from the checkpoint first if absent."""
    if kind == "ram":
        return HostExpertStore.from_checkpoint(checkpoint)
    if kind == "mmap":
        if path is None:
            raise ValueError("an 'mmap' expert store needs a path for its block file")
        if not Path(path).is_file():
            write_block_file(checkpoint, path)
        store = MappedExpertStore(path, populate)
        check_matches(store, checkpoint.spec)
        return store
    raise ValueError(f"unknown expert store kind '{kind}'; valid kinds: ram, mmap")
