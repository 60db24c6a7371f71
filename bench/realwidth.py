"""The benchmark checkpoint: Qwen3.6-35B-A3B's real layer widths with fewer layers and a small vocab.

Hidden 2048, 16/2 attention heads of 256, DeltaNet 16/32 heads of 128, 256 experts of
3 x 512 x 2048 plus the shared expert; 4 layers (3 DeltaNet + 1 full attention) and a vocabulary
of 8192, BF16 storage. Built once with random weights (routing spread by a scaled router) and
cached outside the repository: `python -m bench.realwidth` prints its path.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from model.spec import ModelSpec
from model.synthetic import write_random_checkpoint

CACHE = Path(os.environ.get("FERRY_BENCH_CACHE", Path.home() / ".cache" / "ferry" / "bench"))


def real_width_spec(layers: int = 4, vocab: int = 8192) -> ModelSpec:
    return ModelSpec(
        vocab_size=vocab, hidden_size=2048, num_layers=layers,
        layer_types=tuple("full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(layers)),
        rms_norm_eps=1e-6, tie_word_embeddings=False,
        num_attention_heads=16, num_key_value_heads=2, head_dim=256, rotary_dim=64, rope_theta=1e7,
        linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128, linear_value_head_dim=128,
        linear_conv_kernel_dim=4, num_experts=256, num_experts_per_tok=8, moe_intermediate_size=512,
        shared_expert_intermediate_size=512, eos_token_ids=(),
    )


def real_width_checkpoint(layers: int = 4, vocab: int = 8192) -> Path:
    """Path of the cached checkpoint, written on first use (several GB, about a minute)."""
    path = CACHE / f"realwidth-{layers}l-v{vocab}-bf16"
    if not path.exists():
        write_random_checkpoint(real_width_spec(layers, vocab), path, dtype="BF16", seed=0)
    return path


PREFILL_BUCKETS = (64, 256, 1024)
MAX_CONTEXT = 1040  # a 1024-token prompt and its first token, or a short prompt and many decoded


def bench_artifact(model_dir: Path, dtype: str, max_context: int = MAX_CONTEXT) -> Path:
    """`model_dir` converted (`python -m convert`'s pipeline, through run.py's cache) with default
    tiers (1x8, 8x4, 64x2), the prefill and decode benches' buckets, `max_context` (the KV cache's
    rows, which an attention launch reads whole) and `dtype` experts, cached in the bench cache."""
    from convert.cache import cached_artifact
    from artifact.manifest import TierRecord
    from convert.pipeline import ConvertOptions

    options = ConvertOptions(dtype, (TierRecord(1, 8), TierRecord(8, 4), TierRecord(64, 2)), PREFILL_BUCKETS,
                             max_context)
    return cached_artifact(model_dir, CACHE / "artifacts", options, progress=False,
                           say=lambda text: print(text, file=sys.stderr)).path


def real_width_artifact(dtype: str, layers: int = 4, vocab: int = 8192, max_context: int = MAX_CONTEXT) -> Path:
    return bench_artifact(real_width_checkpoint(layers, vocab), dtype, max_context)


if __name__ == "__main__":
    print(real_width_checkpoint())
