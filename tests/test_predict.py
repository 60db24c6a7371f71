"""run.py mode=predict: the timeline simulator over a config, its errors, and Optuna searching over it.

The routing trace is written here (8 layers of 64 experts, top-8, with the prefetcher's guesses), so no
model runs; Qwen3.6-35B-A3B's config and the 310P3 profile are the shipped ones.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from offload.trace import RoutingTrace
from test_app import assert_clean, ferry

QWEN = ["mode=predict", "+model=qwen36_35b", "device=ascend_310p3", "max_context=4096"]
DEPTH = 16


def write_trace(path: Path, guesses: bool = True) -> Path:
    """Decode steps that mostly reuse each layer's favourite experts; guesses name the true experts first."""
    rng = np.random.default_rng(0)
    steps, layers, experts, k = 48, 8, 64, 8
    tokens = np.zeros((steps, layers, experts), np.int32)
    guessed = np.full((steps, layers, DEPTH), -1, np.int32)
    for step in range(steps):
        for layer in range(layers):
            chosen = rng.choice(16, 6, replace=False).tolist() + rng.choice(np.arange(16, experts), 2, replace=False).tolist()
            tokens[step, layer, chosen] = 1
            if layer:
                others = [e for e in range(experts) if e not in chosen][: DEPTH - k]
                guessed[step, layer] = chosen + others
    trace = RoutingTrace(tokens, decode=np.ones(steps, bool), guesses=guessed if guesses else None)
    trace.save(path)
    return path


def predicted(proc, out: Path) -> dict:
    assert_clean(proc)
    record = json.loads((out / "metrics.json").read_text())
    line = next(line for line in proc.stdout.splitlines() if line.startswith("decode "))
    assert f"{record['prediction']['tokens_per_s']:.1f} tokens/s predicted" in line
    return record


def test_predict_prices_the_plan_and_the_routing(tmp_path):
    trace = write_trace(tmp_path / "trace.npz")
    common = [*QWEN, f"predict.trace={trace}", "placement.policy=lru"]
    plain = predicted(ferry(common, tmp_path, tmp_path), tmp_path / "out")
    fetched = predicted(ferry([*common, "placement.prefetch=true"], tmp_path, tmp_path), tmp_path / "out")
    int8 = predicted(ferry([*common, "device.expert_dtype=int8"], tmp_path, tmp_path), tmp_path / "out")
    slow_copies = predicted(ferry([*common, "timeline.h2d_gbps=2"], tmp_path, tmp_path), tmp_path / "out")

    assert plain["plan"]["streams"] and plain["plan"]["slots"] < plain["plan"]["total_experts"]
    assert plain["prediction"]["prefetches_per_layer"] == 0 and plain["prediction"]["misses_per_layer"] > 0
    # the recorded guesses name every expert of layers 1..7: only layer 0 still misses
    assert fetched["prediction"]["prefetch_depth"] == 8
    assert fetched["prediction"]["misses_per_layer"] < plain["prediction"]["misses_per_layer"] / 4
    assert fetched["prediction"]["hit_rate"] > plain["prediction"]["hit_rate"]
    assert fetched["prediction"]["tokens_per_s"] > plain["prediction"]["tokens_per_s"]
    # int8 blocks: more slots in the same memory, half the bytes per copy and per read
    assert int8["plan"]["slots"] > plain["plan"]["slots"]
    assert int8["prediction"]["tokens_per_s"] > plain["prediction"]["tokens_per_s"]
    assert slow_copies["prediction"]["copy_ms"] == pytest.approx(12 * plain["prediction"]["copy_ms"], rel=1e-6)
    assert slow_copies["timeline"]["h2d_gbps"] == 2


@pytest.mark.parametrize("args, needle", [
    (["device=cpu"], "timeline=ascend_310p3 prices another device than device=cpu"),
    (["timeline.h2d_gbps=-1"], "timeline.h2d_gbps must be a non-negative number"),
    (["timeline.gbps.experts=0"], "timeline.gbps must give a positive GB/s"),
    (["predict.prefetch_depth=0"], "predict.prefetch_depth must be a positive integer or null"),
    (["placement.prefetch=true", f"predict.prefetch_depth={DEPTH + 1}"], f"is more than the trace's {DEPTH}"),
    (["placement.prefetch=true", "predict.trace=NOGUESS"], "prefetch needs a trace with the prefetcher's guesses"),
    (["predict.trace=GARBAGE"], "not a readable .npz routing trace"),
])
def test_predict_refuses_bad_settings_with_one_line(tmp_path, args, needle):
    trace = write_trace(tmp_path / "trace.npz")
    no_guesses = write_trace(tmp_path / "plain.npz", guesses=False)
    (tmp_path / "garbage.npz").write_text("not a trace")
    args = [a.replace("NOGUESS", str(no_guesses)).replace("GARBAGE", str(tmp_path / "garbage.npz")) for a in args]
    if not any(a.startswith("predict.trace=") for a in args):
        args.append(f"predict.trace={trace}")
    proc = ferry([*QWEN, *args], tmp_path, tmp_path)
    assert_clean(proc, 2)
    assert needle in proc.stderr, proc.stderr
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_optuna_sweep_finds_the_best_predicted_config(tmp_path):
    trace = write_trace(tmp_path / "trace.npz")
    sweep = tmp_path / "sweep"
    proc = ferry(["+sweep=optuna_310p3", f"predict.trace={trace}", "hydra.sweeper.n_trials=6",
                  f"hydra.sweep.dir={sweep}", "--multirun"], tmp_path, tmp_path)
    assert_clean(proc)
    jobs = [json.loads(path.read_text()) for path in sorted(sweep.glob("*/metrics.json"))]
    assert len(jobs) == 6 and all(job["max_context"] == 4096 and job["device"] == "ascend_310p3" for job in jobs)
    best = max(jobs, key=lambda job: job["prediction"]["tokens_per_s"])
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert result["best_value"] == pytest.approx(best["prediction"]["tokens_per_s"])
    chosen = {key: str(value).lower() for key, value in result["best_params"].items()}
    assert chosen["tiers"] == best["choices"]["tiers"]
    assert chosen["device.expert_dtype"] == best["expert_dtype"]
    assert chosen["placement.policy"] == best["placement"]["policy"]
