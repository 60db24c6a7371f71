"""Device memory: the one owner of what lives on the device and of every copy between host and device.

Legend: S slots of the expert pool, K its tensors (one per storage dtype of an expert block), R_k the
row length of tensor k, P the parts of a block (`artifact.store.block_layout`).

Everything a launch reads on the device is made here: dense weights (`resident`), KV caches and states
(`zeros`, `upload`), launch inputs (`upload`, `scalar`), the expert pool (`expert_pool`, `store_pool`),
and what comes back is read here (`download`). Every transfer is counted in the ledger
(`offload.crossings.Crossings`) at the copy, so the ledger says what moved.

Two memory models, chosen by the device config (`memory`):

- **shared**: MindSpore's CPU backend, where host and device are one memory. A host array becomes a
  device tensor by wrapping it (`Tensor.from_numpy`, no copy); the expert pool is a host buffer, each of
  its tensors a view of it in one dtype, and a streamed block is read from the store straight into its
  slot; resident experts are the store file itself, mapped. Graphs read these buffers in place.
- **apart**: what a card has. Device tensors are made by MindSpore from a copy (`Tensor(array)`) and
  never aliased by a numpy array; a block reaches its slot through a host staging buffer and the
  slot-write graph (`graphs.moe.SlotWrite`), which copies the staged block into the pool in place.
  `device=cpu_apart` runs this on the CPU backend: the card's code path, tested here.

What differs on a card (never run on one; see the README): the staging buffer would be pinned
(`Tensor.pin_memory`, Ascend only in MindSpore 2.10) and the slot write a copy on a stream of its own
(`Tensor.copy_(non_blocking=True)`, `runtime.Stream`/`Event`, Ascend only) instead of a graph launch
on the compute stream. `STAGING` and `_write` below are those two places.
"""
from __future__ import annotations

import threading
from typing import Protocol

import numpy as np
import mindspore as ms

from artifact.store import regions
from offload.crossings import D2H, H2D, Crossings

MODELS = ("shared", "apart")
PAGE = 4096
GARBAGE = 0xA5  # what `poison` writes into a staging buffer once its copy is made


class BlockSource(Protocol):
    """Where streamed blocks come from: the artifact's expert store (`artifact.reader.ExpertStoreReader`).

    `parts` are `artifact.manifest.BlockPart`s (name, dtype, shape, offset): the arrays of one block."""

    parts: tuple
    block_bytes: int
    num_layers: int
    num_experts: int

    def read_into(self, layer: int, expert: int, out: np.ndarray) -> None: ...


def aligned_empty(shape, dtype: str = "float32", align: int = PAGE) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on an `align`-byte boundary."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(nbytes + align, np.uint8)
    start = -raw.ctypes.data % align
    return raw[start: start + nbytes].view(dtype).reshape(shape)


