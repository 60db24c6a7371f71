"""The ledger of crossings: what a decode token moves between host and device memory, by formula.

`offload.crossings.decode_crossings` writes it from the model's shape and the tiers alone; what the
engine counts as it runs must match it byte for byte and transfer for transfer, resident and
streamed (where each missed expert adds one block copy), at any context length.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from checkpoints import TinyShape, write_checkpoint
from artifact.manifest import TierRecord
from artifact.reader import Artifact
from convert.pipeline import ConvertOptions, convert
from offload.crossings import H2D, decode_crossings, decode_launch_count
from offload.device import MODELS, DeviceMemory
from offload.residence import Residence
from runtime.build import engine_from_artifact

S = 64  # max_context of the artifact
PROMPT = [3, 9, 27, 81, 5]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    model_dir = write_checkpoint(TinyShape(), tmp_path_factory.mktemp("ckpt"))
    out = tmp_path_factory.mktemp("art") / "a"
    convert(model_dir, out, ConvertOptions("fp32", (TierRecord(1, 2), TierRecord(4, 2)), (16,), S), progress=False)
    return out


def one_decode_token(engine):
    engine.reset()
    engine.forward(PROMPT)
    engine.dispatcher.crossings.reset()
    engine.dispatcher.stats.reset()
    engine.forward([7])
    return engine.dispatcher.crossings


@pytest.mark.parametrize("memory", MODELS)
@pytest.mark.parametrize("slots", [None, 4])
def test_a_decode_token_crosses_what_the_formula_says(artifact, slots, memory, monkeypatch):
    """In both memory models; in `apart` the expert-block bytes are also summed where the slot-write graph
    takes the staged blocks, independently of the ledger, and must equal what the ledger counted."""
    spec = Artifact.open(artifact).spec
    residence = None if slots is None else Residence(slots, spec.num_layers * spec.num_experts, "lru")
    written = []
    write_slots = DeviceMemory.write_slots
    monkeypatch.setattr(DeviceMemory, "write_slots", lambda self, slots, pool, blocks: (
        written.append(sum(b.nbytes for b in blocks)), write_slots(self, slots, pool, blocks)))
    engine = engine_from_artifact(artifact, residence, memory=memory)
    reset = engine.dispatcher.crossings.reset
    monkeypatch.setattr(engine.dispatcher.crossings, "reset", lambda: (written.clear(), reset()))  # with the ledger
    try:
        crossings = one_decode_token(engine)
        stats = engine.dispatcher.stats.total()
        tiers = engine.dispatcher.tiers
    finally:
        engine.close()
    if memory == "apart":
        assert sum(written) == crossings.to_dict()["decode"]["kinds"].get("expert block", {}).get("bytes", 0)
        assert len(written) == stats.misses
    else:
        assert written == []  # shared: blocks are read straight into their slots
    expected = decode_crossings(spec, tiers)
    if slots is not None:  # every miss copies one block into its slot
        block = Artifact.open(artifact).manifest.experts.block_bytes
        expected["expert block"] = (H2D, stats.misses, stats.misses * block)
        assert stats.misses > 0
    ledger = crossings.to_dict()
    assert ledger["decode"]["tokens"] == 1
    assert ledger["decode"]["launches"] == 1 + spec.num_layers + sum(stats.launches) + 1  # embedding, layers, experts, head
    assert ledger["decode"]["launches"] == decode_launch_count(spec, tiers)
    found = {kind: (t["direction"], t["transfers"], t["bytes"]) for kind, t in ledger["decode"]["kinds"].items()}
    assert found == expected
    beyond_blocks = sum(b for kind, (_, _, b) in expected.items() if kind != "expert block")
    assert crossings.per_token("decode") == beyond_blocks + expected.get("expert block", (0, 0, 0))[2]


def test_shared_and_apart_count_the_same_crossings(artifact):
    """The two memory models move the same bytes, prefill and decode, streamed experts included."""
    spec = Artifact.open(artifact).spec
    ledgers = []
    for memory in MODELS:
        engine = engine_from_artifact(artifact, Residence(4, spec.num_layers * spec.num_experts, "lru"), memory=memory)
        try:
            engine.forward(PROMPT)
            engine.forward([7])
            engine.forward([8])
            ledgers.append(engine.dispatcher.crossings.to_dict())
        finally:
            engine.close()
    assert ledgers[0]["decode"]["kinds"]["expert block"]["transfers"] > 0
    assert ledgers[0] == ledgers[1]


def test_prefill_tokens_and_phases_are_counted_apart(artifact):
    engine = engine_from_artifact(artifact)
    try:
        engine.forward(PROMPT)
        engine.forward([7])
        engine.forward([8])
        ledger = engine.dispatcher.crossings.to_dict()
    finally:
        engine.close()
    assert (ledger["prefill"]["tokens"], ledger["decode"]["tokens"]) == (len(PROMPT), 2)
    assert ledger["prefill"]["kinds"]["token ids"]["bytes"] == 16 * 4  # one launch of the 16-token bucket
    assert ledger["decode"]["kinds"]["logits"]["transfers"] == 2


def test_a_decode_token_crosses_the_same_bytes_at_any_context_length(artifact):
    engine = engine_from_artifact(artifact)
    try:
        ledgers = []
        for length in (2, 40, S - 1):
            engine.reset()
            engine.forward(list(range(3, 3 + length)))
            engine.dispatcher.crossings.reset()
            engine.forward([7])
            ledgers.append(engine.dispatcher.crossings.to_dict()["decode"])
    finally:
        engine.close()
    assert ledgers[0] == ledgers[1] == ledgers[2]


def test_a_new_sequence_counts_its_state_reset_with_prefill(artifact):
    engine = engine_from_artifact(artifact)
    try:
        engine.forward(PROMPT)
        engine.forward([7])
        engine.dispatcher.crossings.reset()
        engine.reset()  # after a decode step
        engine.forward(PROMPT)
        engine.forward([7])
        ledger = engine.dispatcher.crossings.to_dict()
    finally:
        engine.close()
    spec = engine.spec
    deltanet = spec.layer_types.count("linear_attention")
    state = 4 * ((spec.linear_conv_kernel_dim - 1) * spec.conv_dim
                 + spec.linear_num_value_heads * spec.linear_key_head_dim * spec.linear_value_head_dim)
    assert ledger["prefill"]["kinds"]["state reset"] == {"direction": H2D, "transfers": 2 * deltanet,
                                                        "bytes": deltanet * state}
    assert "state reset" not in ledger["decode"]["kinds"]


def test_greedy_generation_reads_back_the_chosen_id_only(artifact):
    """`generate` at temperature 0 takes the head's on-device choice: 4 bytes instead of V x 4, and the
    same tokens as the argmax of the logits."""
    from runtime.generate import generate

    engine = engine_from_artifact(artifact)
    try:
        by_logits = []
        engine.reset()
        logits = engine.forward(PROMPT)
        for _ in range(6):
            by_logits.append(int(logits.argmax()))
            logits = engine.forward([by_logits[-1]])
        engine.dispatcher.crossings.reset()
        engine.dispatcher.stats.reset()
        result = generate(engine, PROMPT, 6, eos_ids=())
        ledger = engine.dispatcher.crossings
        tiers = engine.dispatcher.tiers
    finally:
        engine.close()
    assert result.token_ids == by_logits
    decode = {kind: (t.direction, t.transfers, t.bytes) for kind, t in ledger.kinds["decode"].items()}
    one = decode_crossings(engine.spec, tiers, greedy=True)
    assert decode == {kind: (d, n * 5, b * 5) for kind, (d, n, b) in one.items()}  # 5 decode steps


def test_a_qwen36_decode_token_crosses_under_64_kib_beyond_expert_blocks():
    """The target of the NPU-shaped step, by the formula the tests above hold the engine to: Qwen3.6's
    40 layers with the default tiers, greedy."""
    from omegaconf import OmegaConf

    from model.spec import spec_from_config
    from offload.tiers import from_config

    conf = Path(__file__).resolve().parents[1] / "conf"
    model = OmegaConf.to_container(OmegaConf.load(conf / "model" / "qwen36_35b.yaml"), resolve=True)
    spec = spec_from_config(model["config"], conf / "model" / "qwen36_35b.yaml")
    tiers = OmegaConf.to_container(OmegaConf.load(conf / "tiers" / "default.yaml"), resolve=True)["tiers"]
    kinds = decode_crossings(spec, from_config(tiers, default_group=spec.num_experts_per_tok), greedy=True)
    assert spec.num_layers == 40 and spec.hidden_size == 2048
    assert sum(nbytes for _, _, nbytes in kinds.values()) < 64 * 1024
