"""mode=predict: a config's decode tokens/s on its device, from the timeline simulator; no model runs.

    python run.py mode=predict +model=qwen36_35b device=ascend_310p3 max_context=4096
    python run.py mode=predict +model=qwen36_35b device=ascend_310p3 --multirun tiers=default,fine,coarse
    python run.py +sweep=optuna_310p3 --multirun       # Optuna searches tiers, policy, prefetch, dtype

What is priced (`offload.timeline`): the model's decode launches for the tiers and the expert
dtype, at `max_context` cached tokens (an attention launch reads its whole cache); the slots the
memory plan gives this placement; the misses and prefetch copies per layer of a routing trace
replayed through a pool of the same share of its experts with `placement.policy`, prefetching
`predict.prefetch_depth` guesses per layer when `placement.prefetch` is on; the device profile
`timeline=NAME` (conf/timeline/NAME.yaml, each figure overridable). The trace is the trained demo's
routing over the calibration prompts with the prefetcher's guesses, recorded once into
artifact_cache (random weights route with no locality, a trained model's trace is the honest
stand-in), or `predict.trace=FILE.npz` recorded with guesses (`app.routing.record_routing`).

The predicted tokens/s is what `run.py` returns in this mode: a Hydra sweeper maximizes it.
"""
from __future__ import annotations

import fcntl
from dataclasses import asdict, dataclass
from pathlib import Path

from app.plan import MemoryPlan
from offload.timeline import Prediction, TimelineProfile, Traffic
from offload.trace import RoutingTrace, TraceError, simulate

DEMO_TRACE = "demo"
DEMO_PROMPTS, DEMO_DECODE, DEMO_DEPTH = 8, 32, 16  # the recorded demo trace: prompts, decode steps each, guesses


class PredictError(ValueError):
    """A predict setting or its trace file is wrong; the message names it."""


@dataclass(frozen=True)
class PredictSettings:
    trace: str  # "demo" or a .npz routing trace with guesses
    prefetch_depth: int | None  # guesses prefetched per layer when placement.prefetch is on; None: top-k


def timeline_profile(cfg) -> TimelineProfile:
    """The `timeline` group's profile, every figure present and numeric."""
    from omegaconf import DictConfig, OmegaConf

    if not isinstance(cfg, DictConfig):
        raise PredictError("mode=predict needs a device profile: timeline=NAME (conf/timeline/NAME.yaml)")
    values = OmegaConf.to_container(cfg, resolve=True)
    fields = set(TimelineProfile.__dataclass_fields__)
    if set(values) != fields:
        raise PredictError(f"timeline={values.get('name')}: a profile needs exactly {sorted(fields)}; missing "
                           f"{sorted(fields - set(values))}, unknown {sorted(set(values) - fields)}")
    for key in fields - {"name", "gbps", "overlap", "copies_overlap"}:
        if isinstance(values[key], bool) or not isinstance(values[key], (int, float)) or values[key] < 0:
            raise PredictError(f"timeline.{key} must be a non-negative number, got {values[key]!r}")
    kinds = {"attention", "deltanet", "experts", "head"}
    gbps = values["gbps"]
    if not isinstance(gbps, dict) or set(gbps) != kinds or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in gbps.values()):
        raise PredictError(f"timeline.gbps must give a positive GB/s for each of {sorted(kinds)}, got {gbps!r}")
    for key in ("overlap", "copies_overlap"):
        if not isinstance(values[key], bool):
            raise PredictError(f"timeline.{key} must be true or false, got {values[key]!r}")
    if values["h2d_gbps"] <= 0 or values["tflops"] <= 0:
        raise PredictError("timeline.h2d_gbps and timeline.tflops must be positive")
    return TimelineProfile(**values)


def predict_settings(cfg) -> PredictSettings:
    from app.settings import plain

    values = plain(cfg)
    depth = values.get("prefetch_depth")
    if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int) or depth < 1):
        raise PredictError(f"predict.prefetch_depth must be a positive integer or null (top-k), got {depth!r}")
    trace = values.get("trace")
    if not isinstance(trace, str) or not trace:
        raise PredictError(f"predict.trace must be '{DEMO_TRACE}' or the path of a .npz routing trace, got {trace!r}")
    return PredictSettings(trace, depth)


