"""What `python run.py` does once Hydra has composed the config: validate it, plan both memories, find or
build the artifact, run the engine over it, report. run.py itself is only the Hydra entry."""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from app import settings
from app.demo import DEMO_DIR
from app.plan import DeviceProfile, MemoryPlan, Placement, plan_memory, size
from app.prompting import PromptSource, TextStream, apply_chat_template, prompt_source, shown
from app.settings import ConfigError
from artifact.manifest import MANIFEST_NAME
from model.spec import CheckpointError, ModelSpec
from offload.tiers import TierSet

CONF = Path(__file__).resolve().parent.parent / "conf"


class CannotRun(RuntimeError):
    """The config is fine but the run cannot happen here (missing weights, not enough memory)."""


def silent(*args, **kwargs) -> None:
    """`print` for multirun jobs, whose parallel output would interleave."""


# ---- the one place a run meets the engine builder -------------------------------------------------

def build_engine(artifact: Path, spec: ModelSpec, plan: MemoryPlan):
    """The run's engine over its artifact, with the experts where the memory plan's residence puts them
    (`offload.residence`: every expert resident, or a slot pool streamed from the store), and its name."""
    from runtime import build  # MindSpore loads here: plans and config errors stay fast

    try:
        engine = build.engine_from_artifact(artifact, plan.residence, expect=spec, memory=plan.device.memory)
    except CheckpointError:  # a damaged or foreign artifact: its own message names the file
        raise
    except ValueError as err:  # the pool the plan sized cannot hold a launch of the artifact's tiers
        raise CannotRun(f"expert slots: {err}") from None
    return engine, "streamed" if plan.residence.streams else "resident"


def counters(engine, streamed: bool) -> dict:
    """Everything the engine counted, as JSON: launches per tier, and the offload controller's
    hits, misses, bytes streamed and stall per layer when it ran."""
    c = engine.dispatcher.counters
    tiers = [{"capacity": t.capacity, "group": t.group, "launches": c.launches[i], "tokens": c.tokens[i],
              "padding": c.padding[i]} for i, t in enumerate(engine.dispatcher.tiers)]
    offload = engine.dispatcher.stats.to_dict() if streamed else None
    routed = sum(c.tokens) + c.host_tokens  # every (token, expert) row, on the device or the host
    return {"dispatch": {"tiers": tiers, "expert_tokens": routed}, "offload": offload,
            "crossings": engine.dispatcher.crossings.to_dict()}


def reset_counters(engine) -> None:
    """After the warm-up: count the measured run alone (slots it loaded stay loaded)."""
    engine.dispatcher.stats.reset()
    engine.dispatcher.crossings.reset()


def reset_peak_rss() -> None:
    """Start the peak-RSS count afresh (Linux: writing 5 to clear_refs resets VmHWM), so that a convert
    done by this process before the run does not count as the run's peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_bytes() -> int:
    """VmHWM: the largest resident set since the last reset."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


# ---- model ------------------------------------------------------------------------------------------

def chosen_model(cfg: DictConfig) -> DictConfig:
    """`+model=NAME` when given, else the demo's own config file."""
    model = cfg.model if "model" in cfg else OmegaConf.load(CONF / "model" / "demo.yaml")
    if model.get("kind") not in ("demo", "hf"):
        raise ConfigError(f"model.kind must be demo or hf, got {model.get('kind')!r}")
    if model.kind == "hf" and OmegaConf.is_missing(model, "path"):
        raise ConfigError(f"model.path is required: python run.py +model={model.name} model.path=DIR")
    return model


def hf_path(model: DictConfig) -> Path:
    """The checkpoint directory: the one shipped in the repository for the demo, model.path otherwise."""
    if model.kind == "demo":
        return DEMO_DIR
    return Path(str(model.path)).expanduser()


