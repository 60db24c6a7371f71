"""HF checkpoint -> artifact directory, streamed layer by layer, published atomically.

Order of work: graphs (shapes only), then the dense file and the expert store side by side, one
layer at a time (a layer's dense tensors, then its experts one by one), then `manifest.json`.
Everything is written into a sibling temporary directory `DST.tmp-<pid>-<random>` which is renamed
to DST only once the manifest is in it; a failure or Ctrl-C removes it, and a kill -9 leaves it
under a name no loader reads (the next convert to the same DST removes it once its process is gone).
"""
from __future__ import annotations

import hashlib
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from model.checkpoint import Checkpoint
from artifact.dense import DenseWriter, layer_tensor
from convert.export import export_graph, file_record, graph_plans
from artifact.manifest import (EXPERT_DTYPES, MANIFEST_NAME, TARGETS, TOKENIZER_DIR, TOKENIZER_FILES, ArtifactError,
                               FileRecord, Manifest, SourceRecord, TierRecord)
from convert.source import global_rows, release, source_bytes
from model.spec import ModelSpec
from artifact.store import StoreWriter

DENSE_FILE = "dense.safetensors"
EXPERT_FILE = "experts.bin"
TMP_MARK = ".tmp-"
RELEASE_EVERY = 16  # experts between drops of the checkpoint's mapped pages (~100 MB at real width)


class ArtifactExistsError(ArtifactError):
    """The output directory exists and --force was not given (or it is not an artifact to replace)."""


@dataclass(frozen=True)
class ConvertOptions:
    dtype: str = "fp32"  # expert storage: fp32, fp16 or int8
    tiers: tuple[TierRecord, ...] = (TierRecord(1, 8), TierRecord(8, 4), TierRecord(64, 2))
    buckets: tuple[int, ...] = (16, 64)  # prefill launch sizes (decode, 1 token, is always exported)
    max_context: int = 1024
    target: str = "cpu"  # the device the graphs are for: cpu or ascend_310p3 (FP16 compute, no CPU op)

    def __post_init__(self):
        if self.dtype not in EXPERT_DTYPES:
            raise ValueError(f"expert dtype must be one of {EXPERT_DTYPES}, got {self.dtype!r}")
        if self.target not in TARGETS:
            raise ValueError(f"target device must be one of {TARGETS}, got {self.target!r}")
        if self.target != "cpu" and self.dtype == "fp32":
            raise ValueError(f"the {self.target} computes in FP16: store its experts as fp16 or int8, not fp32")
        capacities = [t.capacity for t in self.tiers]
        if not self.tiers or capacities != sorted(set(capacities)) or min(t.group for t in self.tiers) < 1:
            raise ValueError(f"tiers must be non-empty with positive groups and distinct ascending capacities, "
                             f"got {[(t.capacity, t.group) for t in self.tiers]}")
        if list(self.buckets) != sorted(set(self.buckets)) or not self.buckets or self.buckets[0] < 2:
            raise ValueError(f"prefill buckets must be sorted, distinct and above 1, got {list(self.buckets)}")
        if self.max_context < 1:
            raise ValueError(f"max_context must be positive, got {self.max_context}")


@dataclass
class ConvertStats:
    """What a convert did and how long each stage took (seconds)."""

    source_bytes: int = 0  # checkpoint bytes of every tensor read
    dense_bytes: int = 0
    expert_bytes: int = 0
    graphs: int = 0
    graph_s: float = 0.0
    weights_s: float = 0.0
    total_s: float = 0.0

    @property
    def weights_gb_per_s(self) -> float:
        return self.source_bytes / self.weights_s / 1e9 if self.weights_s else 0.0


class Progress:
    """A tqdm bar on stderr, or nothing."""

    def __init__(self, enabled: bool, total: int, desc: str, unit: str):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=True, file=sys.stderr, dynamic_ncols=True)

    def update(self, n: int, note: str | None = None) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if note:
                self.bar.set_postfix_str(note, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _prepare_output(out: Path, force: bool) -> None:
    if not out.exists() and not out.is_symlink():
        return
    if not force:
        raise ArtifactExistsError(f"{out} already exists; pass --force to replace it")
    if out.is_symlink() or not out.is_dir():
        raise ArtifactExistsError(f"{out} exists and is not a directory; refusing to replace it")
    if any(out.iterdir()) and not (out / MANIFEST_NAME).is_file():
        raise ArtifactExistsError(f"{out} is a non-empty directory without {MANIFEST_NAME}, not an artifact; "
                                  f"refusing to delete it even with --force")


def _remove_stale_temporaries(out: Path) -> None:
    """Delete `DST.tmp-<pid>-*` directories left by converts that were killed (their pid is gone)."""
    for candidate in out.parent.glob(f"{out.name}{TMP_MARK}*"):
        pid = candidate.name[len(out.name) + len(TMP_MARK):].split("-")[0]
        if not pid.isdigit() or not candidate.is_dir():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(candidate, ignore_errors=True)
        except PermissionError:
            pass  # alive, someone else's


def _publish(tmp: Path, out: Path) -> None:
    """Rename the finished directory into place; an existing artifact is moved aside first."""
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f"{out.name}.old-{os.getpid()}-", dir=out.parent))
        os.rename(out, old / out.name)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)


