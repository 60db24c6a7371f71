"""Generation on top of the engine: sampling, seeds, stopping, and the engine's input checks."""
import numpy as np
import pytest

from checkpoints import TinyShape, write_checkpoint
from runtime.build import engine_from_checkpoint
from runtime.engine import Buckets
from runtime.generate import generate
from runtime.sampling import Sampler, Sampling


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    model_dir = write_checkpoint(TinyShape(), tmp_path_factory.mktemp("gen"))
    return engine_from_checkpoint(model_dir, buckets=Buckets((16, 64)), max_context=256)


PROMPT = [5, 17, 42, 7, 99, 3]


def test_sampler_greedy_is_argmax():
    logits = np.array([0.1, 2.0, -1.0, 1.9], np.float32)
    assert Sampler(Sampling())(logits) == 1


def test_top_k_one_and_tiny_top_p_are_greedy():
    rng = np.random.default_rng(0)
    for _ in range(20):
        logits = rng.normal(size=50).astype(np.float32)
        best = int(np.argmax(logits))
        assert Sampler(Sampling(temperature=1.0, top_k=1, seed=3))(logits) == best
        assert Sampler(Sampling(temperature=1.0, top_p=1e-6, seed=3))(logits) == best


def test_sampling_follows_the_tempered_distribution():
    logits = np.log(np.array([0.5, 0.3, 0.2], np.float32))
    sampler = Sampler(Sampling(temperature=1.0, seed=0))
    counts = np.bincount([sampler(logits) for _ in range(4000)], minlength=3) / 4000
    np.testing.assert_allclose(counts, [0.5, 0.3, 0.2], atol=0.03)


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    logits = np.log(np.array([0.5, 0.3, 0.2], np.float32))
    sampler = Sampler(Sampling(temperature=1.0, top_p=0.7, seed=1))
    drawn = {sampler(logits) for _ in range(500)}
    assert drawn == {0, 1}


def test_top_k_restricts_to_the_k_most_likely():
    logits = np.array([3.0, 2.9, 2.8, -5.0, 2.7], np.float32)
    sampler = Sampler(Sampling(temperature=2.0, top_k=2, seed=5))
    assert {sampler(logits) for _ in range(300)} == {0, 1}


@pytest.mark.parametrize("bad", [dict(temperature=-1.0), dict(temperature=float("nan")), dict(temperature=float("inf")),
                                 dict(top_k=-2), dict(top_k=2.5), dict(top_p=0.0), dict(top_p=1.5),
                                 dict(top_p=float("nan")), dict(seed=-1), dict(seed=True)])
def test_bad_sampling_settings_are_refused(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        Sampling(**bad)


def test_seeded_sampling_reproduces_and_seeds_differ(engine):
    settings = dict(temperature=1.5, top_k=20, top_p=0.95)
    first = generate(engine, PROMPT, 12, Sampling(seed=7, **settings), eos_ids=())
    again = generate(engine, PROMPT, 12, Sampling(seed=7, **settings), eos_ids=())
    other = generate(engine, PROMPT, 12, Sampling(seed=8, **settings), eos_ids=())
    assert first.token_ids == again.token_ids
    assert first.token_ids != other.token_ids


def test_stops_on_eos_and_on_max_new_tokens(engine):
    free = generate(engine, PROMPT, 8, eos_ids=())
    assert len(free.token_ids) == 8 and not free.stopped_on_eos
    stop_at = free.token_ids[3]
    first = free.token_ids.index(stop_at)
    stopped = generate(engine, PROMPT, 8, eos_ids=[stop_at])
    assert stopped.token_ids == free.token_ids[: first + 1]
    assert stopped.stopped_on_eos


def test_streaming_callback_sees_every_token(engine):
    seen = []
    result = generate(engine, PROMPT, 5, eos_ids=(), on_token=seen.append)
    assert seen == result.token_ids
    assert result.time_to_first_token > 0


def test_engine_refuses_bad_token_ids_and_context_overflow(engine):
    engine.reset()
    with pytest.raises(ValueError, match="token ids must lie in"):
        engine.forward([1, 2, engine.spec.vocab_size])
    with pytest.raises(ValueError, match="at least one token"):
        engine.forward([])
    with pytest.raises(ValueError, match="exceeds max_context 256"):
        engine.forward(np.ones(257, np.int64))
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(engine, PROMPT, 0)


def test_generate_checks_everything_before_the_first_launch(engine):
    """Up front, not after a prefill or halfway through decoding."""
    launched = []
    original = engine._launch
    engine._launch = lambda ids, *args: launched.append(ids) or original(ids, *args)
    try:
        with pytest.raises(ValueError, match="at least one token id"):
            generate(engine, [], 4)
        with pytest.raises(ValueError, match=r"token ids must lie in \[0, "):
            generate(engine, [3, -1], 4)
        with pytest.raises(ValueError, match="need 257 positions, more than max_context=256"):
            generate(engine, PROMPT, 256 - len(PROMPT) + 2)
        assert not launched
        assert len(generate(engine, PROMPT, 256 - len(PROMPT) + 1, eos_ids=()).token_ids) == 256 - len(PROMPT) + 1
    finally:
        del engine._launch


def test_buckets_are_validated():
    with pytest.raises(ValueError, match="multiple"):
        Buckets((16, 100))
    with pytest.raises(ValueError, match="sorted"):
        Buckets((64, 16))
    assert Buckets((16, 64)).pick(70) == 64 and Buckets((16, 64)).pick(5) == 16 and Buckets().pick(1) == 1