def demo_trace(cache_dir: Path) -> RoutingTrace:
    """The trained demo's routing (prefill, then greedy decode of the calibration prompts) with the
    prefetcher's guesses: recorded on first use, about a minute, then read from `cache_dir`."""
    from app.demo import DEMO_DIR
    from convert.cache import fingerprint

    path = cache_dir / "routing" / f"demo-{fingerprint(DEMO_DIR)[:12]}-p{DEMO_PROMPTS}-d{DEMO_DECODE}-g{DEMO_DEPTH}.npz"
    if path.is_file():
        return RoutingTrace.load(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as lock:  # parallel sweep jobs record it once
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.is_file():
            record_demo_trace(path)
    return RoutingTrace.load(path)


def record_demo_trace(path: Path) -> None:
    from app.demo import DEMO_DIR
    from app.routing import encode_prompts, load_prompts, record_routing
    from model.checkpoint import Checkpoint
    from offload.prefetch import RouterPredictor
    from runtime.build import engine_from_checkpoint

    checkpoint = Checkpoint(DEMO_DIR)
    spec = checkpoint.spec
    engine = engine_from_checkpoint(DEMO_DIR, max_context=512)
    prompts = encode_prompts(load_prompts(), DEMO_DIR, spec.vocab_size, 512 - DEMO_DECODE - 1)[:DEMO_PROMPTS]
    predictor = RouterPredictor([checkpoint.layer_weights(layer)["router"] for layer in range(spec.num_layers)],
                                spec.num_experts_per_tok)
    trace = record_routing(engine, prompts, DEMO_DECODE, predictor, DEMO_DEPTH)
    partial = path.with_name(f".{path.name}.partial")
    trace.save(partial)
    partial.replace(path)


def decode_trace(settings: PredictSettings, cache_dir: Path) -> RoutingTrace:
    if settings.trace == DEMO_TRACE:
        return demo_trace(cache_dir).decode_steps()
    try:
        return RoutingTrace.load(Path(settings.trace).expanduser()).decode_steps()
    except TraceError as err:
        raise PredictError(f"predict.trace: {err}") from None


def traffic(trace: RoutingTrace, plan: MemoryPlan, policy: str, prefetch: int, top_k: int) -> tuple[Traffic, float]:
    """(misses and prefetch copies per layer, hit rate): the trace replayed through a pool holding
    the plan's share of the experts (at least one token's top-k per layer of the trace), its
    per-layer counts scaled from the trace model's top-k to the priced model's `top_k`."""
    if not plan.residence.streams:
        return Traffic(), 1.0
    share = plan.slots / plan.residence.total_experts
    trace_top_k = int(trace.tokens[0, 0].sum())  # experts the trace's first step asks of a layer
    slots = max(round(share * trace.num_layers * trace.num_experts), trace_top_k)
    counters = simulate(trace, policy, slots, prefetch)
    per_layer = top_k / max(trace_top_k, 1) / (trace.num_steps * trace.num_layers)
    return (Traffic(counters.misses * per_layer, counters.prefetches * per_layer),
            counters.hits / max(counters.requests, 1))


@dataclass(frozen=True)
class Predicted:
    prediction: Prediction
    traffic: Traffic
    hit_rate: float
    prefetch_depth: int

    def to_dict(self) -> dict:
        return {"tokens_per_s": self.prediction.tokens_per_s, **asdict(self.prediction),
                "misses_per_layer": self.traffic.misses_per_layer,
                "prefetches_per_layer": self.traffic.prefetches_per_layer, "hit_rate": self.hit_rate,
                "prefetch_depth": self.prefetch_depth}


def predict(spec, tiers, expert_dtype: str, target: str, plan: MemoryPlan, profile: TimelineProfile,
            context: int, settings: PredictSettings, cache_dir: Path) -> Predicted:
    from offload.timeline import predict_decode

    depth = (settings.prefetch_depth or spec.num_experts_per_tok) if plan.residence.prefetch else 0
    trace = decode_trace(settings, cache_dir) if plan.residence.streams else None
    if trace is not None and depth and trace.guesses is not None and depth > trace.guesses.shape[2]:
        raise PredictError(f"predict.prefetch_depth={depth} is more than the trace's {trace.guesses.shape[2]} "
                           "recorded guesses per layer")
    try:
        flow, hit_rate = traffic(trace, plan, plan.residence.policy, depth, spec.num_experts_per_tok) \
            if trace is not None else (Traffic(), 1.0)
    except TraceError as err:
        raise PredictError(f"predict.trace={settings.trace}: {err}") from None
    prediction = predict_decode(spec, tiers, expert_dtype, target, profile, context, flow)
    return Predicted(prediction, flow, hit_rate, depth)
