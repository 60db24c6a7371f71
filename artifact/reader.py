"""Opening an artifact directory: manifest, file checks, dense weights and the expert store, in place.

Legend: V vocabulary, H hidden, L layers, E experts per layer.

`Artifact.open` reads `manifest.json` (typed, versioned, validated), refuses paths that leave the
directory, checks that every file is there at its recorded size, that the model is the expected
one, and (by default) the SHA-256 of every graph and of the dense file. Expert blocks are checked
on first use (`verify="lazy"`, what the runtime does), all at open (`verify="full"`, what
`python -m convert verify` does), or not at all (`verify="none"`). Arrays handed out are read-only
views of memory-mapped files: nothing is copied, and nothing is unpickled.
"""
from __future__ import annotations

import hashlib
import mmap
import os
from dataclasses import fields
from pathlib import Path

import numpy as np

from artifact.dense import SAFETENSORS_DTYPES, layer_tensor
from artifact.manifest import (
    MANIFEST_NAME,
    TOKENIZER_DIR,
    TOKENIZER_FILES,
    ArtifactError,
    ExpertStoreRecord,
    FileRecord,
    Manifest,
    resolve_inside,
)
from model.safetensors_file import read_header
from model.spec import CheckpointError, ModelSpec

VERIFY_MODES = ("full", "lazy", "none")


class MissingFileError(ArtifactError):
    """A file the manifest lists is not in the artifact directory."""


class ChecksumError(ArtifactError):
    """A file or block does not have the size or SHA-256 the manifest records."""


class ExpertChecksumError(ChecksumError):
    """One expert block is corrupted; `layer` and `expert` say which."""

    def __init__(self, message: str, layer: int, expert: int):
        super().__init__(message)
        self.layer, self.expert = layer, expert


class ModelMismatchError(ArtifactError):
    """The artifact was converted from another model than the one expected."""


class SourceMismatchError(ArtifactError):
    """A checkpoint's config or tokenizer files are not the ones the artifact was converted from."""


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file, read through one reused buffer (`f.read(n)` would allocate n bytes each time)."""
    digest = hashlib.sha256()
    buffer = bytearray(chunk)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while count := f.readinto(buffer):
            digest.update(view[:count])
    return digest.hexdigest()


def _map(path: Path) -> mmap.mmap | None:
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if f.seek(0, 2) else None


def spec_differences(found: ModelSpec, expected: ModelSpec) -> list[str]:
    return [f"{f.name}: artifact {getattr(found, f.name)!r}, expected {getattr(expected, f.name)!r}"
            for f in fields(ModelSpec) if getattr(found, f.name) != getattr(expected, f.name)]


class ExpertStoreReader:
    """The expert store: blocks read into slots with one `pread` each, or mapped read-only in place.

    The offload controller's host store (`offload.offloaded.BlockSource`): `parts`, `block_bytes`,
    `num_layers`, `num_experts` and `read_into`, which copies a block's bytes into a slot buffer,
    the host-to-device copy of a stream. Reading with `pread` rather than through the map keeps
    streamed blocks out of this process's resident set: the page cache holds them, and the OS may
    drop them, so a run's RSS is its slots, not the store it has touched. Fully resident runs use
    `arrays` (views of the map). A block's SHA-256 is checked the first time it is read either way."""

    def __init__(self, path: Path, record: ExpertStoreRecord, num_layers: int, num_experts: int):
        self.path, self.record = path, record
        self.parts = record.parts
        self.block_bytes = record.block_bytes
        self.num_layers, self.num_experts = num_layers, num_experts
        self.blocks = {(b.layer, b.expert): b for b in record.blocks}
        self._map = _map(path)
        self._fd = os.open(path, os.O_RDONLY)
        self.verified: set[tuple[int, int]] = set()

    def read_into(self, layer: int, expert: int, out: np.ndarray) -> None:
        """Copy block (layer, expert) into `out` (uint8, `block_bytes`), checking it on its first read."""
        block = self._block(layer, expert)
        view = memoryview(out)
        done = 0
        while done < self.block_bytes:
            count = os.preadv(self._fd, [view[done:self.block_bytes]], block.offset + done)
            if count <= 0:
                raise ChecksumError(f"{self.path}: block of layer {layer}, expert {expert} ends early "
                                    f"(read {done} of {self.block_bytes} bytes): truncated")
            done += count
        if (layer, expert) not in self.verified:
            self._check(layer, expert, view[: self.block_bytes])

    def _block(self, layer: int, expert: int):
        block = self.blocks.get((layer, expert))
        if block is None:
            raise IndexError(f"{self.path}: no block for layer {layer} expert {expert}")
        return block

    def block_bytes_of(self, layer: int, expert: int) -> memoryview:
        """The block's `block_bytes` bytes, in place: what a copy to the device moves."""
        block = self._block(layer, expert)
        return memoryview(self._map)[block.offset : block.offset + self.record.block_bytes]

    def mapped_blocks(self) -> np.ndarray:
        """The whole store as [L * E, stride] bytes, read-only, in place: row l * E + e is block (l, e), as the
        writer lays blocks out (a store laid out otherwise is refused, naming the first misplaced block)."""
        stride, count = self.record.stride, self.num_layers * self.num_experts
        for block in self.record.blocks:
            if block.offset != (block.layer * self.num_experts + block.expert) * stride:
                raise ArtifactError(f"{self.path}: block of layer {block.layer}, expert {block.expert} is at offset "
                                    f"{block.offset}, not at its place in layer-major order")
        return np.frombuffer(self._map, np.uint8, count * stride).reshape(count, stride)

    def arrays(self, layer: int, expert: int) -> dict[str, np.ndarray]:
        """The block's arrays by part name (read-only views of the mapped file)."""
        block = self._block(layer, expert)
        return {
            part.name: np.frombuffer(self._map, part.dtype, int(np.prod(part.shape)), block.offset + part.offset)
            .reshape(part.shape)
            for part in self.parts
        }

    def verify(self, layer: int, expert: int) -> None:
        self._check(layer, expert, self.block_bytes_of(layer, expert))

    def _check(self, layer: int, expert: int, content) -> None:
        block = self._block(layer, expert)
        digest = hashlib.sha256(content).hexdigest()
        if digest != block.sha256:
            raise ExpertChecksumError(
                f"{self.path}: expert block of layer {layer}, expert {expert} (bytes {block.offset}.."
                f"{block.offset + self.record.block_bytes}) fails its checksum: the store is corrupted; "
                f"re-run `python -m convert`", layer, expert)
        self.verified.add((layer, expert))

    def verify_once(self, layer: int, expert: int) -> None:
        if (layer, expert) not in self.verified:
            self.verify(layer, expert)


