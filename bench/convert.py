"""Convert a real-width checkpoint: peak RSS against one layer's weights, throughput, narrow-storage error.

    python -m bench.convert [--layers 4] [--vocab 8192] [--dtypes fp32,fp16,int8] [--keep]

The checkpoint is `bench.realwidth`'s (hidden 2048, 256 experts of 3 x 512 x 2048, BF16, cached
outside the repository). Each convert runs in its own process, so its peak RSS (VmHWM, which counts
mapped file pages as well as allocations) is the convert's alone; it is printed
as a ratio to one decoder layer's weights in the checkpoint, beside the RSS of a process that only
imports and sets up MindSpore (the floor every convert starts from). Throughput is checkpoint bytes
read per second, for the weights stage alone and for the whole convert (graph export and the final
fsync of the artifact included: a large store is bounded by the disk's write speed).
The checkpoint is read from the page cache when it was written or read recently; the figures say
what converting costs, not what the disk delivers.

Narrow storage error: for each artifact, expert-group launches of layer 0 on random inputs
(8 experts x 16 tokens) against the same experts computed in FP32 from the checkpoint, as relative
RMS output error, with the store's own weight error report.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from bench.realwidth import CACHE, real_width_checkpoint

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30


def layer_bytes(model_dir: Path, layer: int) -> int:
    """Checkpoint bytes of one decoder layer: its dense tensors and its routed experts."""
    from model.checkpoint import Checkpoint

    checkpoint = Checkpoint(model_dir)
    marker = f"layers.{layer}."
    return sum(file.tensors[name].end - file.tensors[name].start
               for name, file in checkpoint._where.items() if marker in name and name in checkpoint._mapped)


def peak_rss() -> int:
    """This process's peak resident set (VmHWM), in bytes. Not `ru_maxrss`: Linux carries a parent's
    peak into a child it spawns, so a child's `ru_maxrss` can be its parent's."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def run_child(args: list[str]) -> dict:
    """Run this module as a worker in a child process; the JSON object it prints last."""
    done = subprocess.run([sys.executable, "-m", "bench.convert", *args], cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"bench.convert {' '.join(args)} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def worker_floor() -> dict:
    """Everything a convert imports and sets up, and nothing else."""
    import convert.pipeline  # noqa: F401
    from runtime.backend import configure

    configure()
    return {}


def worker_convert(model_dir: str, out: str, dtype: str, max_context: int) -> dict:
    from artifact.manifest import TierRecord
    from convert.pipeline import ConvertOptions, convert

    tiers = (TierRecord(1, 8), TierRecord(8, 4), TierRecord(64, 2))
    options = ConvertOptions(dtype, tiers, (16, 64), max_context)
    manifest, stats = convert(model_dir, out, options, force=True, progress=False)
    return {"source_bytes": stats.source_bytes, "weights_s": stats.weights_s, "graph_s": stats.graph_s,
            "total_s": stats.total_s, "expert_bytes": stats.expert_bytes, "dense_bytes": stats.dense_bytes,
            "graphs": stats.graphs}


def expert_output_error(model_dir: Path, artifact_dir: Path, layer: int = 0) -> float:
    """Relative RMS error of 8 experts' outputs (C random tokens each) through the artifact's widest tier
    graph (largest capacity C a launch can fill) and store, against the same experts in FP32 from the
    checkpoint."""
    import mindspore as ms

    from artifact.reader import Artifact
    from model.checkpoint import Checkpoint
    from offload.device import DeviceMemory
    from offload.store_weights import StoreExperts
    from offload.tiers import Tier
    from runtime.backend import configure
    from runtime.exported import ExportedGraphs

    configure()
    artifact = Artifact.open(artifact_dir, verify="none")
    checkpoint = Checkpoint(model_dir)
    tokens = max(artifact.manifest.launch_sizes())
    tier = max((t for t in artifact.manifest.tiers if t.capacity <= tokens), key=lambda t: t.capacity)
    graph = ExportedGraphs(artifact).expert_group(Tier(tier.capacity, tier.group), tokens)
    weights = StoreExperts(artifact.experts, DeviceMemory(), verify=False)
    pool = weights.device_pool
    rng = np.random.default_rng(0)
    experts = list(range(0, artifact.spec.num_experts, artifact.spec.num_experts // 8))[:8]
    hidden = ms.Tensor.from_numpy(np.zeros((tokens, artifact.spec.hidden_size), np.float32))
    shape = (tier.group, tier.capacity)
    rows = np.zeros(shape, np.int32)
    rows[0] = np.arange(tier.capacity)  # slot 0 holds tokens 0..C-1; the other slots are empty
    scale = np.zeros(shape, np.float32)
    scale[0] = 1.0
    counts = np.zeros(tier.group, np.int32)
    counts[0] = tier.capacity
    launch = [ms.Tensor.from_numpy(a) for a in (rows, scale, counts)]
    error = norm = 0.0
    for expert in experts:
        x = rng.standard_normal((tokens, artifact.spec.hidden_size)).astype(np.float32)
        slots = ms.Tensor.from_numpy(weights.launch_slots(layer, [expert] * tier.group))
        ours = graph(hidden, ms.Tensor.from_numpy(x), *launch, slots, *pool.tensors).asnumpy()[: tier.capacity]
        gate_up, down = checkpoint.expert_weights(layer, expert)
        both = x[: tier.capacity] @ gate_up.T  # [C, 2I]
        i = down.shape[1]
        reference = (both[:, :i] / (1 + np.exp(-both[:, :i])) * both[:, i:]) @ down.T  # [C, H]
        error += float(((ours - reference) ** 2).sum())
        norm += float((reference ** 2).sum())
    return (error / norm) ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--dtypes", default="fp32,fp16,int8")
    parser.add_argument("--max-context", type=int, default=1024)
    parser.add_argument("--keep", action="store_true", help="keep the artifacts (under the bench cache)")
    parser.add_argument("--worker", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        kind, *rest = args.worker
        result = worker_floor() if kind == "floor" else worker_convert(rest[0], rest[1], rest[2], int(rest[3]))
        print(json.dumps({**result, "peak_rss": peak_rss()}))
        return

    model_dir = real_width_checkpoint(args.layers, args.vocab)
    one_layer = layer_bytes(model_dir, 0)
    floor = run_child(["--worker", "floor"])["peak_rss"]
    print(f"checkpoint {model_dir} ({args.layers} layers, vocab {args.vocab}, BF16)")
    print(f"one layer's weights: {one_layer / GIB:.2f} GiB; MindSpore process floor RSS {floor / GIB:.2f} GiB "
          f"({floor / one_layer:.2f} x a layer)\n")
    print(f"{'experts':8} {'peak RSS':>10} {'/ layer':>8} {'weights GB/s':>13} {'overall GB/s':>13} "
          f"{'graphs':>12} {'store':>10} {'expert out err':>15} {'weight err':>11}")
    for dtype in args.dtypes.split(","):
        out = CACHE / f"artifact-{model_dir.name}-{dtype}"
        os.sync()  # the previous artifact's writeback must not slow this convert
        stats = run_child(["--worker", "convert", str(model_dir), str(out), dtype, str(args.max_context)])
        peak = stats["peak_rss"]
        from artifact.reader import Artifact

        report = Artifact.open(out, verify="none").manifest.experts.report
        error = expert_output_error(model_dir, out)
        gb = stats["source_bytes"] / 1e9
        print(f"{dtype:8} {peak / GIB:8.2f} GiB {peak / one_layer:8.2f} {gb / stats['weights_s']:13.2f} "
              f"{gb / stats['total_s']:13.2f} {stats['graphs']:4d} in {stats['graph_s']:4.0f} s "
              f"{stats['expert_bytes'] / GIB:6.2f} GiB {error:15.2e} {report.relative_rms_error:11.2e}",
              flush=True)
        if not args.keep:
            shutil.rmtree(out)
    print("\npeak RSS / layer: the convert process's peak resident set over one decoder layer's checkpoint bytes "
          "(the issue's bound is 2). GB/s: checkpoint bytes read per second (weights stage; whole convert).")


if __name__ == "__main__":
    main()
