"""A long streamed run: 2,000 decode tokens through a pool of 4 slots with prefetch on a tiny model.

Memory stays flat after the warm-up (no leak per token), the counters add up, and every token is the
resident run's.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from artifact.manifest import TierRecord
from checkpoints import TinyShape, write_checkpoint
from convert.pipeline import ConvertOptions, convert
from offload.residence import Residence
from runtime.build import engine_from_artifact
from runtime.generate import generate

SHAPE = TinyShape()  # 4 layers x 8 experts, top-2
TOKENS = 2000
PROMPT = list(range(3, 23))  # 20 tokens: a 16-token launch and a padded one


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


@pytest.mark.slow
def test_two_thousand_streamed_tokens_leak_nothing_and_equal_resident(tmp_path):
    model_dir = write_checkpoint(SHAPE, tmp_path / "ckpt")
    artifact = tmp_path / "art"
    convert(model_dir, artifact, ConvertOptions("fp32", (TierRecord(1, 2), TierRecord(8, 4)), (16,), TOKENS + 32),
            progress=False)
    total = SHAPE.layers * SHAPE.experts
    engine = engine_from_artifact(artifact, Residence(4, total, "lru", prefetch=True))
    generate(engine, PROMPT, 8, eos_ids=())  # warm-up: graphs compiled, slots and buffers allocated
    engine.dispatcher.stats.reset()
    tokens, rss = [], []

    def sample(token: int) -> None:  # resident set size every 200 tokens
        tokens.append(token)
        if len(tokens) % 200 == 0:
            rss.append(rss_bytes())

    streamed = generate(engine, PROMPT, TOKENS, eos_ids=(), on_token=sample)
    stats = engine.dispatcher.stats
    block = engine.dispatcher.weights.store.block_bytes  # the slot pool's store: one copy moves one block
    engine.close()
    assert len(rss) == TOKENS // 200
    growth = max(rss) - rss[0]
    assert growth < 8 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over {TOKENS} tokens: {rss}"

    total_counts = stats.total()
    rows = (len(PROMPT) + TOKENS - 1) * SHAPE.top_k
    assert sum(total_counts.tokens) == rows * SHAPE.layers  # every routed row carried once, none dropped
    assert stats.step_tokens == len(PROMPT) + TOKENS - 1
    assert total_counts.misses > 0 and total_counts.prefetch_issued > 0  # it did stream, and prefetch
    assert total_counts.prefetch_hits + total_counts.prefetch_wasted <= total_counts.prefetch_issued
    assert total_counts.bytes_streamed == (total_counts.misses + total_counts.prefetch_issued) * block

    resident = engine_from_artifact(artifact)
    try:
        assert generate(resident, PROMPT, TOKENS, eos_ids=()).token_ids == streamed.token_ids
    finally:
        resident.close()