class Artifact:
    """A converted model: its manifest, dense weights (a `DenseWeights`), graphs' paths and expert store."""

    def __init__(self, root: Path, manifest: Manifest):
        self.root, self.manifest, self.spec = root, manifest, manifest.model
        self.experts = ExpertStoreReader(self.path_of(manifest.experts.path, "experts.path"), manifest.experts,
                                         self.spec.num_layers, self.spec.num_experts)
        self._dense_path = self.path_of(manifest.dense.file.path, "dense.file.path")
        self._dense = self._open_dense()

    @classmethod
    def open(cls, path: str | Path, verify: str = "lazy", expect: ModelSpec | None = None) -> "Artifact":
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
        root = Path(path)
        if not root.is_dir():
            raise ArtifactError(f"{root}: not a directory, so not a Ferry artifact")
        manifest_path = resolve_inside(root, MANIFEST_NAME, str(root))
        if not manifest_path.is_file():
            raise ArtifactError(
                f"{root}: no {MANIFEST_NAME}, so not a Ferry artifact (a convert that did not finish leaves "
                f"no output directory; re-run `python -m convert`)")
        manifest = Manifest.from_json(manifest_path.read_text(), str(manifest_path))
        if expect is not None:
            diffs = spec_differences(manifest.model, expect)
            if diffs:
                raise ModelMismatchError(
                    f"{root}: converted from another model ('{manifest.source.name}'): " + "; ".join(diffs))
        files = [(f"graphs[{i}].file", g.file) for i, g in enumerate(manifest.graphs) if g.file]
        files.append(("dense.file", manifest.dense.file))
        files += [(f"tokenizer[{i}]", f) for i, f in enumerate(manifest.tokenizer)]
        for where, record in files:
            _check_size(root, record.path, record.size, where)
        _check_size(root, manifest.experts.path, manifest.experts.size, "experts")
        artifact = cls(root, manifest)
        if verify != "none":
            artifact.verify_files()
        if verify == "full":
            artifact.verify_experts()
        return artifact

    def path_of(self, relative: str, where: str = "path") -> Path:
        return resolve_inside(self.root, relative, f"{self.root / MANIFEST_NAME}: {where}")

    # -- verification ---------------------------------------------------------------------------
    def verify_files(self) -> None:
        """SHA-256 of every graph, the dense file and the tokenizer files against the manifest."""
        for record in self.manifest.checksummed_files():
            self.verify_file(record)

    def tokenizer_dir(self) -> Path | None:
        """The directory of the checkpoint's tokenizer files, each checked against its SHA-256; None when
        the checkpoint had none."""
        for record in self.manifest.tokenizer:
            self.verify_file(record)
        return self.path_of(TOKENIZER_DIR) if self.manifest.tokenizer else None

    def check_source(self, model_dir: Path) -> None:
        """Raise `SourceMismatchError` naming every file of `model_dir` that is not what this artifact
        was converted from: config.json against `source.config_sha256`, each tokenizer file against
        its copy's record (a file only one side has is a difference too)."""
        model_dir = Path(model_dir)
        recorded = {Path(r.path).name: r.sha256 for r in self.manifest.tokenizer}
        expected = {"config.json": self.manifest.source.config_sha256, **recorded}
        problems = []
        for name in ("config.json", *TOKENIZER_FILES):
            path = model_dir / name
            found = sha256_of(path) if path.is_file() else None
            want = expected.get(name)
            if found == want:
                continue
            if found is None:
                problems.append(f"{path}: missing, the artifact was converted with one (SHA-256 {want[:16]}...)")
            elif want is None:
                problems.append(f"{path}: present, the artifact was converted without it")
            else:
                problems.append(f"{path}: SHA-256 {found[:16]}... differs from the artifact's {want[:16]}...")
        if problems:
            raise SourceMismatchError(f"{self.root} was not converted from {model_dir}: " + "; ".join(problems))

    def verify_file(self, record: FileRecord) -> None:
        digest = sha256_of(self.path_of(record.path))
        if digest != record.sha256:
            raise ChecksumError(f"{self.root / record.path}: SHA-256 {digest[:16]}... differs from the manifest's "
                                f"{record.sha256[:16]}...: the file was changed or corrupted")

    def verify_experts(self, on_block=None) -> None:
        for block in self.manifest.experts.blocks:
            self.experts.verify(block.layer, block.expert)
            if on_block is not None:
                on_block(block)

    # -- dense weights (the engine's DenseWeights protocol) -------------------------------------
    def _open_dense(self) -> dict[str, np.ndarray]:
        path = self._dense_path
        try:
            header = read_header(path)
        except CheckpointError as err:
            raise ArtifactError(f"dense weights: {err}") from None
        expected = {t.name: t.shape for t in self.manifest.dense.tensors}
        dtypes = {t.name: t.dtype for t in self.manifest.dense.tensors}
        found = {name: info.shape for name, info in header.items()}
        if found != expected:
            missing = sorted(set(expected) - set(found))
            extra = sorted(set(found) - set(expected))
            changed = sorted(n for n in set(found) & set(expected) if found[n] != expected[n])
            raise ArtifactError(f"{path}: tensors differ from the manifest (missing {missing[:5]}, "
                                f"unexpected {extra[:5]}, reshaped {changed[:5]})")
        buffer = _map(path)
        arrays = {}
        for name, info in header.items():
            dtype = np.dtype(dtypes[name])
            if info.dtype != SAFETENSORS_DTYPES[dtypes[name]]:
                raise ArtifactError(f"{path}: tensor '{name}' is {info.dtype}, the manifest records {dtype}")
            count = (info.end - info.start) // dtype.itemsize
            arrays[name] = np.frombuffer(buffer, dtype, count, info.start).reshape(info.shape)
        return arrays

    @property
    def kv_dtype(self):
        """The KV cache's dtype: the graphs' attention takes it in the target's compute dtype."""
        return np.float32 if self.manifest.target == "cpu" else np.float16

    def dense_tensor(self, name: str) -> np.ndarray:
        if name not in self._dense:
            raise KeyError(f"no dense tensor '{name}' in {self._dense_path}")
        return self._dense[name]

    def global_weights(self) -> dict[str, np.ndarray]:
        """embed [V, H], final_norm [H], lm_head [V, H] (the embed array itself when tied)."""
        embed = self._dense["embed"]
        head = embed if self.manifest.dense.tied_head else self._dense["lm_head"]
        return {"embed": embed, "final_norm": self._dense["final_norm"], "lm_head": head}

    def layer_weights(self, layer: int) -> dict[str, np.ndarray]:
        if not 0 <= layer < self.spec.num_layers:
            raise IndexError(f"layer {layer} out of range for {self.spec.num_layers} layers")
        prefix = layer_tensor(layer, "")
        return {name[len(prefix):]: array for name, array in self._dense.items() if name.startswith(prefix)}


def _check_size(root: Path, relative: str, size: int, where: str) -> None:
    path = resolve_inside(root, relative, f"{root / MANIFEST_NAME}: {where}")
    if not path.is_file():
        raise MissingFileError(f"{root}: {where} '{relative}' is missing from the artifact")
    actual = path.stat().st_size
    if actual != size:
        raise ChecksumError(f"{path}: {actual} bytes, the manifest records {size} ({where}): truncated or replaced")
