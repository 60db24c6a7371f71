"""HF checkpoints converted on first use: one artifact per (checkpoint content, convert options).

`run.py` runs every model through an artifact. Given an HF directory it looks here for an artifact
of that checkpoint converted with the run's options, and converts it (`convert.pipeline.convert`,
with its progress bar) when there is none. The cache key is a fingerprint of the checkpoint's
content plus the options and the version of the CPU kernels the graphs call:

- `config.json`, the tokenizer and generation files, byte for byte;
- per weights file: its size, its whole safetensors header (every tensor's name, dtype, shape and
  offsets) and the SHA-256 of 16 evenly spaced 1 MiB samples of its data.

Hashing every byte of a 67 GB checkpoint would take minutes at each start; the samples and
headers catch a different, re-exported, re-quantised or truncated checkpoint, not an edit of a few
weights in place (run `python -m convert --force` for that). Copying or touching files changes
nothing. A lock file per key keeps two processes from converting the same artifact at once (the
second waits, then finds it), and the disk is checked up front: a convert that cannot fit is
refused with the `python -m convert` command to run elsewhere.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from artifact.dense import dense_plan, tensor_bytes
from artifact.manifest import MANIFEST_NAME, VERSION, ArtifactError
from convert.pipeline import ConvertOptions, convert, kernels_called
from model.spec import ModelSpec, load_spec
from artifact.store import block_layout, block_stride

SAMPLES, SAMPLE_BYTES = 16, 1 << 20
SIDE_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json")
DISK_MARGIN = 1 << 30  # bytes left free after a convert, for logs, graphs' temporaries and the OS


class NoRoomError(ArtifactError):
    """The cache's disk cannot hold the artifact a run would convert."""


@dataclass(frozen=True)
class CachedArtifact:
    path: Path
    built_now: bool
    seconds: float


def fingerprint(model_dir: Path) -> str:
    """Content fingerprint of an HF checkpoint directory (see the module docstring)."""
    digest = hashlib.sha256()
    for name in SIDE_FILES:
        path = model_dir / name
        digest.update(name.encode() + (path.read_bytes() if path.is_file() else b"\0missing"))
    for path in sorted(model_dir.glob("*.safetensors")):
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as f:
            head = f.read(8)
            header_len = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            digest.update(head + f.read(min(header_len, size)))
            data_start = 8 + header_len
            span = max(size - data_start - SAMPLE_BYTES, 0)
            for i in range(SAMPLES):
                f.seek(data_start + span * i // max(SAMPLES - 1, 1))
                digest.update(hashlib.sha256(f.read(SAMPLE_BYTES)).digest())
    return digest.hexdigest()


def options_key(options: ConvertOptions) -> dict:
    """What the artifact depends on besides the checkpoint: the options, and the version of the CPU
    kernels its graphs call (a graph runs only with the kernels it was exported with, so a Ferry with
    changed kernels converts again instead of finding an artifact it must refuse)."""
    return {"manifest_version": VERSION, "target": options.target, "dtype": options.dtype,
            "tiers": [[t.capacity, t.group] for t in options.tiers], "buckets": list(options.buckets),
            "max_context": options.max_context, "kernels": kernels_called(options.target)}


def artifact_bytes(spec: ModelSpec, options: ConvertOptions) -> int:
    """What the artifact will take on disk: the dense file and the expert store (graphs are small)."""
    dense = sum(map(tensor_bytes, dense_plan(spec, options.target, options.dtype)))
    return dense + spec.num_layers * spec.num_experts * block_stride(block_layout(spec, options.dtype))


def convert_command(model_dir: Path, out: Path, options: ConvertOptions) -> str:
    tiers = ",".join(f"{t.capacity}x{t.group}" for t in options.tiers)
    return (f"python -m convert --model-dir {model_dir} --out {out} --device {options.target} --dtype {options.dtype} --tiers {tiers} "
            f"--buckets {','.join(map(str, options.buckets))} --max-context {options.max_context}")


def cached_artifact(model_dir: Path, cache_dir: Path, options: ConvertOptions, progress: bool = True,
                    say=print) -> CachedArtifact:
    """The artifact of `model_dir` converted with `options`, from the cache or converted now."""
    start = time.perf_counter()
    model_dir, cache_dir = Path(model_dir), Path(cache_dir).expanduser()
    recipe = json.dumps({"checkpoint": fingerprint(model_dir), "options": options_key(options)}, sort_keys=True)
    key = hashlib.sha256(recipe.encode()).hexdigest()[:12]
    out = cache_dir / f"{model_dir.resolve().name}-{options.dtype}-{key}"
    if (out / MANIFEST_NAME).is_file():
        return CachedArtifact(out, False, time.perf_counter() - start)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / MANIFEST_NAME).is_file():  # another process converted it while this one waited
            return CachedArtifact(out, False, time.perf_counter() - start)
        need = artifact_bytes(load_spec(model_dir), options)
        free = shutil.disk_usage(cache_dir).free
        if need + DISK_MARGIN > free:
            raise NoRoomError(
                f"converting {model_dir} needs {need / 2**30:.2f} GiB in {cache_dir} (artifact_cache), which has "
                f"{free / 2**30:.2f} GiB free; free room, point artifact_cache at a larger disk, or convert "
                f"elsewhere and pass the result as model.path:\n  {convert_command(model_dir, out, options)}")
        say(f"convert   {model_dir} -> {out} ({need / 2**30:.2f} GiB, {options.dtype} experts): once, "
            f"later runs reuse it")
        convert(model_dir, out, options, force=out.exists(), progress=progress)
    return CachedArtifact(out, True, time.perf_counter() - start)
