"""`python -m convert` end to end on tiny checkpoints: artifacts generate exactly what the eager Cells
and transformers generate (FP32 storage), FP16 and INT8 storage stay within measured tolerances,
the manifest records what the graphs really take and return, and the CLI inspects, verifies and
queries an artifact.

Accuracy cost of narrower expert storage (tiny random models, 70-token prompt, logits of order 1):
the bounds below are about 3x the largest error measured; the measured values are printed with -s.
"""
from __future__ import annotations

import json
import tracemalloc

import numpy as np
import mindspore as ms
import pytest
import torch

from checkpoints import TinyShape, load_oracle, write_checkpoint
from artifact.reader import Artifact
from convert.cli import main as cli
from artifact.manifest import VERSION, Manifest, TierRecord
from convert.pipeline import ConvertOptions, convert
from artifact.store import _ReportTotals, decode_block, encode_expert
from runtime.build import engine_from_artifact, engine_from_checkpoint
from runtime.engine import Buckets
from runtime.exported import ExportedGraphs
from convert.export import zero_inputs
from runtime.generate import generate

PROMPT = 70
NEW_TOKENS = 32
TIERS = (TierRecord(1, 2), TierRecord(8, 4), TierRecord(64, 2))
FP32_OPTIONS = ConvertOptions("fp32", TIERS, (16, 64), 256)
# Stated tolerances of narrow storage (experts in the narrow format, dense matrices in FP16:
# artifact.dense) against FP32 storage of the same checkpoint, over the 70 teacher-forced prompt
# positions (test_narrow_storage_accuracy; measured values in the comments). max: max |logit diff|;
# rel_rms: RMS logit diff / RMS logit; kl: mean KL(FP32 || narrow) of the next-token distributions;
# top1: fraction of positions with the same argmax.
TOLERANCE = {
    # FP32 weights stored as FP16 (measured 2.2e-2, 1.8e-3, 1.6e-6, 1.0; 32/32 greedy tokens equal;
    # with FP16 experts alone, dense FP32: 2.6e-3, 3.7e-4, 6.8e-8)
    "fp16": {"max": 5e-2, "rel_rms": 4e-3, "kl": 4e-6, "top1": 1.0},
    # INT8 per output channel (measured 0.88, 4.2e-2, 9.0e-4, 0.986; greedy tokens part after 3 of 32:
    # a tiny random model's next-token distribution is flat, and one flipped top-k expert moves a logit
    # by up to ~1)
    "int8": {"max": 2.5, "rel_rms": 0.1, "kl": 3e-3, "top1": 0.95},
    # BF16 weights stored as FP16: a BF16 value within FP16's normal range (6.1e-5 .. 65504) is exact
    # in FP16, smaller ones lose a few bits as subnormals (measured 1.3e-5, 1.2e-6, 7e-13, 1.0; 32/32)
    "bf16->fp16": {"max": 1e-4, "rel_rms": 1e-5, "kl": 1e-9, "top1": 1.0},
}
BF16_SHAPE = TinyShape(dtype="bfloat16", fused=True, shard_bytes=30_000, tied=True, interval=4, seed=1)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Base tiny checkpoint, its transformers logits, and its FP32 artifact."""
    shape = TinyShape()
    model_dir = write_checkpoint(shape, tmp_path_factory.mktemp("ckpt"))
    oracle = load_oracle(model_dir)
    ids = np.random.default_rng(0).integers(2, shape.vocab, PROMPT)
    with torch.no_grad():
        reference = oracle(torch.tensor(ids)[None]).logits[0].numpy()
        expected = oracle.generate(torch.tensor(ids[:20])[None], max_new_tokens=NEW_TOKENS, do_sample=False,
                                   min_new_tokens=NEW_TOKENS, eos_token_id=None, pad_token_id=0)[0, 20:].tolist()
    out = tmp_path_factory.mktemp("art") / "fp32"
    manifest, stats = convert(model_dir, out, FP32_OPTIONS, progress=False)
    return model_dir, ids, reference, expected, out, manifest, stats


@pytest.fixture(scope="module")
def fp32_engine(base):
    return engine_from_artifact(base[4])


@pytest.fixture(scope="module")
def eager_engine(base):
    return engine_from_checkpoint(base[0], buckets=Buckets((16, 64)), max_context=256)


def test_artifact_layout(base):
    _, _, _, _, out, manifest, _ = base
    assert sorted(p.name for p in out.iterdir()) == ["dense.safetensors", "experts.bin", "graphs", "manifest.json"]
    assert not list(out.parent.glob("*.tmp-*"))
    assert Manifest.from_json((out / "manifest.json").read_text()) == manifest
    spec = manifest.model
    assert len(manifest.experts.blocks) == spec.num_layers * spec.num_experts
    assert all(b.offset % 4096 == 0 for b in manifest.experts.blocks)
    assert {g.name for g in manifest.graphs} == {
        *(f"{kind}_t{t}" for kind in ("embedding", "head", "last_head", "attention", "deltanet") for t in (1, 16, 64)),
        *(f"experts_fp32_{tier}_t{t}" for tier in ("g2_c1", "g4_c8", "g2_c64") for t in (1, 16, 64))}


def test_fp32_artifact_matches_transformers_and_eager_cells(base, fp32_engine, eager_engine):
    model_dir, ids, reference, expected, *_ = base
    fp32_engine.reset()
    ours = fp32_engine.forward(ids, all_logits=True)
    diff = np.abs(ours - reference).max()
    assert diff <= 1e-4, f"artifact vs transformers: max |logit diff| {diff:.2e}"
    eager_engine.reset()
    np.testing.assert_array_equal(ours, eager_engine.forward(ids, all_logits=True))  # same graphs, same bits
    tokens = generate(fp32_engine, ids[:20], NEW_TOKENS, eos_ids=()).token_ids
    assert tokens == expected
    assert tokens == generate(eager_engine, ids[:20], NEW_TOKENS, eos_ids=()).token_ids


def test_decode_steps_match_transformers(base, fp32_engine):
    _, ids, reference, *_ = base
    fp32_engine.reset()
    fp32_engine.forward(ids[:60])
    for step in range(60, PROMPT):
        logits = fp32_engine.forward(ids[step : step + 1])
        assert np.abs(logits - reference[step]).max() <= 1e-4, f"decode at position {step}"


def test_manifest_signatures_are_what_the_graphs_take_and_return(base, fp32_engine):
    graphs = fp32_engine.graphs
    assert isinstance(graphs, ExportedGraphs)
    pool = fp32_engine.dispatcher.weights.device_pool
    for record in base[5].graphs:
        inputs = zero_inputs(record.inputs)
        if record.kind == "expert_group":  # the pool's dimensions are the run's: its tensors
            inputs[6:] = list(pool.tensors)
        outputs = graphs._launch(record)(*inputs)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        got = [(tuple(o.shape), str(o.asnumpy().dtype)) for o in outputs]
        assert got == [(s.shape, s.dtype) for s in record.outputs], record.name


def test_launches_after_the_first_run_the_compiled_phase_with_the_same_results(fp32_engine):
    """Calls after the first skip `GraphCell.__call__` for MindSpore's executor: same outputs, bit for bit."""
    rng = np.random.default_rng(0)
    launch = fp32_engine.graphs.head(16)
    args = [ms.Tensor.from_numpy(rng.standard_normal(sig.shape).astype(sig.dtype)) for sig in launch.record.inputs]
    first = launch(*args)
    assert list(launch._phases) == [()]  # one compiled phase: the head has no input of the run's size
    again = launch(*args)
    through_cell = launch.cell(*args)
    for a, b, c in zip(first, again, through_cell):
        assert isinstance(b, ms.Tensor)
        np.testing.assert_array_equal(a.asnumpy(), b.asnumpy())
        np.testing.assert_array_equal(b.asnumpy(), c.asnumpy())