def has_weights(path: Path) -> bool:
    return (path / "config.json").is_file() and any(
        (path / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json"))


def missing_weights(model: DictConfig, path: Path) -> CannotRun:
    if model.kind == "demo":
        return CannotRun(f"the demo checkpoint is not at {path}: it ships with the repository (config.json, "
                         f"model.safetensors, tokenizer.json); restore it with git checkout -- models/ferry-demo")
    repo = model.get("hf_repo")
    if repo is None:
        return CannotRun(f"no HF checkpoint at model.path={path}: it needs config.json and model.safetensors "
                         f"(or shards and model.safetensors.index.json), or an artifact's {MANIFEST_NAME}")
    return CannotRun("\n".join([
        f"the weights of {model.name} are not at {path} (model.path).",
        f"  1. Download the Hugging Face repository {repo} (about 67 GB, BF16) into that directory, e.g.",
        f"       hf download {repo} --local-dir {path}",
        f"     (huggingface_hub's CLI, on a machine with network), or pass model.path=DIR for a copy elsewhere.",
        f"  2. Run it:  python run.py +model={model.name} model.path={path}",
        f"     (on the CPU, with placement.expert_budget_gb=N when every expert does not fit: see mode=plan)",
        f"     (run.py converts it on first use into artifact_cache; to convert it elsewhere first:",
        f"       python -m convert --model-dir {path} --out {path}-ferry --dtype fp16",
        f"       python run.py +model={model.name} model.path={path}-ferry)",
    ]))


def user_artifact(model: DictConfig) -> Path | None:
    """A `python -m convert` output given as model.artifact, or as model.path (+model=local)."""
    if model.get("artifact"):
        return Path(str(model.artifact)).expanduser()
    if model.kind == "hf" and (hf_path(model) / MANIFEST_NAME).is_file():
        return hf_path(model)
    return None


def tokenizer_dir(model_dir: Path | None, artifact: Path | None) -> Path | None:
    """Where the tokenizer files are: the HF checkpoint, or the artifact's checksummed copy of them."""
    if model_dir is not None:
        return model_dir
    from artifact.reader import Artifact

    return Artifact.open(artifact, verify="none").tokenizer_dir()


def artifact_manifest(path: Path):
    from artifact.manifest import Manifest

    manifest_path = path / MANIFEST_NAME
    if not manifest_path.is_file():
        raise CannotRun(f"model.artifact={path}: no {MANIFEST_NAME}, so not an artifact; "
                        f"make one with python -m convert --model-dir HF_DIR --out {path}")
    return Manifest.from_json(manifest_path.read_text(), str(manifest_path))


def model_source(model: DictConfig, mode: str) -> tuple[Path | None, Path | None, ModelSpec]:
    """(HF checkpoint directory, artifact directory, spec); either directory may be None (a plan
    needs neither when the model config gives the architecture)."""
    artifact = user_artifact(model)
    path = hf_path(model)
    hf_dir = path if has_weights(path) else None
    if artifact is not None:
        spec = artifact_manifest(artifact).model
        if model.get("config") is not None:
            settings.same_model(settings.model_spec(model, None), spec, f"{artifact}/{MANIFEST_NAME}", model.name)
        return hf_dir, artifact, spec
    if mode == "run" and hf_dir is None:
        raise missing_weights(model, path)
    if model.get("config") is None and not (path / "config.json").is_file():
        raise missing_weights(model, path)
    return hf_dir, None, settings.model_spec(model, path)


# ---- prompt -----------------------------------------------------------------------------------------

def prompt_ids(source: PromptSource, tokenizer, model_dir: Path, cfg: DictConfig, spec: ModelSpec) -> list[int]:
    if source.ids is not None:
        if cfg.chat:
            raise ConfigError("chat=true needs a text prompt (prompt=... or prompt_file=...), not prompt_ids")
        ids = list(source.ids)
    else:
        if tokenizer is None:
            raise ConfigError(f"{model_dir} has no tokenizer.json: give the prompt as prompt_ids=[...]")
        text = source.text
        if cfg.chat:
            text = apply_chat_template(model_dir, text, settings.plain(cfg.chat_template_kwargs) or {})
        ids = tokenizer.encode(text, add_special_tokens=not cfg.chat).ids
        if not ids:
            raise ConfigError(f"{source.origin} is empty: nothing to generate from")
    bad = [i for i in ids if i >= spec.vocab_size]
    if bad:
        raise ConfigError(f"prompt_ids {bad[:5]} are outside the vocabulary (size {spec.vocab_size})")
    return ids


# ---- report -----------------------------------------------------------------------------------------

def counters_table(record: dict) -> str:
    lines = ["counters  expert-group launches per capacity tier",
             "  tier [G x C]    launches    tokens   padding   fill"]
    for tier in record["dispatch"]["tiers"]:
        slots = tier["tokens"] + tier["padding"]
        fill = f"{100 * tier['tokens'] / slots:.0f}%" if slots else "-"
        shape = f"[{tier['group']} x {tier['capacity']}]"
        lines.append(f"  {shape:<14}{tier['launches']:>10}{tier['tokens']:>10}{tier['padding']:>10}{fill:>7}")
    lines.append(f"  expert-token rows routed: {record['dispatch']['expert_tokens']}")
    return "\n".join(lines)


def write_json(path: Path, record: dict) -> None:
    """Atomically: a reader (a sweep summary, a test) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)


def write_record(record: dict, cfg: DictConfig) -> tuple[list[Path], list[str], bool]:
    """Add the Hydra choices and overrides to `record` and write it to the job's metrics.json and to
    output_json; returns (the paths written, the overrides, whether this is a multirun job)."""
    output_dir, choices, overrides, multirun = hydra_context()
    record.update(choices=choices, overrides=overrides)
    written = ([output_dir / "metrics.json"] if output_dir is not None else []) + (
        [Path(str(cfg.output_json)).expanduser()] if cfg.output_json else [])
    for path in written:
        write_json(path, record)
    return written, overrides, multirun


def hydra_context() -> tuple[Path | None, dict, list[str], bool]:
    """Output directory, group choices, command-line overrides, and whether this is a multirun job."""
    try:
        hc = HydraConfig.get()
    except ValueError:  # not under Hydra (called from Python)
        return None, {}, [], False
    return (Path(hc.runtime.output_dir), dict(hc.runtime.choices), list(hc.overrides.task),
            hc.mode == RunMode.MULTIRUN)


# ---- the run ----------------------------------------------------------------------------------------

@dataclass
class Run:
    """Everything a run needs, validated before anything heavy is loaded."""

    model: DictConfig
    spec: ModelSpec
    model_dir: Path | None  # the HF checkpoint
    artifact: Path | None  # a python -m convert output: exported graphs, dense file, expert store
    device: DeviceProfile
    placement: Placement
    tiers: TierSet
    buckets: tuple[int, ...]
    max_context: int
    expert_dtype: str  # the artifact's expert storage (the device's default for one still to convert)


def validated(cfg: DictConfig) -> Run:
    settings.no_unknown_settings(cfg, settings.known_settings(CONF, GROUPS))
    if cfg.mode not in ("run", "plan", "predict"):
        raise ConfigError(f"mode must be run, plan or predict, got {settings.plain(cfg.mode)!r}")
    settings.switches(cfg, ("chat", "warmup", "stream"))
    settings.optional_path(cfg.output_json, "output_json")
    if not isinstance(settings.plain(cfg.chat_template_kwargs), dict):
        raise ConfigError(f"chat_template_kwargs must be a mapping, got {settings.plain(cfg.chat_template_kwargs)!r}")
    model = chosen_model(cfg)
    device = settings.device_profile(cfg.device)
    placement = settings.placement(cfg.placement)
    buckets = settings.prefill_buckets(cfg.prefill_buckets)
    context = cfg.max_context if cfg.max_context is not None else model.max_context
    max_context = settings.positive_int(context, "max_context")
    model_dir, artifact, spec = model_source(model, cfg.mode)
    if not cfg.get("tiers"):
        raise ConfigError("tiers is empty: choose tiers=default|fine|coarse or write conf/tiers/NAME.yaml")
    # an artifact's own tiers and buckets replace these below, so only a convert still to come bounds them
    tiers = settings.tier_set(cfg.tiers, spec, largest_launch=buckets[-1] if artifact is None else None)
    expert_dtype = device.expert_dtype
    if artifact is not None:  # its graphs were exported for its own tiers, buckets, context and storage
        manifest = artifact_manifest(artifact)
        tiers = settings.tier_set([{"capacity": t.capacity, "group": t.group} for t in manifest.tiers], spec)
        buckets, max_context = tuple(manifest.buckets), manifest.max_context
        expert_dtype = manifest.experts.dtype
    return Run(model, spec, model_dir, artifact, device, placement, tiers, buckets, max_context, expert_dtype)


def memory_plan(r: Run) -> MemoryPlan:
    return plan_memory(r.spec, r.device, r.placement, r.max_context, r.buckets[-1], r.tiers, r.model.name,
                       r.expert_dtype)


def plan_mode(r: Run) -> int:
    plan = memory_plan(r)
    print(plan.format())
    return 0 if plan.fits else 1


def predict_mode(cfg: DictConfig, r: Run) -> float:
    """The timeline simulator's decode tokens/s for this config (app.predict), printed and recorded."""
    from app import predict

    try:
        profile = predict.timeline_profile(cfg.get("timeline"))
        wanted = predict.predict_settings(cfg.predict)
    except predict.PredictError as err:
        raise ConfigError(str(err)) from None
    if profile.name != r.device.name:
        raise ConfigError(f"timeline={profile.name} prices another device than device={r.device.name}: choose "
                          f"device={profile.name}, or write conf/timeline/{r.device.name}.yaml")
    plan = memory_plan(r)
    if not plan.fits:
        print(plan.format())
        raise CannotRun(f"this config does not fit {r.device.name}: {plan.problems[0]}")
    target = r.device.target
    cache = Path(str(cfg.artifact_cache)).expanduser()
    try:
        result = predict.predict(r.spec, r.tiers, r.expert_dtype, target, plan, profile, r.max_context, wanted, cache)
    except predict.PredictError as err:
        raise ConfigError(str(err)) from None
    p, flow = result.prediction, result.traffic
    tiers = ", ".join(f"{t.group}x{t.capacity}" for t in r.tiers)
    residence = plan.residence
    prefetch = f"prefetch {result.prefetch_depth} guesses per layer" if result.prefetch_depth else "no prefetch"
    pool = (f"{residence.slots} of {residence.total_experts} expert slots "
            f"({100 * residence.slots / residence.total_experts:.0f}%), policy {residence.policy}, {prefetch}"
            if residence.streams else f"all {residence.total_experts} experts resident")
    lines = [f"predict   {r.model.name} on {r.device.name} (timeline={profile.name}), {r.expert_dtype} experts, "
             f"tiers [G x C] {tiers}, context {r.max_context}",
             f"plan      {pool}"]
    if residence.streams:
        lines.append(f"routing   {wanted.trace} trace replayed: hit rate {100 * result.hit_rate:.0f}%, "
                     f"{flow.misses_per_layer:.2f} misses and {flow.prefetches_per_layer:.2f} prefetch copies per "
                     f"layer (scaled to top-{r.spec.num_experts_per_tok})")
    lines.append(f"decode    {p.tokens_per_s:.1f} tokens/s predicted: {p.ms_per_token:.1f} ms per token (host "
                 f"{p.host_ms:.1f}, device {p.device_ms:.1f}, copies {p.copy_ms:.1f}, stalls {p.stall_ms:.1f} ms)")
    record = {"model": {"name": r.model.name, "spec": r.spec.to_dict()}, "device": r.device.name,
              "timeline": asdict(profile), "expert_dtype": r.expert_dtype, "max_context": r.max_context,
              "tiers": [{"capacity": t.capacity, "group": t.group} for t in r.tiers],
              "placement": asdict(r.placement), "predict": {"trace": wanted.trace}, "prediction": result.to_dict(),
              "plan": plan.to_dict()}
    written, overrides, multirun = write_record(record, cfg)
    if multirun:  # one line per job: parallel jobs would interleave anything longer
        print(f"job {' '.join(overrides) or '(no overrides)'}: predicted {p.tokens_per_s:.1f} tokens/s"
              + (f" -> {written[0]}" if written else ""), flush=True)
    else:
        print("\n".join(lines + [f"record    {path}" for path in written]))
    return p.tokens_per_s


def convert_options(r: Run):
    """The options an HF checkpoint is converted with for this run: its tiers, buckets, context, storage."""
    from artifact.manifest import TierRecord
    from convert.pipeline import ConvertOptions

    try:
        return ConvertOptions(r.expert_dtype, tuple(TierRecord(t.capacity, t.group) for t in r.tiers), r.buckets,
                              r.max_context)
    except ValueError as err:
        raise ConfigError(f"convert options from tiers, prefill_buckets and max_context: {err}") from None


def run_mode(cfg: DictConfig, r: Run, quiet: bool) -> tuple[dict, str]:
    """Generate, streaming the text unless quiet (a multirun job); return the run's record and its
    tables: the offload controller's per layer when it ran, and the ledger of crossings."""
    started = time.perf_counter()
    say = silent if quiet else print
    from runtime.backend import BackendMissing, require

    try:
        require(r.device.backend)  # before anything loads: mode=plan and mode=predict need no backend
    except BackendMissing as err:
        raise CannotRun(f"device={r.device.name}: {err}") from None
    sampling = settings.sampling(cfg.sampling)
    max_new = settings.positive_int(cfg.max_new_tokens, "max_new_tokens")
    source = prompt_source(cfg.prompt, cfg.prompt_file, cfg.prompt_ids, r.model.get("default_prompt"))
    if r.placement.policy == "belady":
        raise ConfigError("placement.policy=belady needs the requests of the future: it is the offline yardstick "
                          "of bench/offload.py on recorded traces; choose lru, lfu or decay for a run")
    plan = memory_plan(r)
    if not plan.fits:
        print(plan.format())
        raise CannotRun(f"this run does not fit {r.device.name}: {plan.problems[0]}")
    options = convert_options(r) if r.artifact is None else None

    model_dir, artifact = r.model_dir, r.artifact
    say(f"model     {r.model.name}: {model_dir or artifact}")
    kinds = r.spec.layer_types
    say(f"          {r.spec.num_layers} layers ({kinds.count('linear_attention')} DeltaNet + "
        f"{kinds.count('full_attention')} attention), {r.spec.num_experts} experts top-{r.spec.num_experts_per_tok}, "
        f"hidden {r.spec.hidden_size}, vocab {r.spec.vocab_size}")
    say(f"plan      {size(plan.total)} of {size(r.device.memory_bytes)} on {r.device.name}, "
        f"{plan.residence.describe()} ({r.expert_dtype}, {size(plan.expert_bytes)} each): fits")

    from runtime.tokenizer import load_tokenizer

    tokenizer_files = tokenizer_dir(model_dir, artifact)
    tokenizer = (load_tokenizer(tokenizer_files)
                 if tokenizer_files is not None and (tokenizer_files / "tokenizer.json").is_file() else None)
    ids = prompt_ids(source, tokenizer, tokenizer_files or artifact, cfg, r.spec)
    if len(ids) > r.max_context:
        raise ConfigError(f"the prompt is {len(ids)} tokens, longer than max_context={r.max_context}; "
                          "shorten it or raise max_context (the memory plan grows with it)")
    notes = []  # what the run changed of what was asked: printed, and kept in the record (multirun prints no more)
    if len(ids) + max_new - 1 > r.max_context:
        max_new = r.max_context - len(ids) + 1
        notes.append(f"max_new_tokens lowered to {max_new}: the prompt ({len(ids)} tokens) and the reply "
                     f"must fit max_context={r.max_context}")
        say(f"note      {notes[-1]}")
    text = tokenizer.decode(ids, skip_special_tokens=False) if tokenizer else None
    say(f"prompt    {len(ids)} tokens from {source.origin}" + (f": {shown(text)!r}" if text is not None else ""))

    from runtime.engine import Buckets  # MindSpore loads from here on: every check above answers fast

    try:
        Buckets(r.buckets)  # adds its own check: the DeltaNet chunk
    except ValueError as err:
        raise ConfigError(f"prefill_buckets: {err}") from None
    from runtime.backend import configure
    from runtime.generate import generate

    configure(r.device.backend, cfg.device.get("threads"))
    if artifact is None:
        from convert.cache import NoRoomError, cached_artifact

        try:
            converted = cached_artifact(model_dir, Path(str(cfg.artifact_cache)), options, progress=not quiet,
                                        say=say)
        except NoRoomError as err:
            raise CannotRun(str(err)) from None
        artifact = converted.path
        say("artifact  " + (f"converted now in {converted.seconds:.1f} s: " if converted.built_now else "cached: ")
            + str(artifact))
    else:
        say(f"artifact  {artifact}: its tiers, prefill buckets, max_context ({r.max_context}) and "
            f"{r.expert_dtype} experts apply")
    reset_peak_rss()
    t0 = time.perf_counter()
    engine, route = build_engine(artifact, r.spec, plan)
    streamed = plan.residence.streams
    build_s = time.perf_counter() - t0
    warmup_s = 0.0
    try:
        if cfg.warmup:
            t0 = time.perf_counter()
            generate(engine, ids, min(2, max_new), sampling)
            warmup_s = time.perf_counter() - t0
            reset_counters(engine)
        say(f"engine    {route}, built in {build_s:.1f} s" + (
            f"; graphs compiled or loaded by a warm-up run in {warmup_s:.1f} s" if cfg.warmup
            else " (no warm-up: the first token includes compiling)"))
        say("-" * 72)
        stream = TextStream(tokenizer) if tokenizer is not None and cfg.stream and not quiet else None

        def on_token(token: int) -> None:
            if stream is not None:
                sys.stdout.write(shown(stream.push(token)))
                sys.stdout.flush()

        result = generate(engine, ids, max_new, sampling, on_token=on_token)
    finally:
        engine.close()
    peak = peak_rss_bytes()
    out_text = tokenizer.decode(result.token_ids, skip_special_tokens=False) if tokenizer is not None else None
    if stream is not None:
        say(shown(stream.flush()))
    else:
        say(shown(out_text) if out_text is not None else f"generated ids: {result.token_ids}")
    say("-" * 72)
    timings = {
        "build_s": build_s, "warmup_s": warmup_s, "ttft_s": result.time_to_first_token,
        "prefill_tokens_per_s": len(ids) / result.time_to_first_token if result.time_to_first_token else 0.0,
        "decode_s": result.decode_time, "decode_tokens_per_s": result.decode_tokens_per_s,
        "generated_tokens": len(result.token_ids), "wall_s": time.perf_counter() - started,
    }
    tables = [engine.dispatcher.stats.table()] if streamed else []
    tables = "\n".join(tables + [engine.dispatcher.crossings.table()])
    return {
        "model": {"name": r.model.name, "path": str(model_dir) if model_dir else None,
                  "artifact": str(artifact), "demo": r.model.kind == "demo", "spec": r.spec.to_dict()},
        "engine": route,
        "settings": {
            "device": r.device.name, "placement": asdict(r.placement),
            "tiers": [{"capacity": t.capacity, "group": t.group} for t in r.tiers],
            "prefill_buckets": list(r.buckets), "max_context": r.max_context, "max_new_tokens": max_new,
            "expert_dtype": r.expert_dtype,
            "sampling": asdict(sampling), "chat": bool(cfg.chat), "warmup": bool(cfg.warmup),
        },
        "notes": notes, "prompt_origin": source.origin, "prompt_ids": ids, "generated_ids": result.token_ids, "text": out_text,
        "stopped_on_eos": result.stopped_on_eos, "timings": timings, "counters": counters(engine, streamed),
        "plan": plan.to_dict(), "memory": {"planned_bytes": plan.total, "peak_rss_bytes": peak},
    }, tables


def report(record: dict, tables: str, cfg: DictConfig, quiet: bool) -> None:
    t = record["timings"]
    say = silent if quiet else print
    stop = "EOS" if record["stopped_on_eos"] else f"max_new_tokens={record['settings']['max_new_tokens']}"
    say(f"timings   time to first token {t['ttft_s'] * 1e3:.0f} ms (prefill of {len(record['prompt_ids'])} tokens), "
        f"decode {t['decode_tokens_per_s']:.1f} tokens/s over {t['generated_tokens']} tokens (stopped at {stop}), "
        f"{t['wall_s']:.1f} s in run.py")
    memory = record["memory"]
    say(f"memory    planned {size(memory['planned_bytes'])}, measured peak RSS {size(memory['peak_rss_bytes'])} "
        f"({memory['peak_rss_bytes'] / memory['planned_bytes']:.2f}x the plan; since the engine was built)")
    if record["counters"]["offload"] is None:
        say(counters_table(record["counters"]))
    else:
        offload = record["counters"]["offload"]
        warm = " (counted after the warm-up run: its experts are already in slots)" if cfg.warmup else ""
        say(f"offload   hit rate {100 * offload['hit_rate']:.1f}%, {offload['bytes_per_token'] / 2**20:.2f} MiB "
            f"streamed per token, stalled {100 * offload['stall_fraction']:.1f}% of launch time{warm}")
    say(tables)
    written, overrides, multirun = write_record(record, cfg)
    for path in written:
        say(f"record    {path}")
    if multirun:  # one line per job: parallel jobs would interleave anything longer
        notes = "".join(f"; note: {note}" for note in record["notes"])
        print(f"job {' '.join(overrides) or '(no overrides)'}: decode {t['decode_tokens_per_s']:.1f} tokens/s, "
              f"first token {t['ttft_s'] * 1e3:.0f} ms, {t['generated_tokens']} tokens -> {written[0]}{notes}",
              flush=True)


def run(cfg: DictConfig) -> tuple[int, float | None]:
    """(exit status, the value a sweeper optimizes: predicted tokens/s in mode=predict, else None)."""
    r = validated(cfg)
    if cfg.mode == "plan":
        return plan_mode(r), None
    if cfg.mode == "predict":
        return 0, predict_mode(cfg, r)
    multirun = hydra_context()[3]
    record, tables = run_mode(cfg, r, quiet=multirun)
    report(record, tables, cfg, quiet=multirun)
    sys.stdout.flush()
    return 0, None


def main(cfg: DictConfig) -> float | None:
    """Run the config; a config mistake exits with status 2 and one `error:` line, a run that cannot
    happen here (missing weights, not enough memory) with status 1. Returns what a Hydra sweeper
    optimizes (mode=predict: the predicted tokens/s)."""
    try:
        status, objective = run(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except (CannotRun, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:  # the engine closed on the way out (its prefetch thread stopped)
        print("\ninterrupted", file=sys.stderr)
        raise SystemExit(130) from None
    if status:
        raise SystemExit(status)
    return objective


GROUPS = ("model", "device", "placement", "tiers", "timeline")


def check_group_overrides(args: list[str]) -> None:
    """Hydra reads `group=[...]` as a choice of several files and fails inside itself; say what to do instead."""
    for arg in args:
        key, _, value = arg.partition("=")
        if key.lstrip("+~") in GROUPS and value.lstrip().startswith(("[", "{")):
            group = key.lstrip("+~")
            options = sorted(p.stem for p in (CONF / group).glob("*.yaml"))
            example = "tiers.1.capacity=16" if group == "tiers" else f"{group}.<field>=..."
            print(f"error: {group} is a config group: choose a file ({group}={'|'.join(options)}), add one as "
                  f"conf/{group}/NAME.yaml, or override a field (e.g. {example})", file=sys.stderr)
            raise SystemExit(2)
