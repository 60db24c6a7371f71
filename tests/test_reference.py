"""Ferry's graphs against transformers' qwen3_5_moe on tiny random checkpoints.

For every checkpoint shape: logits at every prompt position for prompt lengths 1..70 (across
launch buckets and the DeltaNet chunk), logits at each of 16 decode steps, and 32 greedy tokens.
"""
import numpy as np
import pytest
import torch

from checkpoints import TinyShape, load_oracle, write_checkpoint
from offload.tiers import from_config
from runtime.build import engine_from_checkpoint
from runtime.engine import Buckets
from runtime.generate import generate

PROMPT = 70


def tolerance(shape: TinyShape) -> float:
    """1e-4 for FP32 checkpoints, as the oracle itself is accurate to about that in FP32.

    The tied BF16 case is worse conditioned: transformers' own FP32 logits differ from an FP64 run
    of the same weights by 8.5e-5 there (Ferry's by a similar amount), so two FP32 runs may differ
    by up to twice that.
    """
    return 1e-4 if shape.dtype == "float32" else 2e-4

SHAPES = {
    "base": TinyShape(),
    # same graph shapes as base, every storage variant at once
    "bf16-fused-sharded-tied-interval4": TinyShape(dtype="bfloat16", fused=True, shard_bytes=30_000, tied=True,
                                                   interval=4, seed=1),
    "untied-sharded-per-expert": TinyShape(shard_bytes=30_000, seed=2),
    "f32-fused-single": TinyShape(fused=True, seed=3),
    # other head counts, no DeltaNet head sharing, more experts, top-1
    "heads6x2-top1-16experts": TinyShape(heads=6, kv_heads=2, lin_k_heads=4, lin_v_heads=4, experts=16, top_k=1,
                                         seed=4),
    "top4-heads2x1": TinyShape(heads=2, kv_heads=1, lin_k_heads=1, lin_v_heads=2, experts=12, top_k=4,
                               interval=4, layers=5, seed=5),
}


@pytest.fixture(scope="module", params=list(SHAPES), ids=list(SHAPES))
def case(request, tmp_path_factory):
    shape = SHAPES[request.param]
    model_dir = write_checkpoint(shape, tmp_path_factory.mktemp(request.param))
    oracle = load_oracle(model_dir)
    ids = np.random.default_rng(shape.seed).integers(2, shape.vocab, PROMPT + 16)
    with torch.no_grad():
        reference = oracle(torch.tensor(ids)[None]).logits[0].numpy()
    engine = engine_from_checkpoint(model_dir, buckets=Buckets((16, 64)), max_context=256)
    return shape, model_dir, oracle, ids, reference, engine


def test_logits_scale_makes_tolerance_meaningful(case):
    _, _, _, _, reference, _ = case
    assert 0.3 < np.abs(reference).std() < 10


@pytest.mark.parametrize("lengths", [range(1, 24), range(24, 48), range(48, PROMPT + 1)],
                         ids=["1-23", "24-47", "48-70"])
def test_prefill_logits_every_position(case, lengths):
    shape, _, _, ids, reference, engine = case
    for n in lengths:
        engine.reset()
        ours = engine.forward(ids[:n], all_logits=True)
        diff = np.abs(ours - reference[:n]).max()
        assert diff <= tolerance(shape), f"prompt length {n}: max |logit diff| {diff:.2e}"


def test_decode_logits_each_step(case):
    shape, _, _, ids, reference, engine = case
    engine.reset()
    last = engine.forward(ids[:PROMPT])
    np.testing.assert_allclose(last, reference[PROMPT - 1], atol=tolerance(shape), rtol=0)
    for step in range(16):
        logits = engine.forward(ids[PROMPT + step : PROMPT + step + 1])
        diff = np.abs(logits - reference[PROMPT + step]).max()
        assert diff <= tolerance(shape), f"decode step {step}: max |logit diff| {diff:.2e}"


def test_greedy_tokens_match(case):
    shape, _, oracle, ids, _, engine = case
    prompt = ids[:20]
    with torch.no_grad():
        expected = oracle.generate(torch.tensor(prompt)[None], max_new_tokens=32, do_sample=False,
                                   min_new_tokens=32, eos_token_id=None, pad_token_id=0)[0, 20:].tolist()
    ours = generate(engine, prompt, max_new_tokens=32, eos_ids=())
    assert ours.token_ids == expected


def test_tiers_never_change_the_result(case):
    """Tiers of capacity 1 and 2 split every busy expert over many launches: same logits."""
    shape, model_dir, _, ids, reference, _ = case
    tight = from_config([{"capacity": 1, "group": 1}, {"capacity": 2, "group": 3}])
    engine = engine_from_checkpoint(model_dir, tiers=tight, buckets=Buckets((16, 64)), max_context=256)
    ours = engine.forward(ids[:PROMPT], all_logits=True)
    assert np.abs(ours - reference[:PROMPT]).max() <= tolerance(shape)
    counters = engine.dispatcher.counters
    assert counters.launches[0] > 0 and counters.launches[1] > 0
    assert sum(counters.tokens) == PROMPT * shape.top_k * shape.layers  # every routed token, once


@pytest.fixture(scope="module")
def trained():
    """The trained demo shipped in models/ferry-demo, on its held-out text: real routing, real logits."""
    from transformers import Qwen3_5MoeForCausalLM

    from app.demo import DEMO_DIR, HELDOUT
    from runtime.tokenizer import load_tokenizer

    ids = np.array(load_tokenizer(DEMO_DIR).encode(HELDOUT.read_text(encoding="utf-8")).ids[:PROMPT + 16])
    oracle = Qwen3_5MoeForCausalLM.from_pretrained(DEMO_DIR, dtype=torch.float32).eval()
    with torch.no_grad():
        reference = oracle(torch.tensor(ids)[None]).logits[0].numpy()
    engine = engine_from_checkpoint(DEMO_DIR, buckets=Buckets((16, 64)), max_context=256)
    return oracle, ids, reference, engine


def test_trained_demo_matches_transformers(trained):
    """Logits at every prompt position and decode step within the BF16 checkpoints' tolerance (2e-4),
    and 32 greedy tokens exactly."""
    oracle, ids, reference, engine = trained
    assert np.abs(reference).std() > 1  # a trained model's logits: confident, not flat
    engine.reset()
    ours = engine.forward(ids[:PROMPT], all_logits=True)
    assert np.abs(ours - reference[:PROMPT]).max() <= 2e-4
    for step in range(16):
        logits = engine.forward(ids[PROMPT + step: PROMPT + step + 1])
        diff = np.abs(logits - reference[PROMPT + step]).max()
        assert diff <= 2e-4, f"decode step {step}: max |logit diff| {diff:.2e}"
    prompt = ids[:20]
    with torch.no_grad():
        expected = oracle.generate(torch.tensor(prompt)[None], max_new_tokens=32, do_sample=False,
                                   min_new_tokens=32, eos_token_id=None, pad_token_id=0)[0, 20:].tolist()
    engine.reset()
    assert generate(engine, prompt, max_new_tokens=32, eos_ids=()).token_ids == expected
