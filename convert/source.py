"""What conversion reads from a `Checkpoint` beyond its public methods, in one place.

Three needs of a streaming convert that `model.checkpoint` does not expose (yet):
- the large global tensors (embedding, LM head: [V, H], 2 GB each in FP32 for the real model)
  read in row chunks instead of whole;
- dropping the source's mapped pages once a layer is done. The reader maps each safetensors file
  with mmap and keeps the map; every page touched stays in this process's resident set (counted
  in RSS) until the kernel needs it, so without this a convert's RSS grows to the checkpoint's size;
- the size of what is read, for throughput figures.
Both reach into the checkpoint's private fields; a public `Checkpoint.global_rows` and
`Checkpoint.release` would replace this module.
"""
from __future__ import annotations

import mmap
from typing import Iterator

import numpy as np

from model.checkpoint import Checkpoint

ROW_CHUNK_BYTES = 64 << 20  # FP32 bytes per chunk of a global tensor


def global_rows(checkpoint: Checkpoint, key: str) -> Iterator[np.ndarray]:
    """Global tensor `key` (`embed`, `final_norm`, `lm_head`) as FP32, in chunks of whole rows.

    The chunk buffer is reused: consume each chunk before asking for the next."""
    located = checkpoint._globals["embed" if key == "lm_head" and checkpoint.spec.tie_word_embeddings else key]
    shape = located.shape
    if len(shape) == 1:
        yield located.read()
        return
    row_bytes = 4 * int(np.prod(shape[1:]))
    per_chunk = max(1, ROW_CHUNK_BYTES // row_bytes)
    chunk = np.empty((min(per_chunk, shape[0]),) + tuple(shape[1:]), np.float32)
    for start in range(0, shape[0], per_chunk):
        rows = min(per_chunk, shape[0] - start)
        for r in range(rows):
            located.read(start + r, chunk[r])
        release(checkpoint)
        yield chunk[:rows]


def source_bytes(checkpoint: Checkpoint) -> int:
    """Checkpoint bytes of every tensor Ferry reads (the vision tower and other ignored tensors excluded)."""
    total = 0
    for name, file in checkpoint._where.items():
        if name in checkpoint._mapped:
            info = file.tensors[name]
            total += info.end - info.start
    return total


def release(checkpoint: Checkpoint) -> None:
    """Unmap the pages this process touched in the checkpoint's files (the page cache keeps them)."""
    files = {id(f): f for f in checkpoint._where.values()}
    for file in files.values():
        mapped = getattr(file, "_map", None)
        if mapped is not None and hasattr(mapped, "madvise"):
            mapped.madvise(mmap.MADV_DONTNEED)
