"""Device memory kept apart from the host (`device=cpu_apart`): the card's code path, run on the CPU.

In the `apart` memory model (`offload.device`) every device tensor is MindSpore's own copy, expert
blocks reach their slots through host staging and the slot-write graph, and launches read the pool by
slot index. It must never change a result: an FP32 artifact under a budget of a few slots gives
transformers' greedy tokens with every policy, prefetch on and off, host compute on and off; every
storage dtype gives exactly the tokens and logits of the same artifact in `shared`. And no graph may
read a host buffer in place: with the staging buffers overwritten with garbage after each copy and the
artifact's files overwritten with garbage once the engine holds its copies, the tokens do not change
(while in `shared`, which reads the files in place, they do: the check can fail).
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from checkpoints import TinyShape, load_oracle, write_checkpoint
from artifact.manifest import TierRecord
from convert.pipeline import ConvertOptions, convert
from offload.device import DeviceMemory
from offload.residence import Residence
from runtime.build import engine_from_artifact
from runtime.generate import generate

SHAPE = TinyShape()  # 4 layers x 8 experts, top-2
TOTAL = SHAPE.layers * SHAPE.experts
TIERS = (TierRecord(1, 1), TierRecord(2, 3))  # busy experts split over several launches
PROMPT = 20  # one 16-token launch, one of 4 (padded), then decode
DECODE = 8
HOST = {"host_layers": [1], "host_experts": [[2, 3], [0, 5]]}  # host compute: a layer and two experts


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_checkpoint(SHAPE, tmp_path_factory.mktemp("apart"))


@pytest.fixture(scope="module")
def artifact(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("artifacts")
    made = {}

    def get(dtype: str):
        if dtype not in made:
            made[dtype] = root / dtype
            convert(model_dir, made[dtype], ConvertOptions(dtype, TIERS, (16,), 64), progress=False)
        return made[dtype]

    return get


def prompt() -> np.ndarray:
    return np.random.default_rng(7).integers(2, SHAPE.vocab, PROMPT)


def run(engine):
    """Greedy tokens, and the logits of every prompt position and decode step."""
    engine.reset()
    logits = [engine.forward(prompt(), all_logits=True)]  # [PROMPT, V]
    tokens = []
    for _ in range(DECODE):
        tokens.append(int(np.argmax(logits[-1][-1])))
        logits.append(engine.forward([tokens[-1]])[None])  # [1, V]
    return tokens, np.concatenate(logits)


def engine(path, memory, slots=None, policy="lru", prefetch=False, host=False, **kwargs):
    residence = None if slots is None else Residence(slots, TOTAL, policy, prefetch, HOST if host else {})
    return engine_from_artifact(path, residence, memory=memory, **kwargs)


def warm_run(path, memory, **kwargs):
    """A run after a warm-up run in the same process (MindSpore's first launches may split their work
    differently, see tests/test_offload.py), its engine closed."""
    built = engine(path, memory, **kwargs)
    try:
        run(built)
        return run(built), built
    finally:
        built.close()


@pytest.fixture(scope="module")
def expected_tokens(model_dir):
    with torch.no_grad():
        return load_oracle(model_dir).generate(
            torch.tensor(prompt())[None], max_new_tokens=24, do_sample=False, min_new_tokens=24, eos_token_id=None,
            pad_token_id=0)[0, PROMPT:].tolist()


@pytest.mark.parametrize("host", [False, True], ids=["device", "host"])
@pytest.mark.parametrize("prefetch", [False, True], ids=["demand", "prefetch"])
@pytest.mark.parametrize("policy", ["lru", "lfu", "decay"])
def test_few_slots_apart_give_transformers_greedy_tokens(artifact, expected_tokens, policy, prefetch, host):
    """FP32 artifact, 3 slots (the widest launch), tiers that split: transformers' own 24 greedy tokens."""
    built = engine(artifact("fp32"), "apart", 3, policy, prefetch, host)
    try:
        assert generate(built, prompt(), max_new_tokens=24, eos_ids=()).token_ids == expected_tokens
        built.dispatcher.weights.check_invariants()
    finally:
        built.close()
    stats = built.dispatcher.stats.total()
    assert stats.misses > 3 * SHAPE.layers // 2  # it really streamed
    assert (stats.host_experts > 0) == host


