"""`python -m convert`: build an artifact, and look inside one.

    python -m convert --model-dir SRC --out DST [--dtype fp32|fp16|int8] [--tiers T] [--buckets 16,64]
                      [--max-context N] [--force] [--quiet]
    python -m convert inspect DST [--blocks]
    python -m convert verify DST [--source SRC]
    python -m convert query DST (--tensor NAME | --expert LAYER EXPERT)

`--tiers` is a name from conf/tiers (`default`, `fine`, `coarse`: the Hydra tiers group), a YAML
file in that format, or inline capacities with optional groups, `1,8x4,64x2` (capacity x group;
a bare capacity takes the model's experts per token as its group).
Exit status: 0 on success, 1 when an artifact or checkpoint is bad (the message names the culprit),
2 for a usage error.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from artifact.manifest import TARGETS, TierRecord
from model.spec import CheckpointError, ModelSpec

CONF_TIERS = Path(__file__).resolve().parents[1] / "conf" / "tiers"
COMMANDS = ("inspect", "verify", "query")
_SHORT = {"float32": "f32", "float16": "f16", "int8": "i8", "int32": "i32"}


def parse_tiers(text: str, spec: ModelSpec) -> tuple[TierRecord, ...]:
    """Tiers from a conf/tiers name, a YAML file, or `C[xG],...`; a missing group is top-k."""
    from offload.tiers import from_config

    path = Path(text)
    if not path.suffix and (CONF_TIERS / f"{text}.yaml").is_file():
        path = CONF_TIERS / f"{text}.yaml"
    if path.suffix in (".yaml", ".yml"):
        from omegaconf import OmegaConf

        if not path.is_file():
            raise ValueError(f"--tiers: no file {path}")
        loaded = OmegaConf.to_container(OmegaConf.load(path))
        entries = loaded.get("tiers") if isinstance(loaded, dict) else loaded
        if not isinstance(entries, list):
            raise ValueError(f"--tiers: {path} has no 'tiers' list")
    else:
        entries = []
        for item in text.split(","):
            capacity, _, group = item.strip().partition("x")
            if not capacity.isdigit() or (group and not group.isdigit()):
                raise ValueError(f"--tiers: '{item}' is not CAPACITY or CAPACITYxGROUP (e.g. 1,8x4,64x2), "
                                 f"nor a name in {CONF_TIERS}")
            entries.append({"capacity": int(capacity), **({"group": int(group)} if group else {})})
    tiers = from_config(entries, default_group=spec.num_experts_per_tok)
    return tuple(TierRecord(t.capacity, t.group) for t in tiers)


def parse_buckets(text: str) -> tuple[int, ...]:
    from runtime.engine import Buckets

    try:
        sizes = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise ValueError(f"--buckets: '{text}' is not a comma-separated list of token counts") from None
    if 1 in sizes:
        raise ValueError("--buckets: 1 is the decode launch, always exported; list prefill sizes only")
    return Buckets(sizes).prefill


def _convert_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m convert",
        description="Convert an HF Qwen3.5/3.6-MoE checkpoint into a Ferry artifact. "
                    f"Other commands: {', '.join(COMMANDS)} (python -m convert COMMAND -h).")
    parser.add_argument("--model-dir", required=True, type=Path, help="HF checkpoint directory")
    parser.add_argument("--out", required=True, type=Path, help="artifact directory to create")
    parser.add_argument("--dtype", choices=("fp32", "fp16", "int8"), default="fp32",
                        help="expert storage: fp32 exact (dense weights FP32 too); fp16 (BF16 range clamped, "
                             "reported); int8 weight-only, per-output-channel scales; beside fp16 or int8 experts the "
                             "dense matrices are FP16 (default fp32)")
    parser.add_argument("--device", choices=TARGETS, default="cpu",
                        help="what the graphs are for: cpu (FP32, Ferry's CPU kernel) or ascend_310p3 (FP16 "
                             "matmuls over FP16 weights and KV cache, no CPU op; experts fp16 or int8) (default cpu)")
    parser.add_argument("--tiers", default="default",
                        help="conf/tiers name, YAML file, or CAPACITY[xGROUP],... (default: conf/tiers/default)")
    parser.add_argument("--buckets", default="16,64", help="prefill launch sizes (default 16,64)")
    parser.add_argument("--max-context", type=int, default=1024, help="KV-cache length of the graphs (default 1024)")
    parser.add_argument("--force", action="store_true", help="replace an existing artifact at --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def _command_parser(command: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m convert {command}")
    parser.add_argument("artifact", type=Path, help="artifact directory")
    if command == "inspect":
        parser.add_argument("--blocks", action="store_true", help="also list every expert block")
    if command == "verify":
        parser.add_argument("--source", type=Path,
                            help="the HF checkpoint it was converted from: check its config.json and tokenizer files too")
    if command == "query":
        which = parser.add_mutually_exclusive_group(required=True)
        which.add_argument("--tensor", help="dense tensor name, e.g. embed or layers.0.q_proj")
        which.add_argument("--expert", nargs=2, type=int, metavar=("LAYER", "EXPERT"), help="one expert block")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in COMMANDS:
            args = _command_parser(argv[0]).parse_args(argv[1:])
            return {"inspect": inspect, "verify": verify, "query": query}[argv[0]](args)
        return run_convert(_convert_parser().parse_args(argv))
    except CheckpointError as err:  # includes every artifact error
        print(f"error: {err}", file=sys.stderr)
        return 1
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # the disk filled, a directory is read-only, ...: the convert left nothing behind
        print(f"error: {err.strerror or err} ({err.filename or 'writing the artifact'}); nothing was written",
              file=sys.stderr)
        return 1


def run_convert(args) -> int:
    from convert.pipeline import ConvertOptions, convert
    from model.spec import load_spec

    spec = load_spec(args.model_dir)
    options = ConvertOptions(dtype=args.dtype, tiers=parse_tiers(args.tiers, spec), buckets=parse_buckets(args.buckets),
                             max_context=args.max_context, target=args.device)
    manifest, stats = convert(args.model_dir, args.out, options, force=args.force, progress=not args.quiet)
    report = manifest.experts.report
    print(f"wrote {args.out} for {options.target}: {stats.graphs} graphs, dense {_size(stats.dense_bytes)}, "
          f"experts {_size(stats.expert_bytes)} ({options.dtype})")
    print(f"read {_size(stats.source_bytes)} of weights in {stats.weights_s:.1f} s "
          f"({stats.weights_gb_per_s:.2f} GB/s); graphs exported in {stats.graph_s:.1f} s; total {stats.total_s:.1f} s")
    if options.dtype != "fp32":
        print(_report_line(report))
    return 0


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024


def _report_line(report) -> str:
    return (f"{report.dtype} experts: relative RMS error {report.relative_rms_error:.2e} "
            f"(worst block: layer {report.worst_layer} expert {report.worst_expert}, "
            f"{report.worst_relative_rms_error:.2e}); {report.overflow} overflowed, "
            f"{report.nonzero_to_zero} nonzero became zero, {report.subnormal} subnormal, "
            f"{report.zero_channels} all-zero channels, of {report.values} values; {report.handling}")


def _open(path: Path, verify: str):
    from artifact.reader import Artifact

    return Artifact.open(path, verify=verify)


def inspect(args) -> int:
    artifact = _open(args.artifact, "none")
    m = artifact.manifest
    print(f"artifact {args.artifact}  (format {m.format} v{m.version}, {m.created_by}, from '{m.source.name}', "
          f"config sha256 {m.source.config_sha256[:12]})")
    calls = f"calls Ferry's CPU kernels ({m.kernels})" if m.kernels else "no custom op: MindSpore operators only"
    print(f"target {m.target}: graphs {calls}")
    print("\nmodel")
    for key, value in m.model.to_dict().items():
        if key == "layer_types":
            value = " ".join("A" if kind == "full_attention" else "D" for kind in value) + "  (A attention, D DeltaNet)"
        print(f"  {key:34} {value}")
    print(f"\nmax_context {m.max_context}; launch sizes {list(m.launch_sizes())} (1 = decode)")
    print("tiers (capacity x group): " + ", ".join(f"{t.capacity}x{t.group}" for t in m.tiers))
    print(f"\ngraphs ({len(m.graphs)})")
    for g in m.graphs:
        sigs = lambda sigs: " ".join(f"{_SHORT[s.dtype]}{list(s.shape)}" for s in sigs)
        ins = sigs(g.inputs) if len(g.inputs) <= 8 else sigs(g.inputs[:6]) + f" ... ({len(g.inputs)} inputs)"
        where, size = (g.file.path, _size(g.file.size)) if g.file else (f"({g.name}: built at load)", "")
        print(f"  {where:36} {size:>10}  in: {ins}")
        print(f"  {'':36} {'':>10}  out: {sigs(g.outputs)}")
    d = m.dense
    by_dtype = {dtype: sum(t.dtype == dtype for t in d.tensors) for dtype in sorted({t.dtype for t in d.tensors})}
    kinds = ", ".join(f"{n} {dtype}" for dtype, n in by_dtype.items())
    print(f"\ndense weights {d.file.path}: {len(d.tensors)} tensors ({kinds}), {_size(d.file.size)}"
          f"{', lm_head tied to embed' if d.tied_head else ''}")
    s = m.experts
    print(f"\nexpert store {s.path}: {len(s.blocks)} blocks ({m.model.num_layers} layers x {m.model.num_experts} "
          f"experts), {s.dtype}, {_size(s.block_bytes)} per block every {_size(s.stride)} "
          f"({s.alignment}-byte aligned), {_size(s.size)} total")
    for p in s.parts:
        print(f"  part {p.name:14} {p.dtype:8} {list(p.shape)} at +{p.offset}")
    print("  " + _report_line(s.report))
    if args.blocks:
        for b in s.blocks:
            print(f"  layer {b.layer:3} expert {b.expert:4} offset {b.offset:14} sha256 {b.sha256}")
    return 0


def verify(args) -> int:
    from artifact.reader import ChecksumError, SourceMismatchError

    artifact = _open(args.artifact, "none")
    m = artifact.manifest
    failures = []
    for record in m.checksummed_files():
        try:
            artifact.verify_file(record)
        except ChecksumError as err:
            failures.append(str(err))
    if args.source is not None:
        try:
            artifact.check_source(args.source)
        except SourceMismatchError as err:
            failures.append(str(err))
    from tqdm import tqdm

    with tqdm(total=len(m.experts.blocks), desc="expert blocks", unit="block", file=sys.stderr) as bar:
        for block in m.experts.blocks:
            try:
                artifact.experts.verify(block.layer, block.expert)
            except ChecksumError as err:
                failures.append(str(err))
            bar.update(1)
    files = len(m.checksummed_files())
    if failures:
        print("\n".join(failures))
        print(f"FAILED: {len(failures)} of {files} files and {len(m.experts.blocks)} expert blocks")
        return 1
    source = f"; {args.source}'s config.json and tokenizer files are the converted ones" if args.source else ""
    print(f"OK: {files} files and {len(m.experts.blocks)} expert blocks match their SHA-256{source}")
    return 0


def _stats(name: str, array: np.ndarray) -> str:
    values = array.astype(np.float64)
    return (f"{name:14} {str(array.dtype):8} {list(array.shape)}  min {values.min():.6g}  max {values.max():.6g}  "
            f"mean {values.mean():.6g}  std {values.std():.6g}  max|x| {np.abs(values).max():.6g}  "
            f"zeros {int(np.count_nonzero(values == 0))}")


def query(args) -> int:
    from artifact.store import decode_block

    artifact = _open(args.artifact, "none")
    if args.tensor is not None:
        try:
            array = artifact.dense_tensor(args.tensor)
        except KeyError as err:
            names = [t.name for t in artifact.manifest.dense.tensors]
            print(f"error: {err.args[0]}; names look like: {', '.join(names[:4])}, ...", file=sys.stderr)
            return 1
        print(_stats(args.tensor, array))
        return 0
    layer, expert = args.expert
    artifact.experts.verify(layer, expert)
    block = artifact.experts.blocks[(layer, expert)]
    print(f"layer {layer} expert {expert}: offset {block.offset}, {artifact.manifest.experts.block_bytes} bytes, "
          f"sha256 {block.sha256[:16]}... OK")
    arrays = artifact.experts.arrays(layer, expert)
    for name, array in arrays.items():
        print("  " + _stats(name, array))
    if artifact.manifest.experts.dtype != "fp32":
        gate_up, down = decode_block(arrays)
        print("  as computed (FP32):")
        print("  " + _stats("gate_up", gate_up))
        print("  " + _stats("down", down))
    return 0


if __name__ == "__main__":
    sys.exit(main())
