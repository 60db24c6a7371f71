"""Tier calibration end to end: routing is recorded faithfully, the CPU cost fit works, and the
notebook, executed on the demo model, writes a tiers option that Hydra and `from_config` accept."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import yaml

from app.calibrate import compare_tiers, format_comparison, group_options, LaunchCost
from app.routing import (
    RoutingRecorder,
    coactivation,
    encode_prompts,
    load_prompts,
    load_samples,
    popularity,
    record_routing,
)
from offload.tiers import Tier, TierSet, from_config, plan_launches
from offload.trace import RoutingTrace, TraceError

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "calibrate_tiers.ipynb"


class CountingDispatcher:
    """Stands in for ExpertDispatcher: counts calls, returns the hidden state, has a counters attribute."""

    def __init__(self):
        self.calls = []
        self.counters = "the real dispatcher's counters"

    def run(self, layer, hidden, x, weights, experts):
        self.calls.append((layer, experts.copy()))
        return hidden


class FakeEngine:
    """The engine surface `record_routing` and `generate` use: spec, dispatcher, reset, forward, next_greedy.
    Routes token t of a launch to experts derived from its id, through `dispatcher.run`."""

    def __init__(self, num_layers=3, num_experts=6, top_k=2, vocab=50):
        from types import SimpleNamespace

        self.spec = SimpleNamespace(num_layers=num_layers, num_experts=num_experts, num_experts_per_tok=top_k,
                                    vocab_size=vocab, eos_token_ids=(0,))
        self.dispatcher = CountingDispatcher()
        self.max_context = 64
        self.launch_sizes = []

    def reset(self):
        pass

    def forward(self, ids):
        ids = np.asarray(ids)
        self.launch_sizes.append(ids.size)
        for layer in range(self.spec.num_layers):
            experts = (ids[:, None] + layer + np.arange(self.spec.num_experts_per_tok)[None, :]) % self.spec.num_experts
            x = np.ones((ids.size, 4), np.float32)
            self.dispatcher.run(layer, x, x, np.ones(experts.shape, np.float32), experts)
        logits = np.zeros(self.spec.vocab_size)
        logits[(ids[-1] * 7 + 3) % self.spec.vocab_size] = 1.0  # greedy: next id is a function of the last
        return logits

    def next_greedy(self, ids):
        return int(np.argmax(self.forward(ids)))


def test_recorder_delegates_and_counts_every_token_choice():
    engine = FakeEngine()
    real = engine.dispatcher
    trace = record_routing(engine, [[5, 9, 11], [2, 4]], decode_tokens=3)
    assert engine.dispatcher is real  # put back
    assert engine.launch_sizes == [3, 1, 1, 1, 2, 1, 1, 1]  # prompt, 3 decode steps; twice
    assert len(real.calls) == 8 * 3  # every call reached the real dispatcher
    assert trace.decode.tolist() == [False, True, True, True] * 2
    assert trace.step_tokens.tolist() == [3, 1, 1, 1, 2, 1, 1, 1]
    assert trace.topk.shape == (11, 3, 2)
    # the trace's tokens are the bincounts of what the dispatcher was asked to do
    for step, (layer, experts) in enumerate(real.calls):
        assert np.array_equal(trace.tokens[step // 3, layer], np.bincount(experts.ravel(), minlength=6))
    assert np.array_equal(trace.topk[:3, 0], real.calls[0][1])


def test_recorder_keeps_the_prefetchers_guesses_per_step_and_layer():
    from offload.prefetch import RouterPredictor

    engine = FakeEngine()
    routers = [np.random.default_rng(layer).standard_normal((6, 4)).astype(np.float32) for layer in range(3)]
    predictor = RouterPredictor(routers, top_k=2)
    trace = record_routing(engine, [[5, 9, 11]], decode_tokens=2, predictor=predictor, depth=4)
    assert trace.guesses.shape == (3, 3, 4)  # steps, layers, depth
    assert (trace.guesses[:, 0] == -1).all()  # nothing guesses the first layer
    for step, rows in enumerate((3, 1, 1)):  # FakeEngine's MoE input is ones, one row per token
        for layer in (1, 2):
            assert trace.guesses[step, layer].tolist() == predictor.predict(layer, np.ones((rows, 4)), 4)
    decode = trace.decode_steps()
    assert decode.num_steps == 2 and np.array_equal(decode.guesses, trace.guesses[1:])


def test_recorder_forwards_attributes_and_rejects_out_of_order_layers():
    dispatcher = CountingDispatcher()
    recorder = RoutingRecorder(dispatcher, num_layers=2, num_experts=4)
    assert recorder.counters == "the real dispatcher's counters"
    with pytest.raises(ValueError, match="recorded no step"):
        recorder.trace()
    experts = np.array([[0, 1]])
    recorder.run(0, np.zeros((1, 4)), np.zeros((1, 4)), np.ones((1, 2)), experts)
    with pytest.raises(ValueError, match="stopped after 1 of 2 layers"):
        recorder.trace()
    with pytest.raises(RuntimeError, match="saw layer 0 after|saw layer 2"):
        recorder.run(2, np.zeros((1, 4)), np.zeros((1, 4)), np.ones((1, 2)), experts)


def test_record_routing_refuses_a_prompt_past_max_context():
    engine = FakeEngine()
    with pytest.raises(ValueError, match="exceeds max_context 64"):
        record_routing(engine, [list(range(60))], decode_tokens=8)
    assert isinstance(engine.dispatcher, CountingDispatcher)


def test_statistics_by_hand():
    # 2 steps, 1 layer, 4 experts, top-2: step 0 has tokens {0,1} and {1,2}; step 1 has {0,1}
    topk = np.array([[[0, 1]], [[1, 2]], [[1, 0]]])
    tokens = np.array([[[1, 2, 1, 0]], [[1, 1, 0, 0]]], np.int32)
    trace = RoutingTrace(tokens, topk=topk, step_tokens=np.array([2, 1]), decode=np.array([False, True]))
    pairs = coactivation(trace)[0]
    assert pairs.tolist() == [[2, 2, 0, 0], [2, 3, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]]
    assert np.allclose(popularity(trace), [[2 / 6, 3 / 6, 1 / 6, 0]])
    assert [s.tolist() for s in load_samples(trace, decode=True)] == [[1, 1, 0, 0]]
    assert len(load_samples(trace)) == 2


def test_trace_keeps_topk_through_save_and_checks_it(tmp_path):
    engine = FakeEngine()
    trace = record_routing(engine, [[5, 9, 11]], decode_tokens=2)
    trace.save(tmp_path / "trace.npz")
    loaded = RoutingTrace.load(tmp_path / "trace.npz")
    for name in ("tokens", "topk", "step_tokens", "decode"):
        assert np.array_equal(getattr(loaded, name), getattr(trace, name))
    RoutingTrace(trace.tokens).save(tmp_path / "plain.npz")  # the old format still round-trips
    assert RoutingTrace.load(tmp_path / "plain.npz").topk is None
    wrong = trace.topk.copy()
    wrong[0, 0, 0] = (wrong[0, 0, 0] + 1) % 6
    with pytest.raises(TraceError, match="does not count up"):
        RoutingTrace(trace.tokens, topk=wrong, step_tokens=trace.step_tokens)
    with pytest.raises(TraceError, match="come together"):
        RoutingTrace(trace.tokens, topk=trace.topk)


def test_prompts_and_byte_fallback(tmp_path):
    shipped = load_prompts()
    assert len(shipped) >= 10 and any("def " in p for p in shipped)
    (tmp_path / "p.txt").write_text("first line\nstill first\n\n\nsecond\n")
    assert load_prompts(tmp_path / "p.txt") == ["first line\nstill first", "second"]
    assert encode_prompts(["ab", ""], tmp_path, vocab_size=50, max_prompt_tokens=1) == [[ord("a") % 50]]
    with pytest.raises(FileNotFoundError, match="no such prompts file"):
        load_prompts(tmp_path / "missing.txt")


def test_launch_cost_fit_recovers_known_parameters():
    from bench.launch_cost import Timing, fit_launch_cost

    truth = LaunchCost(launch_s=3e-4, slot_s=8e-4, slot_token_s=1.5e-4)
    timings = [Timing(g, c, truth.of(Tier(c, g)), 0.0) for g in (1, 2, 4, 8) for c in (1, 4, 8, 32, 64)]
    fitted, residuals = fit_launch_cost(timings)
    for name in ("launch_s", "slot_s", "slot_token_s"):
        assert getattr(fitted, name) == pytest.approx(getattr(truth, name), rel=1e-9)
    assert np.abs(residuals).max() < 1e-9
    # a negative intercept is clamped to zero, not returned
    timings = [Timing(g, c, 1e-3 * g * c - 1e-6, 0.0) for g in (1, 2, 4) for c in (1, 8, 64)]
    fitted, _ = fit_launch_cost(timings)
    assert fitted.launch_s == 0.0 and fitted.slot_token_s > 0


def test_compare_tiers_scores_each_set_on_the_same_loads():
    samples = [np.array([1, 1, 1, 1, 0, 0]), np.array([9, 3, 2, 1, 1, 0])] * 3
    cost = LaunchCost(launch_s=1.0, slot_s=0.5, slot_token_s=0.01)
    candidates = compare_tiers(samples, cost, 2, lambda c: group_options(4))
    assert [c.name for c in candidates] == ["calibrated", "single", "power-of-two", "pow2-spread"]
    assert candidates[1].tiers.capacities == (9,)
    assert candidates[2].tiers.capacities == (8, 16)
    assert candidates[3].tiers.capacities == (1, 16)
    best = min(c.report.cost_per_step_s for c in candidates)
    assert candidates[0].report.cost_per_step_s == best
    assert "calibrated" in format_comparison(candidates)
    with_conf = compare_tiers(samples, cost, 2, lambda c: 4, fixed={"conf": TierSet((Tier(1, 4), Tier(16, 1)))})
    assert with_conf[-1].name == "conf" and with_conf[-1].tiers.capacities == (1, 16)


def _execute_notebook(tmp_path: Path, overrides: dict) -> None:
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    index = next(i for i, cell in enumerate(nb.cells) if "parameters" in cell.metadata.get("tags", []))
    injected = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in overrides.items()))
    injected.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(index + 1, injected)
    NotebookClient(nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    nbformat.write(nb, tmp_path / "executed.ipynb")


def test_notebook_writes_a_tiers_option_run_py_accepts(tmp_path, monkeypatch):
    import shutil

    from hydra import compose, initialize_config_dir

    from app.demo import DEMO_DIR
    from model.spec import load_spec
    from app.settings import tier_set

    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    conf = shutil.copytree(REPO / "conf", tmp_path / "conf")  # run.py's config tree, written into
    _execute_notebook(tmp_path, {
        "MAX_PROMPTS": 3, "MAX_PROMPT_TOKENS": 40, "DECODE_TOKENS": 4, "PREFILL_BUCKETS": [16],
        "TIERS_NAME": "ci", "TIERS_DIR": str(conf / "tiers"), "TRACE_PATH": str(tmp_path / "trace.npz"),
    })
    text = (conf / "tiers" / "ci.yaml").read_text()
    assert text.startswith("# @package _global_\n# Calibrated by notebooks/calibrate_tiers.ipynb on demo")
    tiers = from_config(yaml.safe_load(text)["tiers"])
    assert 1 <= len(tiers) <= 3

    # what run.py does with `tiers=ci`: compose its config, then validate the list for the model
    with initialize_config_dir(config_dir=str(conf), version_base=None):
        cfg = compose("config", overrides=["tiers=ci"])
    spec = load_spec(DEMO_DIR)
    assert tier_set(cfg.tiers, spec) == tiers

    trace = RoutingTrace.load(tmp_path / "trace.npz")
    assert int(trace.decode.sum()) == 3 * 4
    assert trace.step_tokens[trace.decode].tolist() == [1] * 12
    assert trace.step_tokens[~trace.decode].max() <= 16  # one prefill bucket of 16
    assert trace.num_experts == spec.num_experts and trace.topk.shape[2] == spec.num_experts_per_tok
    # every load the trace holds goes through the written tiers without losing a token
    for loads in load_samples(trace):
        carried = sum(p.count for launch in plan_launches(loads, tiers) for p in launch.pieces)
        assert carried == loads.sum()
