"""The scale bench: Qwen3.6-35B-A3B's real shapes with many layers, converted and run as a user would.

    python bench/scale.py [--layers 16] [--vocab 248320] [--dtypes int8,fp16] [--budget-fraction 0.25]
                          [--tokens 32] [--cold-start-layers 4] [--no-resident] [--keep] [--clean]

What it builds: a checkpoint of the real model's shapes (`bench.realwidth.real_width_spec`: hidden
2048, 256 experts top-8 of 3 x 512 x 2048 plus the shared expert, 3 DeltaNet : 1 attention layers,
16/2 attention heads of 256, DeltaNet 16/32 heads of 128, the real vocabulary of 248320), random
weights, BF16, `--layers` layers deep (the real model has 40). It is written once and cached
under the bench cache (`~/.cache/ferry/bench`, or $FERRY_BENCH_CACHE). Sizes on disk: the
checkpoint ~1.68 GB per layer + 2 GB of embedding and head; an FP16 artifact ~1.75 GB per layer + 4 GB
(embedding and head are stored FP32); INT8 ~0.95 GB per layer + 4 GB. The sizes and the free disk
are printed first, and the bench refuses to start (status 1) when what it would write cannot fit.

What it measures, per expert storage dtype, one artifact at a time (each deleted after its runs):
- convert: `python -m convert --model-dir CKPT --out ART --dtype D` (the CLI's defaults: tiers
  `default`, buckets 16,64, max_context 1024) in a child process, by a worker mode of this script
  that runs the same options through `convert.pipeline.convert`. Its peak RSS is the child's own
  VmHWM (mapped checkpoint pages count), shown also against one layer's checkpoint bytes (the
  issue's bound is 2: a convert streams layer by layer); throughput is checkpoint GB (10^9 bytes)
  read per second over the whole convert (graph export and the artifact's fsync included), and
  over the weights stage alone. Artifact size: allocated on disk (du), experts.bin, dense.safetensors.
- run: `python run.py +model=local model.path=ART placement.expert_budget_gb=B prompt_ids=[...]
  max_new_tokens=N output_json=...`, greedy, with B = `--budget-fraction` of the experts' bytes in
  that dtype (every expert block at the store's stride), so experts stream from experts.bin.
  From its record: the memory plan's total against the measured peak RSS (target: within 15%);
  cold start (build_s: graph load and dense weights; warmup_s: the first run of every graph shape),
  which should not grow with layers because all layers of a kind share one graph file per shape
  (the graph file count is printed); decode tokens/s; the offload counters (hit rate, MB streamed
  per decode token, fraction of launch time stalled on copies); the generated ids.
- the same artifact with every expert resident (`placement.expert_budget_gb=all`) when the plan
  says it fits in RAM (else run.py's refusal line is shown); its greedy ids must equal the streamed
  run's (same weights, same arithmetic), and the bench fails (status 1) when they do not.
- `--cold-start-layers L`: a checkpoint of the same shape but L layers, the first dtype only,
  converted and run the same way last, so that build + warm-up at two depths sit side by side.

How to read it: the plan/RSS ratio says whether `mode=plan` can be trusted to refuse what would not
fit; cold start at 4 and at 16 layers should differ by the dense weights' load time only; decode
tokens/s and MB per token at a 25% budget are what a larger-than-memory model costs here. The
weights are random, so routing has no locality: hit rates are a pessimistic stand-in for a trained
model's. The 2 shared cores make single figures swing by +-30%; on a card, streaming is a PCIe copy
instead of a page-cache read, so the stall fraction is the one figure that does not transfer.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.realwidth import CACHE, real_width_spec  # noqa: E402
from model.spec import ModelSpec  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GIB, GB, MB = 2**30, 1e9, 1e6
DISK_MARGIN = 2 * GIB  # left free: logs, graph export temporaries, the other benches' writes
TARGET_RATIO = 0.15  # peak RSS within 15% of the memory plan
ARTIFACTS = CACHE / "scale"


class ChildFailed(RuntimeError):
    """A child process exited non-zero; the message carries its stderr tail."""


# ---- sizes, before anything is written -----------------------------------------------------------

def checkpoint_path(layers: int, vocab: int) -> Path:
    """Where `bench.realwidth.real_width_checkpoint(layers, vocab)` keeps it (its naming)."""
    return CACHE / f"realwidth-{layers}l-v{vocab}-bf16"


@dataclass(frozen=True)
class Sizes:
    """Bytes on disk of one depth's checkpoint and artifacts (graphs, a few MB, left out)."""

    layers: int
    checkpoint: int
    checkpoint_edge: int  # embedding, head and final norm, BF16
    artifact: dict[str, int]  # dtype -> bytes
    artifact_edge: dict[str, int]  # dtype -> the same in the artifact (FP32 beside fp32 experts, else FP16)
    layer_checkpoint: int  # one decoder layer (layer 0, DeltaNet) in the checkpoint

    def per_layer(self, total: int, edge: int) -> float:
        return (total - edge) / self.layers