class ExpertPool:
    """S slots of expert blocks on the device, as the expert-launch graphs read them (`graphs.moe.ExpertLaunch`):
    `tensors`, one [S, R_k] tensor per dtype region of the block (`artifact.store.regions`), row s holding
    region k of the block in slot s from its start, so each part lies at the same offset of its row in
    either memory model (`artifact.store.part_offsets`).

    `fill(slot, layer, expert)` copies a block from the host store into a slot; it may run on any thread
    (the prefetcher's). In `shared` the store reads the block straight into the slot's row of the first
    tensor (a host buffer of whole blocks; a second region, INT8's scales, is copied on into its own
    tensor's row). In `apart` it reads the block into a staging buffer, and the copy to the device is the
    slot-write graph's, which `commit` runs on the launching thread (MindSpore launches stay on one
    thread): a launch commits before it runs, so it reads every block filled before it."""

    def __init__(self, device: "DeviceMemory", source: BlockSource, slots: int):
        self.device, self.source, self.num_slots = device, source, slots
        self.regions, _ = regions(source.parts, source.block_bytes)
        self.block_bytes = source.block_bytes
        self.stride = -(-source.block_bytes // PAGE) * PAGE
        self.counted = True  # fills are per-token crossings (not the placing of resident experts at start)
        self.buffer: np.ndarray | None = None  # shared: [S, stride] bytes, whole blocks; apart: None
        self._rest: list[np.ndarray] = []  # shared: the host arrays of the regions after the first
        self._queue: list[tuple[int, np.ndarray]] = []  # apart: (slot, staging buffer) awaiting the slot write
        self._free: list[np.ndarray] = []  # apart: staging buffers not in use
        self._lock = threading.Lock()

    # --- shared: host arrays the tensors wrap --------------------------------------------------------
    def _wrap(self, buffer: np.ndarray) -> None:
        """The pool over `buffer` [S, stride] bytes of whole blocks: the first region's tensor views it in
        place; each later region (small: INT8's scales) is copied out of it into an array of its own."""
        first = self.regions[0]
        self.buffer = buffer
        self._rest = [np.ascontiguousarray(buffer[:, r.start:r.end]).view(r.dtype) for r in self.regions[1:]]
        self.tensors = (ms.Tensor.from_numpy(buffer.view(first.dtype)),
                        *(ms.Tensor.from_numpy(rest) for rest in self._rest))

    # --- apart: one MindSpore tensor per region ------------------------------------------------------
    def _allocate(self) -> None:
        self.tensors = tuple(ms.Tensor(np.zeros((self.num_slots, (r.end - r.start) // r.dtype.itemsize), r.dtype))
                             for r in self.regions)  # made by MindSpore

    def fill(self, slot: int, layer: int, expert: int) -> None:
        """Copy block (layer, expert) of the host store into `slot` (apart: into a staging buffer, which the
        next `commit` copies into the slot)."""
        if self.buffer is not None:  # shared: the store reads straight into the slot
            row = self.buffer[slot]
            self.source.read_into(layer, expert, row)
            for region, rest in zip(self.regions[1:], self._rest):
                rest[slot] = row[region.start:region.end].view(region.dtype)
            if self.counted:
                self.device.ledger.copied("expert block", self.block_bytes)
            return
        with self._lock:
            staging = self._free.pop() if self._free else aligned_empty((self.stride,), "uint8")  # STAGING
        self.source.read_into(layer, expert, staging)
        with self._lock:
            self._queue.append((slot, staging))

    def commit(self) -> None:
        """Copy every block staged since the last commit into its slot, in the order they were filled: the
        slot-write graph takes the staging buffer as its input (a host->device copy on a card), and the
        buffer is free again once it has run."""
        if self.buffer is not None:
            return
        with self._lock:
            queue, self._queue = self._queue, []
        for slot, staging in queue:
            blocks = tuple(ms.Tensor.from_numpy(staging[r.start:r.end].view(r.dtype)[None]) for r in self.regions)
            self.device.write_slots(np.array([slot], np.int32), self.tensors, blocks)
            if self.counted:
                self.device.ledger.copied("expert block", self.block_bytes)  # the regions tile the block
            self.device.scrub(staging)
            with self._lock:
                self._free.append(staging)


class DeviceMemory:
    """The device's memory and the copies into and out of it, in one memory model (`MODELS`).

    `poison` (tests): every staging buffer is overwritten with garbage once its copy to the device is
    made, so a graph that read host memory in place instead of its device copy would compute garbage."""

    def __init__(self, model: str = "shared", ledger: Crossings | None = None, poison: bool = False):
        if model not in MODELS:
            raise ValueError(f"memory model must be one of {MODELS}, got {model!r}")
        self.model = model
        self.ledger = ledger or Crossings()
        self.poison = poison
        self.loaded_bytes = 0  # weights and resident experts placed on the device at start (not per token)
        self._slot_write = None

    @property
    def apart(self) -> bool:
        return self.model == "apart"

    # --- tensors made once ----------------------------------------------------------------------------
    def tensor(self, array: np.ndarray) -> ms.Tensor:
        """`array` on the device, not counted: shared wraps it, apart copies it (MindSpore's own tensor)."""
        return ms.Tensor(np.ascontiguousarray(array)) if self.apart else ms.Tensor.from_numpy(array)

    def resident(self, array: np.ndarray) -> ms.Tensor:
        """A weight placed on the device for the whole run (counted in `loaded_bytes`)."""
        self.loaded_bytes += array.nbytes
        return self.tensor(array)

    def zeros(self, shape, dtype) -> ms.Tensor:
        """A device tensor of zeros (a KV cache): made by MindSpore in either model, never aliased."""
        return ms.Tensor(np.zeros(shape, dtype))

    def expert_pool(self, source: BlockSource, slots: int) -> ExpertPool:
        """An empty pool of `slots` slots in `source`'s block format."""
        pool = ExpertPool(self, source, slots)
        if self.apart:
            pool._allocate()
        else:
            buffer = aligned_empty((slots, pool.stride), "uint8")
            buffer.fill(0)  # fault every page in now rather than during the first streams
            pool._wrap(buffer)
        return pool

    def store_pool(self, source: BlockSource, mapped: np.ndarray) -> ExpertPool:
        """Every block of the store on the device, block (l, e) in slot l * E + e. `mapped` is the store file
        mapped read-only as [L * E, stride] bytes: shared uses it in place; apart copies each block over."""
        count = source.num_layers * source.num_experts
        if self.apart:
            pool = self.expert_pool(source, count)
            pool.counted = False
            for slot in range(count):
                layer, expert = divmod(slot, source.num_experts)
                pool.fill(slot, layer, expert)
                pool.commit()
            pool.counted = True
            self.loaded_bytes += count * source.block_bytes
            return pool
        pool = ExpertPool(self, source, count)
        pool._wrap(mapped)
        self.loaded_bytes += count * source.block_bytes
        return pool

    # --- copies ---------------------------------------------------------------------------------------
    def scrub(self, staging: np.ndarray) -> None:
        if self.poison:
            staging.fill(GARBAGE)

    def write_slots(self, slots: np.ndarray, pool: tuple, blocks: tuple) -> None:
        """The slot-write graph: `blocks` into rows `slots` of the pool's tensors, in place."""
        if self._slot_write is None:
            from graphs.moe import SlotWrite

            self._slot_write = SlotWrite()
        self._slot_write(ms.Tensor(slots), *pool, *blocks)

    def upload(self, kind: str, array: np.ndarray) -> ms.Tensor:
        """`array` as a launch input: one host->device copy of its bytes."""
        self.ledger.count(kind, H2D, array.nbytes)
        return self.tensor(array)

    def scalar(self, kind: str, value: int) -> ms.Tensor:
        """A Python int as an int32 launch input (4 bytes)."""
        self.ledger.count(kind, H2D, 4)
        return ms.Tensor(value, ms.int32)

    def download(self, kind: str, tensor: ms.Tensor) -> np.ndarray:
        """A launch output read back: one device->host copy of its bytes."""
        array = tensor.asnumpy()
        self.ledger.count(kind, D2H, array.nbytes)
        return array