def test_wrong_launch_shape_names_graph_and_input(fp32_engine):
    launch = fp32_engine.graphs.head(1)
    inputs = zero_inputs(launch.record.inputs)
    inputs[0] = zero_inputs(fp32_engine.graphs.head(16).record.inputs)[0]
    with pytest.raises(ValueError, match=r"head_t1 input 0: expected .*\(1, 64\)"):
        launch(*inputs)


@pytest.fixture(scope="module")
def narrow(base, tmp_path_factory):
    """FP16 and INT8 artifacts of the base checkpoint, and FP16 of a BF16 (fused, tied) one, each with
    the FP32 result of its checkpoint (eager Cells) on the prompt: logits and greedy tokens."""
    root = tmp_path_factory.mktemp("narrow")
    bf16_dir = write_checkpoint(BF16_SHAPE, tmp_path_factory.mktemp("bf16"))
    ids = base[1]
    references = {}
    for model_dir in (base[0], bf16_dir):
        engine = engine_from_checkpoint(model_dir, buckets=Buckets((16, 64)), max_context=256)  # Cells shared
        references[model_dir] = (engine.forward(ids, all_logits=True),
                                 generate(engine, ids[:20], NEW_TOKENS, eos_ids=()).token_ids)
    cases = {}
    for name, model_dir, dtype in (("fp16", base[0], "fp16"), ("int8", base[0], "int8"),
                                   ("bf16->fp16", bf16_dir, "fp16")):
        out = root / name.replace(">", "")
        manifest, _ = convert(model_dir, out, ConvertOptions(dtype, TIERS, (16, 64), 256), progress=False)
        cases[name] = (out, manifest) + references[model_dir]
    return cases


