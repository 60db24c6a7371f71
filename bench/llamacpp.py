"""llama.cpp on the same checkpoint: the CPU engine a user would otherwise deploy, for the decode and
prefill benches' side-by-side rows.

Two pieces, both from the `llama-cpp-python` 0.3.36 source distribution on PyPI (llama.cpp with
the `qwen35moe` architecture vendored inside):

- the runtime: its Python bindings, compiled from source, CPU only, by `pip install -e '.[bench]'`
  (about 10 minutes on 2 cores; pip keeps the built wheel in its cache). Without them the benches
  print why and leave llama.cpp's rows out.
- the converter: the vendored `convert_hf_to_gguf.py` writes one GGUF per format into the bench
  cache, once. It needs a tokenizer beside the weights (a checkpoint without one borrows the demo
  model's; the bench feeds token ids, so the vocabulary's text never matters) and names the
  pre-tokenizer from a hash of known tokenizers, so it is told `qwen35`; `--no-mtp` because these
  checkpoints have no multi-token-prediction layers.

Ferry's storage dtypes meet llama.cpp's formats as the issue pairs them: fp32 with F32, fp16 with
BF16, int8 with Q8_0 (32-value blocks with an FP16 scale; Ferry's int8 has one scale per row).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench.realwidth import CACHE  # noqa: E402

VERSION = "0.3.36"
FORMATS = {"fp32": "f32", "fp16": "bf16", "int8": "q8_0"}
DEMO_TOKENIZER = Path(__file__).resolve().parents[1] / "models" / "ferry-demo"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def missing() -> str | None:
    """Why llama.cpp cannot run here, or None when it can."""
    try:
        import llama_cpp
    except ImportError:
        return ("llama.cpp left out: its Python bindings are not installed (pip install -e '.[bench]' "
                "compiles them, about 10 minutes; needs a C++ compiler and cmake)")
    if llama_cpp.__version__ != VERSION:
        return f"llama.cpp left out: llama-cpp-python {llama_cpp.__version__} installed, the bench pins {VERSION}"
    return None


def source() -> Path:
    """The vendored llama.cpp tree of the source distribution, downloaded from PyPI and unpacked once."""
    tree = CACHE / "llama.cpp" / f"llama_cpp_python-{VERSION}"
    vendored = tree / "vendor" / "llama.cpp"
    if (vendored / "convert_hf_to_gguf.py").is_file():
        return vendored
    tree.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=tree.parent) as scratch:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                        f"llama-cpp-python=={VERSION}", "-d", scratch], check=True, capture_output=True)
        with tarfile.open(next(Path(scratch).glob("*.tar.gz"))) as archive:
            archive.extractall(scratch, filter="data")
        shutil.rmtree(tree, ignore_errors=True)
        os.replace(Path(scratch) / tree.name, tree)
    return vendored


def gguf(checkpoint: Path, dtype: str) -> Path:
    """The checkpoint as a GGUF in the format paired with Ferry's `dtype`, converted once into the cache."""
    out = CACHE / "gguf" / f"{checkpoint.name}-{FORMATS[dtype]}.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    converter = source() / "convert_hf_to_gguf.py"
    with tempfile.TemporaryDirectory(dir=out.parent) as scratch:
        staged = Path(scratch) / "model"  # the checkpoint's files linked, plus a tokenizer when it has none
        staged.mkdir()
        for file in checkpoint.iterdir():
            (staged / file.name).symlink_to(file.resolve())
        if not (staged / "tokenizer.json").exists():
            for name in TOKENIZER_FILES:
                shutil.copy(DEMO_TOKENIZER / name, staged / name)
        partial = Path(scratch) / out.name
        done = subprocess.run([sys.executable, __file__, str(converter), str(staged), "--outtype", FORMATS[dtype],
                               "--outfile", str(partial), "--no-mtp"], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"convert_hf_to_gguf.py failed on {checkpoint}:\n{done.stderr[-4000:]}")
        os.replace(partial, out)
    return out


def bytes_per_token(path: Path, spec, context: int) -> int:
    """Bytes a llama.cpp decode step reads, from the GGUF's own tensor sizes: every tensor but the
    embedding table and the routed experts, one embedding row, top-k of each layer's experts, and
    its FP16 KV cache of the attention layers up to `context`."""
    sys.path.insert(0, str(source() / "gguf-py"))
    from gguf import GGUFReader

    read = 0
    for tensor in GGUFReader(path).tensors:
        if tensor.name == "token_embd.weight":
            read += tensor.n_bytes // spec.vocab_size
        elif "_exps." in tensor.name:
            read += tensor.n_bytes * spec.num_experts_per_tok // spec.num_experts
        else:
            read += int(tensor.n_bytes)
    attention_layers = spec.layer_types.count("full_attention")
    return read + attention_layers * 2 * context * spec.num_key_value_heads * spec.head_dim * 2


def worker(path: Path, prompt: list[int], tokens: int, threads: int) -> dict:
    """Greedy decode as the Ferry and transformers workers do: prefill the prompt, then `tokens - 1`
    single-token steps, argmax of llama.cpp's last logits each time; a warm-up pass first.
    Returns the ids, decode ms per token and prefill seconds."""
    import llama_cpp

    model = llama_cpp.Llama(model_path=str(path), n_ctx=len(prompt) + tokens + 16, n_threads=threads,
                            n_threads_batch=threads, verbose=False)
    vocab = model.n_vocab()

    def greedy() -> int:
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(model.ctx, -1), shape=(vocab,))
        return int(np.argmax(logits))

    def decode() -> tuple[list[int], float, float]:
        model.reset()
        start = time.perf_counter()
        model.eval(prompt)
        ids = [greedy()]
        prefilled = time.perf_counter()
        for _ in range(tokens - 1):
            model.eval([ids[-1]])
            ids.append(greedy())
        return ids, prefilled - start, time.perf_counter() - prefilled

    decode()
    ids, prefill, seconds = decode()
    model.close()
    return {"ids": ids, "prefill_s": prefill, "ms_per_token": seconds / max(tokens - 1, 1) * 1e3}


def convert_main(argv: list[str]) -> None:
    """Run the vendored converter with the pre-tokenizer named (see the module docstring)."""
    converter = Path(argv[0])
    sys.path[:0] = [str(converter.parent), str(converter.parent / "gguf-py")]
    import convert_hf_to_gguf
    from conversion.base import TextModel

    TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen35"
    sys.argv = [str(converter), *argv[1:]]
    convert_hf_to_gguf.main()


if __name__ == "__main__":
    convert_main(sys.argv[1:])