def sizes(spec: ModelSpec, dtypes: list[str]) -> Sizes:
    import numpy as np

    from artifact.dense import dense_dtype, dense_plan, tensor_bytes
    from model.names import layer_names
    from artifact.store import block_layout, block_stride
    from app.plan import dense_params

    edge, layers = dense_params(spec)
    experts = spec.num_layers * spec.num_experts
    checkpoint = 2 * (edge + layers + experts * spec.expert_params)
    artifact = {d: sum(map(tensor_bytes, dense_plan(spec, "cpu", d))) + experts * block_stride(block_layout(spec, d))
                for d in dtypes}
    layer0 = sum(math.prod(w.shape) for w in layer_names(spec, 0).values())
    edge_bytes = {d: edge * np.dtype(dense_dtype("embed", "cpu", d)).itemsize for d in dtypes}
    return Sizes(spec.num_layers, checkpoint, 2 * edge, artifact, edge_bytes,
                 2 * (layer0 + spec.num_experts * spec.expert_params))


def free_disk(path: Path) -> int:
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def du(path: Path) -> int:
    """Bytes allocated on disk under `path` (what `du` counts)."""
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file()) + path.stat().st_blocks * 512


# ---- children -------------------------------------------------------------------------------------

def tail(text: str, chars: int = 3000) -> str:
    text = text.replace("\r", "\n")
    return text[-chars:] if len(text) > chars else text


def run_child(cmd: list[str], what: str) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        how = (f"killed by signal {-done.returncode}" + (" (out of memory?)" if done.returncode == -9 else "")
               if done.returncode < 0 else f"exit status {done.returncode}")
        raise ChildFailed(f"{what} failed ({how}):\n  {' '.join(cmd)}\n--- its stderr (tail) ---\n"
                          f"{tail(done.stderr) or '(empty)'}")
    return done