def convert(model_dir: str | Path, out: str | Path, options: ConvertOptions = ConvertOptions(), force: bool = False,
            progress: bool = True, on_layer: Callable[[int], None] | None = None) -> tuple[Manifest, ConvertStats]:
    """Convert the checkpoint in `model_dir` to an artifact at `out`; returns its manifest and stats.

    `on_layer(layer)` is called after each layer is written (tests use it to interrupt a convert).
    """
    start = time.perf_counter()
    model_dir, out = Path(model_dir), Path(out).absolute()
    checkpoint = Checkpoint(model_dir)  # validates every tensor before anything is written
    spec = checkpoint.spec
    _prepare_output(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(out)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}{TMP_MARK}{os.getpid()}-", dir=out.parent))
    stats = ConvertStats(source_bytes=source_bytes(checkpoint))
    try:
        graphs = _export_graphs(spec, options, tmp, progress, stats)
        dense, experts = _write_weights(checkpoint, options, tmp, progress, stats, on_layer)
        manifest = Manifest(
            model=spec,
            source=SourceRecord(model_dir.resolve().name, _sha256_file(model_dir / "config.json")),
            max_context=options.max_context, buckets=tuple(options.buckets), tiers=tuple(options.tiers),
            graphs=tuple(graphs), dense=dense, experts=experts, target=options.target,
            kernels=kernels_called(options.target), tokenizer=_copy_tokenizer(model_dir, tmp), created_by=_created_by(),
        )
        manifest.validate(f"{tmp / MANIFEST_NAME} (being written)")
        (tmp / MANIFEST_NAME).write_text(manifest.to_json())
        _fsync_tree(tmp)
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    stats.total_s = time.perf_counter() - start
    return manifest, stats


def _copy_tokenizer(model_dir: Path, tmp: Path) -> tuple[FileRecord, ...]:
    """The checkpoint's tokenizer files, copied byte for byte under TOKENIZER_DIR and recorded."""
    records = []
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            (tmp / TOKENIZER_DIR).mkdir(exist_ok=True)
            shutil.copyfile(model_dir / name, tmp / TOKENIZER_DIR / name)
            records.append(file_record(tmp, f"{TOKENIZER_DIR}/{name}"))
    return tuple(records)


def _created_by() -> str:
    try:
        from importlib.metadata import version

        return f"ferry {version('ferry')}"
    except Exception:  # not installed as a package (running from a checkout)
        return "ferry"


def kernels_called(target: str) -> str | None:
    """What the exported graphs call: on the cpu target, Ferry's CPU kernel library when it is built
    (graphs.moe.ExpertGroup and graphs.layer.DeltaNetLayer ask the same question), named by its
    environment variable."""
    from kernels.build import VARIABLE, library

    return VARIABLE if target == "cpu" and library() is not None else None


def _export_graphs(spec: ModelSpec, options: ConvertOptions, tmp: Path, progress: bool, stats: ConvertStats):
    from runtime.backend import configure

    configure()
    began = time.perf_counter()
    plans = graph_plans(spec, options.buckets, options.tiers, options.max_context, options.dtype, options.target)
    bar = Progress(progress, len(plans), "graphs", "graph")
    records = []
    try:
        for plan in plans:
            records.append(export_graph(plan, spec, options.dtype, tmp, options.target))
            bar.update(1, plan.name)
    finally:
        bar.close()
    stats.graphs = len(records)
    stats.graph_s = time.perf_counter() - began
    return records


def _write_weights(checkpoint: Checkpoint, options: ConvertOptions, tmp: Path, progress: bool, stats: ConvertStats,
                   on_layer):
    spec = checkpoint.spec
    began = time.perf_counter()
    dense = DenseWriter(tmp / DENSE_FILE, DENSE_FILE, spec, options.target, options.dtype)
    store = StoreWriter(tmp / EXPERT_FILE, EXPERT_FILE, spec, options.dtype)
    total = sum(math.prod(t.shape) for t in dense.plan) + spec.num_layers * spec.num_experts * spec.expert_params
    bar = Progress(progress, total, f"weights ({options.dtype} experts)", "param")
    try:
        for key in ("embed", "final_norm", "lm_head"):
            if key == "lm_head" and spec.tie_word_embeddings:
                continue
            written = dense.write(key, global_rows(checkpoint, key))
            stats.dense_bytes += written
            bar.update(written // 4, key)
        for layer in range(spec.num_layers):
            for key, array in checkpoint.layer_weights(layer).items():
                stats.dense_bytes += dense.write(layer_tensor(layer, key), array)
                bar.update(array.size)
            for expert in range(spec.num_experts):
                gate_up, down = checkpoint.expert_weights(layer, expert)
                stats.expert_bytes += store.write(layer, expert, gate_up, down)
                bar.update(gate_up.size + down.size, f"layer {layer + 1}/{spec.num_layers}")
                if expert % RELEASE_EVERY == RELEASE_EVERY - 1:
                    release(checkpoint)
            release(checkpoint)
            if on_layer is not None:
                on_layer(layer)
        records = dense.close(), store.close()
    except BaseException:
        dense.abort()
        store.abort()
        raise
    finally:
        bar.close()
    stats.weights_s = time.perf_counter() - began
    return records


def _fsync_tree(root: Path) -> None:
    """Flush every written file and directory to disk before the rename makes them visible."""
    for path in sorted(root.rglob("*")) + [root]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