def logit_errors(ours: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Max and relative RMS logit error, mean KL(reference || ours) and top-1 agreement over positions."""
    diff = ours.astype(np.float64) - reference
    def log_softmax(x):
        x = x.astype(np.float64) - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))
    p_log, q_log = log_softmax(reference), log_softmax(ours)
    return {
        "max": float(np.abs(diff).max()),
        "rel_rms": float(np.sqrt((diff ** 2).mean() / (reference.astype(np.float64) ** 2).mean())),
        "kl": float((np.exp(p_log) * (p_log - q_log)).sum(-1).mean()),
        "top1": float(np.mean(ours.argmax(-1) == reference.argmax(-1))),
    }


@pytest.mark.parametrize("case", ["fp16", "int8", "bf16->fp16"])
def test_narrow_storage_accuracy(case, narrow, base):
    """Against FP32 storage of the same checkpoint: teacher-forced logits over the 70-token prompt,
    and 32 greedy tokens."""
    out, manifest, reference, ref_tokens = narrow[case]
    dtypes = {t.name: t.dtype for t in manifest.dense.tensors}
    assert dtypes["embed"] == dtypes["layers.0.in_proj_qkv"] == dtypes["layers.0.router"] == "float16"
    assert dtypes["final_norm"] == dtypes["layers.0.A_log"] == dtypes["layers.0.conv1d"] == "float32"
    engine = engine_from_artifact(out)
    errors = logit_errors(engine.forward(base[1], all_logits=True), reference)
    tokens = generate(engine, base[1][:20], NEW_TOKENS, eos_ids=()).token_ids
    same = next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b), NEW_TOKENS)
    print(f"\n{case}: max |dlogit| {errors['max']:.2e}, relative RMS {errors['rel_rms']:.2e}, "
          f"mean KL {errors['kl']:.2e}, top-1 agreement {errors['top1']:.3f} (logit std {reference.std():.2f}); "
          f"greedy tokens equal for {same}/{NEW_TOKENS}; weight relative RMS error "
          f"{manifest.experts.report.relative_rms_error:.2e}")
    bound = TOLERANCE[case]
    assert errors["max"] <= bound["max"] and errors["rel_rms"] <= bound["rel_rms"] and errors["kl"] <= bound["kl"]
    assert errors["top1"] >= bound["top1"]
    if manifest.experts.dtype == "fp16":
        assert tokens == ref_tokens


# FP16 graphs for the 310P3 against transformers in FP32 (measured on the base checkpoint: max |dlogit|
# 2.4e-2, RMS 2.2e-3, top-1 0.986; the tiny model's flat next-token distribution lets greedy tokens part
# after 3): the bounds are about 3x, as above.
ASCEND_TOLERANCE = {"max": 0.075, "rms": 7e-3, "top1": 0.95}


def test_ascend_310p3_artifact_has_no_cpu_op_and_matches_transformers_in_fp16(base, tmp_path, capsys):
    """`--device ascend_310p3`: FP16 projection weights and KV cache, FP16 experts, no custom op in
    any graph; the CPU backend runs the same graphs within the stated FP16 tolerance."""
    model_dir, ids, reference = base[0], base[1], base[2]
    out = tmp_path / "ascend"
    assert cli(["--model-dir", str(model_dir), "--out", str(out), "--device", "ascend_310p3", "--dtype", "fp16",
                "--tiers", "1x2,8x4,64x2", "--buckets", "16,64", "--max-context", "256", "--quiet"]) == 0
    manifest = Manifest.from_json((out / "manifest.json").read_text())
    assert manifest.target == "ascend_310p3" and manifest.kernels is None
    dtypes = {t.name: t.dtype for t in manifest.dense.tensors}
    assert dtypes["embed"] == dtypes["layers.0.in_proj_qkv"] == dtypes["layers.1.q_proj"] == "float16"
    assert dtypes["final_norm"] == dtypes["layers.0.A_log"] == "float32"
    attention = manifest.graph("attention", 1)
    assert attention.inputs[3].dtype == attention.inputs[4].dtype == "float16"  # the KV caches
    for graph in (out / "graphs").glob("*.mindir"):
        data = graph.read_bytes()
        assert b"Custom" not in data and b"FERRY_CPU_LIBRARY" not in data, graph.name
    engine = engine_from_artifact(out)
    assert engine.keys[1].dtype == ms.float16
    ours = engine.forward(ids, all_logits=True)
    diff = ours - reference
    errors = {"max": float(np.abs(diff).max()), "rms": float(np.sqrt(np.mean(diff ** 2))),
              "top1": float(np.mean(ours.argmax(-1) == reference.argmax(-1)))}
    print(f"\nascend_310p3 fp16 against transformers fp32: {errors}")
    assert errors["max"] <= ASCEND_TOLERANCE["max"] and errors["rms"] <= ASCEND_TOLERANCE["rms"]
    assert errors["top1"] >= ASCEND_TOLERANCE["top1"]
    capsys.readouterr()
    assert cli(["inspect", str(out)]) == 0
    assert "target ascend_310p3: graphs no custom op" in capsys.readouterr().out
    assert cli(["--model-dir", str(model_dir), "--out", str(tmp_path / "x"), "--device", "ascend_310p3"]) == 2
    assert "store its experts as fp16 or int8, not fp32" in capsys.readouterr().err


def test_storage_report_counts_out_of_range_values():
    rng = np.random.default_rng(0)
    gate_up = rng.standard_normal((8, 16)).astype(np.float32) * 0.1
    down = rng.standard_normal((16, 4)).astype(np.float32) * 0.1
    gate_up[0, :3] = [1e5, -7e4, 3e-9]  # two overflow, one underflows to zero in FP16
    gate_up[1, 0] = 1e-6  # an FP16 subnormal
    down[2] = 0.0  # an all-zero output channel
    totals = _ReportTotals("fp16")
    (gu16, dn16), error_sq, value_sq = encode_expert("fp16", gate_up, down, totals)
    assert gu16[0, 0] == 65504 and gu16[0, 1] == -65504 and gu16[0, 2] == 0
    assert (totals.overflow, totals.nonzero_to_zero, totals.subnormal) == (2, 1, 1)
    assert error_sq > 0 and totals.max_abs == pytest.approx(1e5)

    totals = _ReportTotals("int8")
    arrays, error_sq, value_sq = encode_expert("int8", gate_up, down, totals)
    q, scale = arrays[0], arrays[2]
    assert q.dtype == np.int8 and np.abs(q).max() == 127 and totals.zero_channels == 1
    assert scale[0] == pytest.approx(1e5 / 127)
    parts = ("gate_up", "down", "gate_up_scale", "down_scale")
    restored_gu, restored_dn = decode_block(dict(zip(parts, arrays)))
    row_step = np.abs(gate_up).max(axis=1) / 127  # one quantisation step per row
    assert (np.abs(restored_gu - gate_up) <= row_step[:, None] / 2 + 1e-12).all()
    np.testing.assert_array_equal(restored_dn[2], 0.0)


@pytest.mark.parametrize("bf16", [True, False], ids=["bf16-values", "fp32-values"])
def test_fp16_report_is_exact(bf16):
    """The report's counts and squared error equal a brute-force FP16 round trip, on both paths
    (BF16-valued input takes a shortcut)."""
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((64, 32)) * np.exp(rng.uniform(-20, 12, (64, 32)))).astype(np.float32)
    if bf16:
        w = (w.view(np.uint32) & 0xFFFF0000).view(np.float32)
    w[0, :4] = 0.0
    totals = _ReportTotals("fp16")
    (stored, _), error_sq, _ = encode_expert("fp16", w, np.zeros((4, 4), np.float32), totals)
    clipped = np.clip(w, -65504, 65504)
    back = clipped.astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(stored.astype(np.float32), back)
    assert totals.overflow == np.count_nonzero(np.abs(w) > 65504) > 0
    assert totals.nonzero_to_zero == np.count_nonzero((back == 0) & (w != 0)) > 0
    assert totals.subnormal == np.count_nonzero((back != 0) & (np.abs(back) < 2.0 ** -14)) > 0
    assert error_sq == pytest.approx(float(((back.astype(np.float64) - w) ** 2).sum()), rel=1e-5)


def test_fp16_report_in_manifest(narrow):
    report = narrow["bf16->fp16"][1].experts.report
    assert report.dtype == "fp16" and report.values > 0 and report.overflow == 0
    assert 0 < report.relative_rms_error < 1e-3  # BF16 has fewer mantissa bits than FP16: only range matters
    assert "65504" in report.handling


def test_tied_fused_bf16_artifact_stores_no_head(narrow):
    out, manifest = narrow["bf16->fp16"][:2]
    assert manifest.dense.tied_head and "lm_head" not in {t.name for t in manifest.dense.tensors}
    weights = Artifact.open(out).global_weights()
    assert weights["lm_head"] is weights["embed"]


def test_convert_streams_layer_by_layer(base, tmp_path):
    """While a layer is converted, Python-side memory (numpy reports its buffers to tracemalloc) grows
    by less than one layer's FP32 weights; holding the checkpoint would take four layers' worth."""
    model_dir, *_ = base
    spec = Artifact.open(base[4], verify="none").spec
    layer_bytes = 4 * (spec.num_experts * spec.expert_params + 30_000)  # experts + dense (~30k values)
    held, peaks = [], []

    def after_layer(layer):
        current, peak = tracemalloc.get_traced_memory()
        held.append(current)
        peaks.append(peak)
        tracemalloc.reset_peak()

    tracemalloc.start()
    try:
        convert(model_dir, tmp_path / "a", FP32_OPTIONS, progress=False, on_layer=after_layer)  # graphs cached
    finally:
        tracemalloc.stop()
    growth = max(peaks[1:]) - min(held)
    assert len(peaks) == spec.num_layers and growth < layer_bytes, f"grew {growth} bytes; a layer is {layer_bytes}"


def test_cli_convert_inspect_verify_query(base, narrow, tmp_path, capsys):
    model_dir, *_ = base
    out = tmp_path / "cli"
    assert cli(["--model-dir", str(model_dir), "--out", str(out), "--dtype", "int8", "--tiers", "1,8x4",
                "--buckets", "16,64", "--max-context", "256", "--quiet"]) == 0  # graphs as `narrow`'s
    printed = capsys.readouterr().out
    assert "GB/s" in printed and "int8 experts: relative RMS error" in printed
    assert [(t.capacity, t.group) for t in Artifact.open(out).manifest.tiers] == [(1, 2), (8, 4)]

    assert cli(["inspect", str(out)]) == 0
    printed = capsys.readouterr().out
    for needle in ("hidden_size", "experts_int8_g4_c8_t16", "gate_up_scale", "tiers (capacity x group): 1x2, 8x4",
                   "dense.safetensors"):
        assert needle in printed
    assert cli(["verify", str(out)]) == 0
    # 16 files: the 6 kernel expert groups (2 tiers x 3 launch sizes) are built at load, not stored
    assert "OK: 16 files and 32 expert blocks" in capsys.readouterr().out
    assert cli(["query", str(out), "--expert", "3", "7"]) == 0
    printed = capsys.readouterr().out
    assert "layer 3 expert 7" in printed and "int8" in printed and "as computed (FP32)" in printed
    assert cli(["query", str(out), "--tensor", "layers.1.q_proj"]) == 0
    assert "[128, 64]" in capsys.readouterr().out  # 4 heads x 16 dims, query and gate


def test_cli_usage_errors(base, tmp_path, capsys):
    model_dir, *_ = base
    assert cli(["--model-dir", str(model_dir), "--out", str(tmp_path / "x"), "--tiers", "8,1", "--quiet"]) == 2
    assert "sorted" in capsys.readouterr().err
    assert cli(["--model-dir", str(model_dir), "--out", str(tmp_path / "x"), "--buckets", "1,16"]) == 2
    assert cli(["--model-dir", str(tmp_path), "--out", str(tmp_path / "x")]) == 1
    assert "config.json" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_store_serves_the_offload_controller(base):
    """The artifact's store is what the offload controller streams from: a block read into a slot
    (`read_into`) is the mapped block byte for byte, and its arrays are the checkpoint's (FP32)."""
    from model.checkpoint import Checkpoint
    from offload.device import aligned_empty

    store = Artifact.open(base[4]).experts
    checkpoint = Checkpoint(base[0])
    buffer = aligned_empty((2, store.record.stride), "uint8")
    for slot, (layer, expert) in enumerate(((0, 0), (3, 7))):
        store.read_into(layer, expert, buffer[slot])
        assert bytes(buffer[slot, : store.block_bytes]) == bytes(store.block_bytes_of(layer, expert))
        views = [buffer[slot, p.offset: p.offset + p.nbytes].view(p.dtype).reshape(p.shape) for p in store.parts]
        for ours, theirs in zip(views, checkpoint.expert_weights(layer, expert)):
            np.testing.assert_array_equal(ours, theirs)
    assert buffer[1].ctypes.data % 4096 == 0 and (3, 7) in store.verified


def test_global_tensors_are_read_in_row_chunks(base, monkeypatch):
    from convert import source
    from model.checkpoint import Checkpoint

    checkpoint = Checkpoint(base[0])
    monkeypatch.setattr(source, "ROW_CHUNK_BYTES", 4 * 64 * 7)  # 7 rows of the 64-wide table
    chunks = [c.copy() for c in source.global_rows(checkpoint, "embed")]
    assert len(chunks) == -(-160 // 7) and max(len(c) for c in chunks) == 7
    np.testing.assert_array_equal(np.concatenate(chunks), checkpoint.global_weights()["embed"])


def test_manifest_json_round_trip_is_plain_data(base):
    text = (base[4] / "manifest.json").read_text()
    data = json.loads(text)
    assert data["format"] == "ferry-artifact" and data["version"] == VERSION and data["target"] == "cpu"
    assert data["experts"]["parts"][0] == {"name": "gate_up", "dtype": "float32", "shape": [64, 64], "offset": 0}