def worker(args: list[str]) -> dict:
    """Run this script as a worker in a child; the JSON object it printed last."""
    done = run_child([sys.executable, str(Path(__file__).resolve()), "--worker", *args], f"worker {args[0]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def worker_checkpoint(layers: int, vocab: int) -> dict:
    from bench.realwidth import real_width_checkpoint

    start = time.perf_counter()
    return {"path": str(real_width_checkpoint(layers, vocab)), "seconds": time.perf_counter() - start}


def worker_convert(model_dir: str, out: str, dtype: str) -> dict:
    """`python -m convert --model-dir MODEL_DIR --out OUT --dtype DTYPE --force --quiet`, run by the CLI's
    own `main` in this process (so its defaults and checks are the CLI's), returning the stats of the
    `convert.pipeline.convert` call it makes."""
    import convert.pipeline as pipeline
    from convert import cli

    seen = {}
    real = pipeline.convert

    def spy(*args, **kwargs):
        manifest, stats = seen["result"] = real(*args, **kwargs)
        return manifest, stats

    pipeline.convert = spy  # run_convert imports it from the module when called
    status = cli.main(["--model-dir", model_dir, "--out", out, "--dtype", dtype, "--force", "--quiet"])
    if status:
        raise SystemExit(status)  # the CLI has printed its error on stderr
    if "result" not in seen:
        raise SystemExit("python -m convert returned without calling convert.pipeline.convert")
    manifest, stats = seen["result"]
    return {"source_bytes": stats.source_bytes, "weights_s": stats.weights_s, "graph_s": stats.graph_s,
            "total_s": stats.total_s, "expert_bytes": stats.expert_bytes, "dense_bytes": stats.dense_bytes,
            "graphs": stats.graphs, "relative_rms_error": manifest.experts.report.relative_rms_error}


# ---- one depth: checkpoint, convert, runs -----------------------------------------------------------

@dataclass
class RunResult:
    label: str  # "streamed" or "resident"
    budget: str
    record: dict | None = None
    refused: str | None = None  # run.py's refusal line when the plan does not fit

    @property
    def ids(self) -> list[int] | None:
        return self.record["generated_ids"] if self.record else None


@dataclass
class DtypeResult:
    dtype: str
    layers: int
    artifact_bytes: int = 0
    convert: dict = field(default_factory=dict)
    convert_wall_s: float = 0.0
    graph_files: int = 0
    runs: list[RunResult] = field(default_factory=list)


def ensure_checkpoint(layers: int, vocab: int) -> Path:
    path = checkpoint_path(layers, vocab)
    if path.exists():
        print(f"checkpoint  {path}: cached")
        return path
    print(f"checkpoint  {path}: writing it now (random BF16 weights, once) ...", flush=True)
    built = worker(["checkpoint", str(layers), str(vocab)])
    if Path(built["path"]) != path:
        raise ChildFailed(f"the checkpoint was written to {built['path']}, expected {path}: "
                          "bench.realwidth's naming changed; update checkpoint_path()")
    print(f"            written in {built['seconds']:.0f} s, {du(path) / GB:.2f} GB on disk")
    return path


def read_manifest(artifact: Path) -> dict:
    """The artifact's manifest as plain JSON: this process may outlive an edit of artifact.manifest's
    schema, and the child that wrote it (and run.py) are the ones that validate it."""
    return json.loads((artifact / "manifest.json").read_text())


def convert_artifact(model_dir: Path, out: Path, dtype: str, layer_bytes: int) -> DtypeResult:
    layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    result = DtypeResult(dtype, layers)
    print(f"\nconvert     python -m convert --model-dir {model_dir} --out {out} --dtype {dtype}", flush=True)
    os.sync()  # the previous artifact's or checkpoint's writeback must not slow this convert
    start = time.perf_counter()
    stats = worker(["convert", str(model_dir), str(out), dtype])
    result.convert_wall_s = time.perf_counter() - start
    result.convert = stats
    manifest = read_manifest(out)
    experts, dense = manifest["experts"], manifest["dense"]["file"]
    result.artifact_bytes = du(out)
    result.graph_files = len(manifest["graphs"])
    graph_bytes = sum(g["file"]["size"] for g in manifest["graphs"])
    gb = stats["source_bytes"] / GB
    peak = stats["peak_rss"]
    print(f"            read {gb:.2f} GB of checkpoint in {stats['total_s']:.1f} s: {gb / stats['total_s']:.2f} GB/s "
          f"overall, {gb / stats['weights_s']:.2f} GB/s in the weights stage ({stats['weights_s']:.1f} s); "
          f"graphs exported in {stats['graph_s']:.1f} s; child wall time {result.convert_wall_s:.1f} s")
    print(f"            peak RSS {peak / GIB:.2f} GiB (VmHWM of the convert process) = {peak / layer_bytes:.2f} x "
          f"one layer's checkpoint bytes ({layer_bytes / GIB:.2f} GiB)")
    print(f"            artifact {result.artifact_bytes / GIB:.2f} GiB on disk (du): {experts['path']} "
          f"{(out / experts['path']).stat().st_size / GIB:.2f} GiB ({len(experts['blocks'])} blocks of "
          f"{experts['block_bytes'] / 2**20:.2f} MiB every {experts['stride'] / 2**20:.2f} MiB), "
          f"{dense['path']} {(out / dense['path']).stat().st_size / GIB:.2f} GiB, "
          f"{result.graph_files} graph files {graph_bytes / 2**20:.1f} MiB"
          + (f" (target {manifest['target']})" if "target" in manifest else ""))
    if dtype != "fp32":
        print(f"            {dtype} experts: relative RMS weight error {stats['relative_rms_error']:.2e}")
    return result


def expert_budget_gib(artifact: Path, fraction: float) -> tuple[str, int, int]:
    """(placement.expert_budget_gb value, slots it holds, experts): `fraction` of every expert block at
    the store's stride, rounded up to a millionth of a GiB so the pool holds exactly that share."""
    manifest = read_manifest(artifact)
    total = manifest["model"]["num_layers"] * manifest["model"]["num_experts"]
    slots = int(fraction * total)
    budget = math.ceil(slots * manifest["experts"]["stride"] / GIB * 1e6) / 1e6
    return f"{budget:.6f}", slots, total


def run_py(artifact: Path, budget: str, label: str, prompt: list[int], tokens: int, work: Path,
           extra: list[str]) -> RunResult:
    out_json = work / f"{artifact.name}-{label}.json"
    cmd = [sys.executable, "run.py", "+model=local", f"model.path={artifact}", f"placement.expert_budget_gb={budget}",
           f"prompt_ids=[{','.join(map(str, prompt))}]", f"max_new_tokens={tokens}", f"output_json={out_json}",
           f"hydra.run.dir={work / f'hydra-{artifact.name}-{label}'}", *extra]
    print(f"run         {label}: python {' '.join(cmd[1:])}", flush=True)
    os.sync()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    if done.returncode == 1 and errors and "does not fit" in errors[-1]:
        print(f"            refused by run.py (exit 1): {errors[-1]}")
        return RunResult(label, budget, refused=errors[-1])
    if done.returncode != 0:
        how = f"exit status {done.returncode}" if done.returncode > 0 else f"killed by signal {-done.returncode}"
        raise ChildFailed(f"run.py ({label}) failed ({how}):\n  {' '.join(cmd)}\n--- its stderr (tail) ---\n"
                          f"{tail(done.stderr) or '(empty)'}")
    result = RunResult(label, budget, json.loads(out_json.read_text()))
    show_run(result)
    return result


def show_run(result: RunResult) -> None:
    r = result.record
    t, memory, plan = r["timings"], r["memory"], r["plan"]
    planned, peak = memory["planned_bytes"], memory["peak_rss_bytes"]
    ratio = peak / planned
    verdict = "within" if abs(ratio - 1) <= TARGET_RATIO else "outside"
    items = ", ".join(f"{item['name']} {item['bytes'] / GIB:.2f}" for item in plan["items"] if item["bytes"])
    print(f"            plan {planned / GIB:.2f} GiB ({items} GiB; {plan['slots']} of {plan['total_experts']} "
          f"experts in slots), measured peak RSS {peak / GIB:.2f} GiB: {ratio:.2f}x the plan "
          f"({verdict} the 15% target)")
    print(f"            cold start: build {t['build_s']:.1f} s + warm-up {t['warmup_s']:.1f} s = "
          f"{t['build_s'] + t['warmup_s']:.1f} s; first token {t['ttft_s'] * 1e3:.0f} ms")
    print(f"            decode {t['decode_tokens_per_s']:.2f} tokens/s ({t['decode_s']:.1f} s for "
          f"{t['generated_tokens']} tokens), {t['wall_s']:.0f} s in run.py")
    offload = r["counters"]["offload"]
    if offload is not None:
        print(f"            offload: hit rate {100 * offload['hit_rate']:.1f}%, {offload['bytes_per_token'] / MB:.1f} MB "
              f"streamed per token, stalled {100 * offload['stall_fraction']:.1f}% of launch time")
    print(f"            generated ids {r['generated_ids']}")


def one_dtype(model_dir: Path, dtype: str, args, sz: Sizes, prompt: list[int], work: Path,
              resident: bool) -> DtypeResult:
    artifact = ARTIFACTS / f"{model_dir.name}-{dtype}"
    try:
        result = convert_artifact(model_dir, artifact, dtype, sz.layer_checkpoint)
        budget, slots, total = expert_budget_gib(artifact, args.budget_fraction)
        print(f"            budget {budget} GiB = {slots} of {total} expert slots ({100 * args.budget_fraction:g}%)")
        result.runs.append(run_py(artifact, budget, "streamed", prompt, args.tokens, work, args.run_arg))
        if resident:
            result.runs.append(run_py(artifact, "all", "resident", prompt, args.tokens, work, args.run_arg))
    finally:
        if not args.keep:
            shutil.rmtree(artifact, ignore_errors=True)
            print(f"            deleted {artifact}")
    return result


# ---- report -----------------------------------------------------------------------------------------

def table(results: list[DtypeResult]) -> str:
    """One row per run: the streamed run of each dtype (with its convert), then a resident run when it ran."""
    head = ["experts", "run", "layers", "artifact GiB", "convert GB/s", "convert peak RSS GiB", "plan GiB",
            "peak RSS GiB", "ratio", "build + warm-up s", "decode tok/s", "hit %", "MB/token"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for res in results:
        gbps = res.convert["source_bytes"] / GB / res.convert["total_s"]
        for run in res.runs:
            first = run is res.runs[0]
            convert = ([f"{res.artifact_bytes / GIB:.2f}", f"{gbps:.2f}", f"{res.convert['peak_rss'] / GIB:.2f}"]
                       if first else ["", "", ""])
            label = f"streamed, {float(run.budget):.2f} GiB" if run.label == "streamed" else run.label
            if run.record is None:
                cells = ["refused: does not fit"] + [""] * 6
            else:
                t, m = run.record["timings"], run.record["memory"]
                offload = run.record["counters"]["offload"]
                cells = [f"{m['planned_bytes'] / GIB:.2f}", f"{m['peak_rss_bytes'] / GIB:.2f}",
                         f"{m['peak_rss_bytes'] / m['planned_bytes']:.2f}", f"{t['build_s'] + t['warmup_s']:.1f}",
                         f"{t['decode_tokens_per_s']:.2f}",
                         f"{100 * offload['hit_rate']:.1f}" if offload else "-",
                         f"{offload['bytes_per_token'] / MB:.1f}" if offload else "0"]
            lines.append("| " + " | ".join([res.dtype, label, str(res.layers), *convert, *cells]) + " |")
    return "\n".join(lines)


def preflight(args, dtypes: list[str], cold: int) -> None:
    """Print the disk each depth takes and refuse (exit 1) when the bench's writes cannot fit."""
    big = sizes(real_width_spec(args.layers, args.vocab), dtypes)
    small = sizes(real_width_spec(cold, args.vocab), dtypes[:1]) if cold else None
    free = free_disk(CACHE)
    print(f"disk        bench cache {CACHE}: {free / GB:.1f} GB free")
    for sz in filter(None, (big, small)):
        ck = checkpoint_path(sz.layers, args.vocab)
        print(f"            {sz.layers} layers, vocab {args.vocab}: checkpoint {sz.checkpoint / GB:.2f} GB "
              f"({sz.per_layer(sz.checkpoint, sz.checkpoint_edge) / GB:.2f} GB per layer + "
              f"{sz.checkpoint_edge / GB:.2f} GB embedding and head, BF16; "
              f"{'cached' if ck.exists() else 'to write'})")
        for dtype, n in sz.artifact.items():
            edge = sz.artifact_edge[dtype]
            print(f"              {dtype} artifact {n / GB:.2f} GB ({sz.per_layer(n, edge) / GB:.2f} GB "
                  f"per layer + {edge / GB:.2f} GB embedding and head)")
    new = lambda sz: 0 if checkpoint_path(sz.layers, args.vocab).exists() else sz.checkpoint  # noqa: E731
    # Writes in order: the deep checkpoint, its artifacts one at a time (kept with --keep), then the
    # shallow checkpoint and its one artifact. Checkpoints stay; the peak is the worst step.
    steps, kept = [], 0
    for dtype in dtypes:
        steps.append((f"{args.layers}-layer checkpoint + {dtype} artifact", new(big) + kept + big.artifact[dtype]))
        kept += big.artifact[dtype] if args.keep else 0
    if small is not None:
        steps.append((f"both checkpoints + the {cold}-layer {dtypes[0]} artifact",
                      new(big) + kept + new(small) + small.artifact[dtypes[0]]))
    worst, need = max(steps, key=lambda step: step[1])
    print(f"            needs at most {need / GB:.1f} GB more ({worst}) + {DISK_MARGIN / GB:.1f} GB margin")
    if need + DISK_MARGIN > free:
        print(f"error: not enough disk: the bench would write {need / GB:.1f} GB ({worst}) beside "
              f"{DISK_MARGIN / GB:.1f} GB of margin, and {CACHE} has {free / GB:.1f} GB free. Use fewer --layers, "
              f"--dtypes int8 (the smaller artifact), --cold-start-layers 0, no --keep, or FERRY_BENCH_CACHE on a "
              f"larger disk.", file=sys.stderr)
        raise SystemExit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=16, help="decoder layers of the big checkpoint (default 16)")
    parser.add_argument("--vocab", type=int, default=248320, help="vocabulary (default 248320, the real model's)")
    parser.add_argument("--dtypes", default="int8,fp16", help="expert storage, one artifact each (default int8,fp16)")
    parser.add_argument("--budget-fraction", type=float, default=0.25,
                        help="expert slots as a share of every expert's bytes (default 0.25)")
    parser.add_argument("--tokens", type=int, default=32, help="max_new_tokens of each run (default 32)")
    parser.add_argument("--prompt-len", type=int, default=16, help="prompt ids (default 16: the smallest bucket)")
    parser.add_argument("--cold-start-layers", type=int, default=4,
                        help="also convert and run this many layers, first dtype only (0: skip; default 4)")
    parser.add_argument("--no-resident", dest="resident", action="store_false",
                        help="skip the placement.expert_budget_gb=all runs")
    parser.add_argument("--run-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="extra run.py override for every run (repeatable), e.g. placement.prefetch=true")
    parser.add_argument("--keep", action="store_true", help=f"keep the artifacts (in {ARTIFACTS})")
    parser.add_argument("--clean", action="store_true", help="delete the checkpoints at the end (default: cached)")
    parser.add_argument("--json", type=Path, help="also write every figure and run record here")
    parser.add_argument("--worker", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        from bench.convert import peak_rss

        kind, *rest = args.worker
        if kind == "checkpoint":
            result = worker_checkpoint(int(rest[0]), int(rest[1]))
        else:
            result = worker_convert(*rest)
        print(json.dumps({**result, "peak_rss": peak_rss()}))
        return

    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = [d for d in dtypes if d not in ("fp32", "fp16", "int8")]
    if bad or not dtypes:
        parser.error(f"--dtypes: {bad or args.dtypes!r}: choose from fp32, fp16, int8")
    if not 0 < args.budget_fraction < 1:
        parser.error("--budget-fraction must be between 0 and 1 (1 is the resident run)")
    if not 1 <= args.prompt_len <= 1000:
        parser.error("--prompt-len must be 1..1000 (the artifacts' max_context is 1024)")
    cold = args.cold_start_layers if args.cold_start_layers not in (0, args.layers) else 0
    preflight(args, dtypes, cold)
    prompt = [(17 + 7919 * i) % args.vocab for i in range(args.prompt_len)]
    work = Path(tempfile.mkdtemp(prefix="ferry-scale-"))
    results: list[DtypeResult] = []
    checkpoints = []
    try:
        big = ensure_checkpoint(args.layers, args.vocab)
        checkpoints.append(big)
        big_sizes = sizes(real_width_spec(args.layers, args.vocab), dtypes)
        for dtype in dtypes:
            results.append(one_dtype(big, dtype, args, big_sizes, prompt, work, args.resident))
        if cold:
            print()
            small = ensure_checkpoint(cold, args.vocab)
            checkpoints.append(small)
            results.append(one_dtype(small, dtypes[0], args, sizes(real_width_spec(cold, args.vocab), dtypes[:1]),
                                     prompt, work, resident=False))
    except ChildFailed as err:
        print(f"\nerror: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if args.clean:
            for path in checkpoints:
                shutil.rmtree(path, ignore_errors=True)
                print(f"deleted     {path}")

    print("\nsummary")
    mismatched = []
    for res in results:
        streamed = next((r for r in res.runs if r.label == "streamed"), None)
        resident = next((r for r in res.runs if r.label == "resident"), None)
        if streamed and resident and streamed.ids is not None and resident.ids is not None:
            same = streamed.ids == resident.ids
            print(f"  {res.dtype}, {res.layers} layers: streamed ids {'equal' if same else 'DIFFER FROM'} the "
                  f"resident run's ({sum(a == b for a, b in zip(streamed.ids, resident.ids))}/{len(resident.ids)})")
            if not same:
                mismatched.append(f"{res.dtype} {res.layers} layers")
    first = [r for r in results if r.dtype == dtypes[0] and r.runs and r.runs[0].record]
    if len(first) == 2:
        (deep, shallow) = sorted(first, key=lambda r: -r.layers)
        cs = lambda r: r.runs[0].record["timings"]  # noqa: E731
        print(f"  cold start ({dtypes[0]}, streamed): {deep.layers} layers build {cs(deep)['build_s']:.1f} s + "
              f"warm-up {cs(deep)['warmup_s']:.1f} s ({deep.graph_files} graph files) vs {shallow.layers} layers "
              f"{cs(shallow)['build_s']:.1f} s + {cs(shallow)['warmup_s']:.1f} s ({shallow.graph_files} graph files)")
    print()
    print(table(results))
    print("\nartifact GiB: allocated on disk; convert GB/s: checkpoint 10^9 bytes read per second, whole convert; "
          "ratio: peak RSS / plan (target 0.85-1.15); MB/token: 10^6 bytes streamed per decode token.")
    if args.json:
        args.json.write_text(json.dumps([{"dtype": r.dtype, "layers": r.layers, "artifact_bytes": r.artifact_bytes,
                                          "convert": r.convert, "convert_wall_s": r.convert_wall_s,
                                          "graph_files": r.graph_files,
                                          "runs": [{"label": x.label, "budget": x.budget, "refused": x.refused,
                                                    "record": x.record} for x in r.runs]} for r in results], indent=1))
        print(f"record      {args.json}")
    if mismatched:
        print(f"error: greedy ids of the streamed and resident runs differ: {', '.join(mismatched)}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