CASES = [(dtype, *case) for dtype in ("fp32", "fp16", "int8") for case in (
    (None, "lru", False, False),  # every expert resident
    (3, "lru", False, False),
    (3, "decay", True, False),
    (4, "lfu", True, True),
    (12, "lru", False, True),
)]


@pytest.mark.parametrize("dtype,slots,policy,prefetch,host", CASES,
                         ids=[f"{d}-{'resident' if s is None else f'{s}slots'}-{p}-{'prefetch' if f else 'demand'}-"
                              f"{'host' if h else 'device'}" for d, s, p, f, h in CASES])
def test_apart_equals_shared_exactly(artifact, dtype, slots, policy, prefetch, host):
    """The same artifact and placement in both memory models: the same tokens, the same logits bit for bit,
    the same expert-block traffic."""
    path = artifact(dtype)
    (shared_tokens, shared_logits), shared = warm_run(path, "shared", slots=slots, policy=policy,
                                                      prefetch=prefetch, host=host)
    (apart_tokens, apart_logits), apart = warm_run(path, "apart", slots=slots, policy=policy,
                                                   prefetch=prefetch, host=host)
    assert apart_tokens == shared_tokens
    assert np.array_equal(apart_logits, shared_logits), f"max |diff| {np.abs(apart_logits - shared_logits).max():.2e}"
    if slots is not None and not prefetch:  # with prefetch, what arrives in time depends on the threads
        assert apart.dispatcher.stats.total().bytes_streamed == shared.dispatcher.stats.total().bytes_streamed
    assert apart.device.loaded_bytes == shared.device.loaded_bytes > 0


def garble(path) -> None:
    """Overwrite a file with garbage in place: every page a mapping of it shows changes too."""
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.write(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # prefetch guesses from the garbled routers on the host
@pytest.mark.parametrize("slots", [None, 3], ids=["resident", "3slots-prefetch"])
def test_apart_reads_no_host_buffer_in_place(artifact, tmp_path, slots):
    """`apart` with every staging buffer garbled once its copy is made, and, once the engine is built and
    warm, the dense weights file garbled (and, resident, the expert store: its blocks were copied at
    start; a streaming run keeps reading blocks from it). The tokens and logits do not change."""
    copy = tmp_path / "artifact"
    shutil.copytree(artifact("fp32"), copy)
    residence = None if slots is None else Residence(slots, TOTAL, "lru", True)
    built = engine_from_artifact(copy, residence, device=DeviceMemory("apart", poison=True))
    try:
        run(built)
        want_tokens, want_logits = run(built)
        garble(copy / "dense.safetensors")
        if slots is None:
            garble(copy / "experts.bin")
        tokens, logits = run(built)
    finally:
        built.close()
    assert tokens == want_tokens
    assert np.array_equal(logits, want_logits)


def test_shared_reads_the_files_in_place(artifact, tmp_path):
    """The check above can fail: in `shared` the graphs read the mapped dense weights in place, so
    garbling the file changes the logits."""
    copy = tmp_path / "artifact"
    shutil.copytree(artifact("fp32"), copy)
    built = engine_from_artifact(copy, None, memory="shared")
    try:
        run(built)
        _, want_logits = run(built)
        garble(copy / "dense.safetensors")
        _, logits = run(built)
    finally:
        built.close()
    assert not np.array_equal(logits, want_logits)


def test_the_config_knows_the_memory_models_device_memory_has():
    """app.plan names the memory models without loading MindSpore; they are offload.device's."""
    from app.plan import MEMORY_MODELS
    from offload.device import MODELS

    assert MEMORY_MODELS == MODELS
