"""The built-in demo model: the Qwen3.5-MoE architecture at toy size, as a real HF checkpoint.

`python run.py` with no model chosen runs it. Its weights are random (seeded), so it writes
gibberish; what it shows is the whole path a real checkpoint takes: `config.json`, safetensors
shards under the names of `model.names` (BF16, like the real one), `tokenizer.json` (a byte-level
BPE trained here on `demo_corpus.txt`), `tokenizer_config.json` with a minimal ChatML template and
`generation_config.json` with the EOS ids, all read by the same code as Qwen3.6-35B-A3B.

The directory is built once into a cache, named by a hash of everything that shapes it (the text
config, the seed, the corpus, this module's format version), so changing any of them builds a new
one beside the old. It is written into a temporary directory and renamed into place: an interrupted
build leaves nothing that looks finished, and concurrent builds (the jobs of a sweep) cannot mix.
From there it is an HF directory like any other: `run.py` converts it on first use
(`convert.cache`) and runs the artifact.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping

from model.spec import ModelSpec, spec_from_config
from model.synthetic import write_random_checkpoint

FORMAT = 2  # bump when the files written here change, so caches of the old format are not reused
CORPUS = Path(__file__).with_name("demo_corpus.txt")
END_OF_TEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (END_OF_TEXT, IM_START, IM_END)  # ids 0, 1, 2
# ChatML, the format of Qwen's own template, without tools or thinking blocks.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class DemoModel:
    path: Path
    built_now: bool
    seconds: float


def demo_key(text_config: Mapping, seed: int) -> str:
    """Hash of everything the demo directory is made from."""
    recipe = json.dumps({"format": FORMAT, "config": dict(text_config), "seed": seed}, sort_keys=True)
    return hashlib.sha256(recipe.encode() + CORPUS.read_bytes()).hexdigest()[:12]


def train_tokenizer(vocab_size: int):
    """Byte-level BPE (the kind Qwen uses) learnt from the corpus; deterministic for a given corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(CORPUS.read_text().splitlines(), trainer)
    return tokenizer


def demo_spec(text_config: Mapping) -> ModelSpec:
    """The demo's ModelSpec, validated like any checkpoint's config; EOS is the tokenizer's <|im_end|>
    and <|endoftext|> (ids 2 and 0)."""
    config = {"model_type": "qwen3_5_moe_text", **dict(text_config)}
    spec = spec_from_config(config, Path("conf/model/demo.yaml"))
    return replace(spec, eos_token_ids=(2, 0))


def _write_tokenizer_files(model_dir: Path, vocab_size: int, spec: ModelSpec) -> None:
    tokenizer = train_tokenizer(vocab_size)
    if tokenizer.get_vocab_size() > vocab_size:
        raise ValueError(f"demo tokenizer has {tokenizer.get_vocab_size()} tokens, more than vocab_size {vocab_size}")
    if [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] != [0, 1, 2]:
        raise ValueError("demo tokenizer: special tokens did not get ids 0, 1, 2")
    tokenizer.save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None, "eos_token": IM_END, "pad_token": END_OF_TEXT,
        "model_max_length": 4096, "chat_template": CHAT_TEMPLATE,
    }, indent=1))
    (model_dir / "generation_config.json").write_text(json.dumps({
        "eos_token_id": list(spec.eos_token_ids), "do_sample": False,
    }, indent=1))


def ensure_demo(text_config: Mapping, seed: int, cache_dir: str | Path) -> DemoModel:
    """The demo checkpoint directory, built now if the cache does not hold it yet."""
    start = time.perf_counter()
    cache_dir = Path(cache_dir).expanduser()
    final = cache_dir / f"demo-{demo_key(text_config, seed)}"
    if (final / "config.json").is_file():
        return DemoModel(final, False, time.perf_counter() - start)
    spec = demo_spec(text_config)
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".demo-build-", dir=cache_dir))
    try:
        model_dir = write_random_checkpoint(spec, staging / "demo", dtype="BF16", seed=seed)
        _write_tokenizer_files(model_dir, spec.vocab_size, spec)
        try:
            model_dir.rename(final)
        except OSError:
            if not (final / "config.json").is_file():  # not a concurrent build that finished first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return DemoModel(final, True, time.perf_counter() - start)
