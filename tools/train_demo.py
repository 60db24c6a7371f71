#!/usr/bin/env python
"""Train the Ferry demo model: a small Qwen3.5-MoE, from scratch, on a 2-core CPU.

The model is `transformers.Qwen3_5MoeForCausalLM` (8 layers, 3 Gated DeltaNet : 1 gated attention,
64 routed experts top-8 plus a shared expert, hidden 128, vocab 4096), trained on Python's own
documentation (reStructuredText sources from Debian's python3-doc) and standard library sources.
Everything it needs is local: no downloads, no pretrained weights.

    python tools/train_demo.py                               # ~55 min budget, resumes from --work
    python tools/train_demo.py --minutes 2 --work /tmp/train-smoke --out /tmp/train-smoke/out   # a smoke run
    python tools/train_demo.py --bench-experts 20            # time each experts implementation, exit

What it writes to --out: config.json, model.safetensors (BF16), generation_config.json,
tokenizer.json, tokenizer_config.json (ChatML template), heldout.txt (text it never saw),
loss_curve.png, DATA.md and TRAINING.md. To --work: the data cache, checkpoints (latest.pt,
written atomically every --ckpt-minutes), log.jsonl and the experts benchmark.

Deterministic: seeded torch/numpy/random, a fixed data order (a seeded permutation of the 256-token
chunks per epoch) and a step-indexed LR schedule. Resuming restores the model, optimizer, RNG states,
data position, step and the time already spent, so a killed run continues where its checkpoint was.
"""
from __future__ import annotations

import argparse
import copy
import glob
import hashlib
import json
import math
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub kernels, no downloads: the reference PyTorch paths
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

import numpy as np  # noqa: E402
import torch  # noqa: E402

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
CHAT_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] "
    "+ '<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)
EOT = 0
HELDOUT_EVERY = 50  # every 50th file (by sorted path, per source) is held out: ~2%
EXPERT_IMPLS = ("grouped_mm", "eager", "batched_mm")
SAMPLE_PROMPTS = ["The ferry", "def read_config(path):", "The module provides"]

# ---- data ------------------------------------------------------------------------------------------

DOCS_LICENCE = "PSF License Agreement (Python Software Foundation License v2); /usr/share/doc/python3-doc/copyright"
CODE_LICENCE = ("PSF License Agreement (Python Software Foundation License v2); "
                "/usr/share/doc/libpython3.11-stdlib/copyright")
EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "pydoc_data"}


def _docs_files() -> list[Path]:
    seen, files = set(), []
    for path in glob.glob("/usr/share/doc/python3*/html/_sources/**/*.rst.txt", recursive=True):
        real = os.path.realpath(path)
        if real not in seen:
            seen.add(real)
            files.append(Path(real))
    return sorted(files)


def _code_files() -> list[Path]:
    roots = sorted(p for p in glob.glob("/usr/lib/python3.*") if os.path.isdir(p) and re.fullmatch(r"python3\.\d+", Path(p).name))
    files = []
    for root in roots:
        for path in glob.glob(f"{root}/**/*.py", recursive=True):
            parts = set(Path(path).relative_to(root).parts[:-1])
            real = os.path.realpath(path)
            if not parts & EXCLUDED_DIRS and real.startswith(root + "/"):  # not Debian's /etc symlinks
                files.append(Path(real))
    return sorted(set(files))


def collect_sources() -> list[dict]:
    """Both corpora, each sorted by path, every HELDOUT_EVERY-th file held out (index % 50 == 0)."""
    sources = []
    for name, kind, files, licence, pattern in [
        ("python3-doc reStructuredText sources", "prose", _docs_files(), DOCS_LICENCE,
         "/usr/share/doc/python3*/html/_sources/**/*.rst.txt"),
        ("Python standard library sources", "code", _code_files(), CODE_LICENCE,
         "/usr/lib/python3.*/**/*.py (no test/, tests/, idle_test/, site-packages/, dist-packages/, pydoc_data/)"),
    ]:
        docs = []
        skipped = 0
        for i, path in enumerate(files):
            try:
                text = path.read_bytes().decode("utf-8")
            except UnicodeDecodeError:
                skipped += 1
                continue
            text = text.replace("\r\n", "\n")
            if not text.strip():
                continue
            docs.append({"path": str(path), "text": text, "heldout": i % HELDOUT_EVERY == 0})
        sources.append({"name": name, "kind": kind, "licence": licence, "pattern": pattern,
                        "docs": docs, "skipped_non_utf8": skipped})
    return sources


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer, length=len(texts))
    assert [tok.token_to_id(t) for t in SPECIALS] == [0, 1, 2]
    return tok


def encode_join(tok, texts: list[str]) -> np.ndarray:
    """Documents joined with <|endoftext|> between them."""
    ids: list[int] = []
    for i, enc in enumerate(tok.encode_batch(texts)):
        if i:
            ids.append(EOT)
        ids.extend(enc.ids)
    return np.asarray(ids, dtype=np.uint16)


def prepare_data(work: Path, vocab_size: int) -> dict:
    """Collect, split, train the tokenizer, tokenize; cached in work/data (reused on resume)."""
    from tokenizers import Tokenizer

    data_dir = work / "data"
    meta_path = data_dir / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("vocab_size") == vocab_size:
            print(f"[data] reusing {data_dir}", flush=True)
            meta["tokenizer"] = Tokenizer.from_file(str(data_dir / "tokenizer.json"))
            meta["train"] = np.fromfile(data_dir / "train.bin", dtype=np.uint16)
            meta["heldout"] = np.fromfile(data_dir / "heldout.bin", dtype=np.uint16)
            return meta
    data_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    sources = collect_sources()
    train_texts = [d["text"] for s in sources for d in s["docs"] if not d["heldout"]]
    held_texts = [d["text"] for s in sources for d in s["docs"] if d["heldout"]]
    print(f"[data] {len(train_texts)} training files, {len(held_texts)} held-out files "
          f"({time.time() - t0:.1f}s); training the tokenizer", flush=True)
    tok = train_tokenizer(train_texts, vocab_size)
    print(f"[data] tokenizer trained ({time.time() - t0:.1f}s); encoding", flush=True)
    stats = []
    for s in sources:
        row = {k: s[k] for k in ("name", "kind", "licence", "pattern", "skipped_non_utf8")}
        for split, held in (("train", False), ("heldout", True)):
            docs = [d for d in s["docs"] if d["heldout"] == held]
            row[f"{split}_files"] = len(docs)
            row[f"{split}_bytes"] = sum(len(d["text"].encode("utf-8")) for d in docs)
            row[f"{split}_tokens"] = int(sum(len(e.ids) for e in tok.encode_batch([d["text"] for d in docs])))
        stats.append(row)
    train = encode_join(tok, train_texts)
    heldout = encode_join(tok, held_texts)
    train.tofile(data_dir / "train.bin")
    heldout.tofile(data_dir / "heldout.bin")
    tok.save(str(data_dir / "tokenizer.json"))
    (data_dir / "heldout.txt").write_text("\n\n".join(held_texts), encoding="utf-8")
    (data_dir / "heldout_files.txt").write_text(
        "\n".join(d["path"] for s in sources for d in s["docs"] if d["heldout"]) + "\n")
    meta = {"vocab_size": vocab_size, "sources": stats, "train_tokens": int(train.size),
            "heldout_tokens": int(heldout.size), "prep_seconds": time.time() - t0,
            "train_sha256": hashlib.sha256(train.tobytes()).hexdigest()}
    _atomic_write_text(meta_path, json.dumps(meta, indent=1))
    print(f"[data] {train.size:,} training tokens, {heldout.size:,} held-out tokens "
          f"({time.time() - t0:.1f}s)", flush=True)
    meta.update(tokenizer=tok, train=train, heldout=heldout)
    return meta


class Batches:
    """Fixed-order batches of seq_len-token chunks: a seeded permutation of all chunks per epoch."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch: int, seed: int):
        self.n_chunks = tokens.size // seq_len
        self.chunks = torch.from_numpy(tokens[: self.n_chunks * seq_len].astype(np.int64)).view(self.n_chunks, seq_len)
        self.batch, self.seed = batch, seed
        self._perm_epoch, self._perm = -1, None

    def _order(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng(self.seed * 1000 + epoch).permutation(self.n_chunks)
            self._perm_epoch = epoch
        return self._perm

    def get(self, position: int) -> torch.Tensor:
        """The batch starting at global chunk `position` (epochs roll over)."""
        idx = []
        for p in range(position, position + self.batch):
            idx.append(self._order(p // self.n_chunks)[p % self.n_chunks])
        return self.chunks[torch.as_tensor(np.asarray(idx))]


def heldout_eval_set(heldout: np.ndarray, seq_len: int, max_tokens: int) -> torch.Tensor:
    """A fixed ~max_tokens subset: evenly spaced seq_len chunks across the held-out stream (prose and code)."""
    n = heldout.size // seq_len
    chunks = heldout[: n * seq_len].astype(np.int64).reshape(n, seq_len)
    want = min(n, max(1, max_tokens // seq_len))
    pick = np.unique(np.linspace(0, n - 1, want).round().astype(int))
    return torch.from_numpy(chunks[pick])


# ---- model -----------------------------------------------------------------------------------------

def make_config(vocab_size: int):
    from transformers import Qwen3_5MoeTextConfig

    return Qwen3_5MoeTextConfig(
        vocab_size=vocab_size, hidden_size=128, num_hidden_layers=8, full_attention_interval=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        rope_parameters={"rope_type": "default", "rope_theta": 10_000_000.0, "partial_rotary_factor": 0.25},
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=32, linear_value_head_dim=32,
        linear_conv_kernel_dim=4, num_experts=64, num_experts_per_tok=8, moe_intermediate_size=64,
        shared_expert_intermediate_size=128, output_router_logits=True, router_aux_loss_coef=0.001,
        tie_word_embeddings=False, rms_norm_eps=1e-6, max_position_embeddings=2048, hidden_act="silu",
        initializer_range=0.02, bos_token_id=None, eos_token_id=EOT, pad_token_id=EOT, use_cache=False,
    )


def build_model(vocab_size: int, seed: int, experts_impl: str):
    from transformers import Qwen3_5MoeForCausalLM

    torch.manual_seed(seed)
    model = Qwen3_5MoeForCausalLM(make_config(vocab_size))
    model.set_experts_implementation(experts_impl)
    return model


def param_counts(model) -> dict:
    cfg = model.config
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    embed = model.model.embed_tokens.weight.numel()
    active = total - experts + experts * cfg.num_experts_per_tok // cfg.num_experts
    return {"total": total, "routed_experts": experts, "embedding": embed, "lm_head": model.lm_head.weight.numel(),
            "active_per_token": active, "active_per_token_non_embedding": active - embed}


@torch.no_grad()
def evaluate(model, seqs: torch.Tensor, batch: int = 16) -> float:
    """Mean next-token cross-entropy (nats) over the eval sequences (LM loss only, no aux)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, seqs.size(0), batch):
        x = seqs[i:i + batch]
        logits = model(input_ids=x, use_cache=False, output_router_logits=False).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)),
                                                 x[:, 1:].reshape(-1), reduction="sum")
        total += loss.item()
        count += x[:, 1:].numel()
    model.train(was_training)
    return total / count


def lr_at(step: int, peak: float, warmup: int, total: int, final_frac: float) -> float:
    """Linear warmup to `peak`, cosine down to `final_frac * peak` at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


class ThreadGovernor:
    """Keeps --threads intra-op threads unless other processes are using the CPU.

    On this 2-core machine other work (e.g. a test suite) can take a core; two OpenMP threads then
    wait on each other and a step gets 5-30x slower, while one thread loses only ~15%. After each step
    the governor reads how much CPU the *other* processes used (/proc/stat minus /proc/self/stat):
    above `busy` cores it switches to 1 thread, and back to `threads` after `calm_steps` steps in a row
    below `calm` cores. Thread count changes only the speed (and float summation order), never the
    data or the schedule."""

    def __init__(self, threads: int, enabled: bool, busy: float = 0.4, calm: float = 0.25, calm_steps: int = 2):
        self.target, self.current = threads, threads
        self.enabled = enabled and threads > 1 and os.path.exists("/proc/stat")
        self.busy, self.calm, self.calm_steps = busy, calm, calm_steps
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.calm_run = 0
        self.last = self._sample() if self.enabled else None
        self.others = 0.0
        torch.set_num_threads(threads)

    @staticmethod
    def _sample() -> tuple[float, int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:8]]
        busy = v[0] + v[1] + v[2] + v[5] + v[6]  # user nice system irq softirq (not idle, iowait, steal)
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return time.time(), busy, int(fields[11]) + int(fields[12])

    def update(self, allow_up: bool = True) -> str | None:
        """Called after each step, and between forward and backward (allow_up=False: only switch down)."""
        if not self.enabled:
            return None
        now = self._sample()
        wall = now[0] - self.last[0]
        if wall <= 0:
            return None
        self.others = max(0.0, ((now[1] - self.last[1]) - (now[2] - self.last[2])) / self.hz / wall)
        self.last = now
        if self.current == self.target and self.others > self.busy:
            self.current, self.calm_run = 1, 0
            torch.set_num_threads(1)
            return f"threads: other processes use {self.others:.2f} cores; using 1 thread"
        if self.current != self.target and allow_up:
            self.calm_run = self.calm_run + 1 if self.others < self.calm else 0
            if self.calm_run >= self.calm_steps:
                self.current = self.target
                torch.set_num_threads(self.target)
                return f"threads: CPU free again ({self.others:.2f} cores used by others); using {self.target}"
        return None


# ---- checkpoints and logs --------------------------------------------------------------------------

def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line cut by a kill
    return rows


# ---- experts benchmark -----------------------------------------------------------------------------

def bench_experts(args, vocab_size: int, steps: int) -> dict:
    """Time training steps (forward, backward, AdamW) for each experts implementation: same model, same
    batches. Only steps during which other processes used < 0.25 cores count (this machine is shared;
    a contended step with 2 threads is 5-30x slower and says nothing about the implementation); each
    implementation gets up to --bench-cap-seconds to collect `steps` such steps after 2 warm-up steps."""
    results = {}
    hz = os.sysconf("SC_CLK_TCK")
    for impl in EXPERT_IMPLS:
        # batched_mm materialises one (gate_up, down) weight copy per (token, expert) pair for backward,
        # ~0.75 MB per token per layer at these sizes: it gets a small batch so that it fits in memory.
        bsz = args.bench_batch if impl != "batched_mm" else min(args.bench_batch, 4)
        gen = torch.Generator().manual_seed(args.seed)
        batches = [torch.randint(0, vocab_size, (bsz, args.seq_len), generator=gen) for _ in range(3)]
        tok = bsz * args.seq_len
        model = build_model(vocab_size, args.seed, impl)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        calm, contended, t_start, i = [], [], time.time(), 0
        while len(calm) < steps and time.time() - t_start < args.bench_cap_seconds:
            x = batches[i % 3]
            c0 = ThreadGovernor._sample()
            out = model(input_ids=x, labels=x, use_cache=False)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            c1 = ThreadGovernor._sample()
            dt = c1[0] - c0[0]
            others = max(0.0, ((c1[1] - c0[1]) - (c1[2] - c0[2])) / hz / dt)
            if i >= 2:  # two warm-up steps not timed
                (calm if others < 0.25 else contended).append(dt)
            i += 1
        timed = calm or contended or [(time.time() - t_start) / max(1, i)]
        per_step = float(np.median(timed))
        results[impl] = {"timed_steps": len(calm), "contended_steps_skipped": len(contended),
                         "tokens_per_step": tok, "tokens_per_s": tok / per_step, "seconds_per_step": per_step,
                         "mean_seconds_per_step": float(np.mean(timed)), "capped": len(calm) < steps,
                         "only_contended": not calm}
        print(f"[bench] {impl}: {tok / per_step:.0f} tok/s (median of {len(calm)} uncontended steps of {tok} "
              f"tokens; {len(contended)} contended steps skipped)", flush=True)
        del model, opt
    fastest = max(results, key=lambda k: results[k]["tokens_per_s"])
    return {"steps_requested": steps, "threads": torch.get_num_threads(),
            "seq_len": args.seq_len, "results": results, "fastest": fastest, "torch": torch.__version__,
            "when": time.strftime("%Y-%m-%d %H:%M:%S")}


# ---- export ----------------------------------------------------------------------------------------

def write_tokenizer(tok, out: Path) -> None:
    tok.save(str(out / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "bos_token": None,
           "pad_token": "<|endoftext|>", "chat_template": CHAT_TEMPLATE}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def export_model(model, out: Path) -> None:
    from transformers import GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.safetensors"):
        stale.unlink()
    m = copy.deepcopy(model).to(torch.bfloat16)  # the FP32 model stays untouched
    m.config.use_cache = True
    m.config.output_router_logits = False  # inference default; training used True (aux loss)
    m.save_pretrained(out, safe_serialization=True)
    del m
    for f in out.glob("*.safetensors"):
        f.chmod(0o644)
    cfg = json.loads((out / "config.json").read_text())
    cfg["architectures"] = ["Qwen3_5MoeForCausalLM"]
    cfg["model_type"] = "qwen3_5_moe_text"
    cfg["dtype"] = "bfloat16"
    cfg.pop("torch_dtype", None)
    for k in [k for k in cfg if k.startswith("_")]:
        cfg.pop(k)
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    gen = {"eos_token_id": [2, 0], "pad_token_id": 0, "bos_token_id": None, "do_sample": False,
           "max_new_tokens": 128}
    GenerationConfig(**gen)  # validate
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def plot_curve(log: list[dict], path: Path, smoothing: int = 20) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in log if r.get("kind") == "train"]
    evals = [r for r in log if r.get("kind") == "eval"]
    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=110)
    steps = np.array([r["step"] for r in train])
    loss = np.array([r["loss"] for r in train])
    ax.plot(steps, loss, color="tab:blue", alpha=0.3, lw=0.8, label="train loss (per step)")
    if len(loss) >= smoothing:
        k = np.ones(smoothing) / smoothing
        ax.plot(steps[smoothing - 1:], np.convolve(loss, k, mode="valid"), color="tab:blue", lw=1.6,
                label=f"train loss ({smoothing}-step mean)")
    if evals:
        ax.plot([r["step"] for r in evals], [r["heldout_loss"] for r in evals], "o-", color="tab:red",
                lw=1.6, ms=4, label="held-out loss")
    ax.set_xlabel("optimizer step (8192 tokens each)" if train and train[0].get("tokens_per_step") == 8192
                  else "optimizer step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title("ferry-demo: Qwen3.5-MoE (64 experts top-8, 8 layers) from scratch")
    if len(loss):
        ax.set_ylim(max(0.0, min(loss.min(), min([r["heldout_loss"] for r in evals] or [9])) - 0.3),
                    min(loss.max() + 0.2, 9.0))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def greedy_samples(model, tok, prompts: list[str], new_tokens: int) -> list[dict]:
    model.eval()
    samples = []
    for prompt in prompts:
        ids = torch.tensor([tok.encode(prompt).ids])
        with torch.no_grad():
            # exactly `new_tokens` tokens: EOS ids are not stopping criteria here (they show up in the text)
            out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 eos_token_id=None, pad_token_id=0, use_cache=True)
        gen = out[0, ids.size(1):].tolist()
        samples.append({"prompt": prompt, "ids": gen, "text": tok.decode(gen, skip_special_tokens=False)})
    return samples


# ---- main ------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("models/ferry-demo"), help="model directory to write")
    p.add_argument("--work", type=Path, default=Path.home() / ".cache" / "ferry" / "train-demo",
                   help="data cache, checkpoints, logs")
    p.add_argument("--minutes", type=float, default=55.0, help="training time budget, counted across resumes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="resume from --work/latest.pt when present")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--adaptive-threads", action=argparse.BooleanOptionalAction, default=True,
                   help="drop to 1 thread while the CPU is contended (see ThreadGovernor)")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=32, help="sequences per step (32 x 256 = 8192 tokens)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--final-lr-frac", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--total-steps", type=int, default=0,
                   help="cosine length; 0 = estimate from the measured step time so the schedule ends with "
                        "the budget (estimated from step 10, refined every 10 steps, frozen at --refine-until)")
    p.add_argument("--refine-until", type=int, default=300, help="step at which the cosine length is frozen")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-tokens", type=int, default=50_000)
    p.add_argument("--ckpt-minutes", type=float, default=5.0)
    p.add_argument("--experts-impl", default="auto", choices=("auto",) + EXPERT_IMPLS,
                   help="auto = the fastest in --work/bench_experts.json, else grouped_mm")
    p.add_argument("--bench-experts", type=int, default=0, metavar="STEPS",
                   help="time STEPS training steps per experts implementation, write bench_experts.json, exit")
    p.add_argument("--bench-batch", type=int, default=32, help="benchmark batch (batched_mm: at most 4)")
    p.add_argument("--bench-cap-seconds", type=float, default=150.0)
    p.add_argument("--sample-tokens", type=int, default=48)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    process_start = time.time()
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    bench_path = args.work / "bench_experts.json"

    if args.bench_experts:
        result = bench_experts(args, args.vocab_size, args.bench_experts)
        _atomic_write_text(bench_path, json.dumps(result, indent=1))
        print(json.dumps(result, indent=1))
        return 0

    from tqdm import tqdm
    from transformers import Qwen3_5MoeForCausalLM

    data = prepare_data(args.work, args.vocab_size)
    tok = data["tokenizer"]
    batches = Batches(data["train"], args.seq_len, args.batch, args.seed)
    eval_seqs = heldout_eval_set(data["heldout"], args.seq_len, args.eval_tokens)
    print(f"[data] {batches.n_chunks:,} training chunks of {args.seq_len}; held-out eval "
          f"{eval_seqs.numel():,} tokens in {eval_seqs.size(0)} chunks", flush=True)

    bench = json.loads(bench_path.read_text()) if bench_path.is_file() else None
    impl = args.experts_impl
    if impl == "auto":
        impl = bench["fastest"] if bench else "grouped_mm"

    ckpt_path = args.work / "latest.pt"
    log_path = args.work / "log.jsonl"
    model = build_model(args.vocab_size, args.seed, impl)
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in n or n.endswith(("A_log", "dt_bias")) else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    state = {"step": 0, "position": 0, "train_seconds": 0.0, "total_steps": args.total_steps,
             "total_frozen": args.total_steps > 0, "total_user": args.total_steps > 0, "runs": []}
    if args.resume and ckpt_path.is_file():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        torch.set_rng_state(ck["rng"]["torch"])
        np.random.set_state(ck["rng"]["numpy"])
        random.setstate(ck["rng"]["python"])
        state = ck["state"]
        state.setdefault("total_user", False)
        if args.total_steps > 0:  # an explicit cosine length wins
            state.update(total_steps=args.total_steps, total_frozen=True, total_user=True)
        elif not state["total_user"] and state["step"] < args.refine_until:
            state["total_frozen"] = False  # still in the refinement window: keep estimating
        impl = state.get("experts_impl", impl)
        model.set_experts_implementation(impl)
        kept = [r for r in read_log(log_path) if r["step"] <= state["step"]]
        _atomic_write_text(log_path, "".join(json.dumps(r) + "\n" for r in kept))
        print(f"[resume] step {state['step']}, {state['train_seconds'] / 60:.1f} min spent, "
              f"position {state['position']}", flush=True)
    elif log_path.exists():
        log_path.unlink()
    state["experts_impl"] = impl
    state["runs"].append({"argv": sys.argv[:] if argv is None else ["tools/train_demo.py", *argv],
                          "started": time.strftime("%Y-%m-%d %H:%M:%S"), "from_step": state["step"]})
    counts = param_counts(model)
    print(f"[model] {counts['total']:,} parameters ({counts['total'] * 2 / 2**20:.1f} MiB in BF16), "
          f"{counts['active_per_token']:,} active per token; experts implementation {impl}", flush=True)

    budget = args.minutes * 60
    tokens_per_step = args.batch * args.seq_len
    governor = ThreadGovernor(args.threads, args.adaptive_threads)
    logf = open(log_path, "a")

    def log(row: dict) -> None:
        logf.write(json.dumps(row) + "\n")
        logf.flush()

    def checkpoint() -> None:
        save_checkpoint(ckpt_path, {
            "model": model.state_dict(), "optimizer": opt.state_dict(), "state": state,
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
            "args": vars(args)})

    def run_eval() -> float:
        t0 = time.time()
        loss = evaluate(model, eval_seqs)
        state["train_seconds"] += time.time() - t0
        state["eval_seconds_last"] = time.time() - t0
        log({"kind": "eval", "step": state["step"], "tokens": state["step"] * tokens_per_step,
             "heldout_loss": loss, "heldout_ppl": math.exp(loss), "seconds": state["train_seconds"]})
        tqdm.write(f"[eval] step {state['step']}: held-out loss {loss:.4f} (ppl {math.exp(loss):.2f}), "
                   f"{time.time() - t0:.1f}s")
        return loss

    model.train()
    if state["step"] == 0 and not any(r.get("kind") == "eval" for r in read_log(log_path)):
        run_eval()
    step_times: list[float] = []
    last_ckpt = time.time()
    bar = tqdm(total=state["total_steps"] or None, initial=state["step"], unit="step", mininterval=5,
               dynamic_ncols=True, file=sys.stdout)
    while state["train_seconds"] < budget and not (state["total_frozen"] and state["step"] >= state["total_steps"]):
        t0 = time.time()
        step = state["step"]
        lr = lr_at(step, args.lr, args.warmup, max(state["total_steps"], args.warmup + 1), args.final_lr_frac)
        for g in opt.param_groups:
            g["lr"] = lr
        x = batches.get(state["position"])
        out = model(input_ids=x, labels=x, use_cache=False, output_router_logits=True)
        msg_mid = governor.update(allow_up=False)  # contention that began during the forward: 1 thread now
        out.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip).item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        aux = out.aux_loss.item()
        lm_loss = out.loss.item() - model.config.router_aux_loss_coef * aux
        dt = time.time() - t0
        state["step"] += 1
        state["position"] += args.batch
        state["train_seconds"] += dt
        tok_s = tokens_per_step / dt
        step_times.append(dt)
        used_threads = governor.current
        msg = msg_mid or governor.update()
        log({"kind": "train", "step": state["step"], "tokens": state["step"] * tokens_per_step, "loss": lm_loss,
             "aux_loss": aux, "lr": lr, "grad_norm": grad_norm, "seconds": state["train_seconds"],
             "step_seconds": dt, "tok_s": tok_s, "threads": used_threads, "others_cores": round(governor.others, 2),
             "tokens_per_step": tokens_per_step})
        if msg:
            tqdm.write(f"[step {state['step']}] {msg}")
            log({"kind": "note", "step": state["step"], "note": msg, "seconds": state["train_seconds"]})
        bar.update(1)
        bar.set_postfix(loss=f"{lm_loss:.3f}", aux=f"{aux:.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:.0f}",
                        thr=governor.current, min=f"{state['train_seconds'] / 60:.1f}", refresh=False)
        # The cosine's length: estimated from the recent median step time plus the evaluations' share,
        # with 5% held back, so that the schedule ends with the budget. Re-estimated every 10 steps until
        # --refine-until (early in the cosine, where it is flat, so the LR moves by ~1% at most), then frozen.
        if not state["total_frozen"] and len(step_times) >= 10 and (state["step"] % 10 == 0
                                                                     or state["step"] >= args.refine_until):
            per_step = float(np.median(step_times[-50:])) + state.get("eval_seconds_last", 0.0) / args.eval_every
            remaining = max(0.0, budget - state["train_seconds"])
            new_total = max(state["step"] + 1, state["step"] + int(0.95 * remaining / per_step))
            if state["step"] > args.warmup and abs(new_total - state["total_steps"]) > 5:
                note = (f"schedule: cosine length {state['total_steps']} -> {new_total} steps "
                        f"({per_step:.2f} s/step with evals)")
                tqdm.write(f"[step {state['step']}] {note}")
                log({"kind": "note", "step": state["step"], "note": note, "seconds": state["train_seconds"]})
            state["total_steps"] = new_total
            bar.total = state["total_steps"]
            if state["step"] >= args.refine_until:
                state["total_frozen"] = True
                note = f"schedule: cosine frozen at {state['total_steps']} steps ({per_step:.2f} s/step with evals)"
                tqdm.write(f"[step {state['step']}] {note}")
                log({"kind": "note", "step": state["step"], "note": note, "seconds": state["train_seconds"]})
        if state["step"] % args.eval_every == 0:
            run_eval()
        if time.time() - last_ckpt >= args.ckpt_minutes * 60:
            checkpoint()
            last_ckpt = time.time()
            tqdm.write(f"[ckpt] step {state['step']} -> {ckpt_path}")
    bar.close()

    # ---- final: evaluate FP32, export BF16, reload, verify, document ----------------------------------
    log_rows = read_log(log_path)
    if not any(r.get("kind") == "eval" and r["step"] == state["step"] for r in log_rows):
        run_eval()
    checkpoint()
    logf.close()
    log_rows = read_log(log_path)
    fp32_loss = [r for r in log_rows if r.get("kind") == "eval" and r["step"] == state["step"]][-1]["heldout_loss"]

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    export_model(model, out)
    write_tokenizer(tok, out)
    (out / "heldout.txt").write_text((args.work / "data" / "heldout.txt").read_text(encoding="utf-8"),
                                     encoding="utf-8")
    plot_curve(log_rows, out / "loss_curve.png")

    reloaded = Qwen3_5MoeForCausalLM.from_pretrained(out, dtype=torch.float32, experts_implementation=impl).eval()
    bf16_weights_loss = evaluate(reloaded, eval_seqs)
    reloaded_bf16 = Qwen3_5MoeForCausalLM.from_pretrained(out, experts_implementation=impl).eval()
    assert next(reloaded_bf16.parameters()).dtype == torch.bfloat16
    bf16_compute_loss = evaluate(reloaded_bf16, eval_seqs)
    del reloaded_bf16
    rel = abs(math.exp(bf16_weights_loss) - math.exp(fp32_loss)) / math.exp(fp32_loss)
    ok_close = rel < 0.02

    # Unigram baseline: training-token frequencies with add-one smoothing, on the same held-out targets.
    freq = np.bincount(data["train"], minlength=args.vocab_size).astype(np.float64) + 1.0
    logp = np.log(freq / freq.sum())
    targets = eval_seqs[:, 1:].reshape(-1).numpy()
    unigram_loss = float(-logp[targets].mean())

    samples = greedy_samples(reloaded, tok, SAMPLE_PROMPTS, args.sample_tokens)
    du = subprocess.run(["du", "-sh", str(out)], capture_output=True, text=True).stdout.split()[0]
    du_bytes = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    weights_bytes = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    train_rows = [r for r in log_rows if r.get("kind") == "train"]
    last = train_rows[-20:]
    summary = {
        "params": counts, "experts_impl": impl, "steps": state["step"],
        "tokens_seen": state["step"] * tokens_per_step, "train_seconds": state["train_seconds"],
        "epochs": state["step"] * tokens_per_step / data["train_tokens"],
        "tokens_per_s": state["step"] * tokens_per_step / max(1e-9, sum(r["step_seconds"] for r in train_rows)),
        "final_train_loss": train_rows[-1]["loss"] if train_rows else None,
        "final_train_loss_mean20": float(np.mean([r["loss"] for r in last])) if last else None,
        "heldout_loss_fp32": fp32_loss, "heldout_loss_bf16_weights": bf16_weights_loss,
        "heldout_loss_bf16_compute": bf16_compute_loss, "unigram_loss": unigram_loss,
        "ppl_rel_diff_bf16_vs_fp32": rel, "bf16_close_to_fp32": ok_close,
        "du": du, "dir_bytes": du_bytes, "weights_bytes": weights_bytes,
        "total_steps_schedule": state["total_steps"], "samples": samples,
        "wall_seconds_this_process": time.time() - process_start,
    }
    _atomic_write_text(args.work / "summary.json", json.dumps(summary, indent=1, default=str))
    write_data_md(out, data, args, eval_seqs)
    write_training_md(out, args, state, summary, bench, log_rows, model.config)
    print(json.dumps({k: v for k, v in summary.items() if k != "samples"}, indent=1, default=str))
    for s in samples:
        print(f"--- {s['prompt']!r} ->\n{s['prompt']}{s['text']}")
    if not ok_close:
        print(f"WARNING: BF16 held-out perplexity differs from FP32 by {rel:.2%}", file=sys.stderr)
    if weights_bytes > 40 * 2**20 or du_bytes > 40 * 2**20:
        print(f"WARNING: {out} is larger than 40 MiB ({du})", file=sys.stderr)
        return 1
    return 0


# ---- documentation ---------------------------------------------------------------------------------

def write_data_md(out: Path, data: dict, args, eval_seqs: torch.Tensor) -> None:
    rows = data["sources"]
    lines = [
        "# ferry-demo training data", "",
        "Two local corpora, read from Debian packages on the training machine (no downloads). "
        "Files are read as UTF-8 (files that do not decode are skipped), CRLF is normalised to LF, and "
        "each file is one document; documents are joined with `<|endoftext|>` (id 0) between them.", "",
        "| source | kind | what | licence | train files | train bytes | train tokens | held-out files "
        "| held-out bytes | held-out tokens |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['name']} | {r['kind']} | `{r['pattern']}` | {r['licence']} | {r['train_files']:,} "
                     f"| {r['train_bytes']:,} | {r['train_tokens']:,} | {r['heldout_files']:,} "
                     f"| {r['heldout_bytes']:,} | {r['heldout_tokens']:,} |")
    tb = sum(r["train_bytes"] for r in rows)
    hb = sum(r["heldout_bytes"] for r in rows)
    lines += [
        f"| **total** | | | | {sum(r['train_files'] for r in rows):,} | {tb:,} | {data['train_tokens']:,} "
        f"| {sum(r['heldout_files'] for r in rows):,} | {hb:,} | {data['heldout_tokens']:,} |", "",
        "Token counts are with the trained tokenizer; the totals include the `<|endoftext|>` separators. "
        f"Bytes per token: {tb / data['train_tokens']:.2f} (training split).", "",
        "Versions: python3-doc / python3.11-doc 3.11.2 (Debian 12), reStructuredText sources under "
        "`html/_sources`; standard library of Debian's `libpython3.11-minimal`/`libpython3.11-stdlib` "
        "(`/usr/lib/python3.11`). Skipped (not UTF-8): "
        + ", ".join(f"{r['name']}: {r['skipped_non_utf8']}" for r in rows) + ".", "",
        "Excluded on purpose: test suites (`test/`, `tests/`, `idle_test/`), third-party packages "
        "(`site-packages/`, `dist-packages/`), and `pydoc_data/` (its `topics.py` is a copy of the "
        "documentation text, which would leak held-out documentation into training). Man pages were not "
        "used: the two corpora already hold more tokens than the time budget lets the model see.", "",
        "## Licence", "",
        "Both corpora are Python Software Foundation material under the PSF License Agreement (version 2), "
        "as stated in `/usr/share/doc/python3-doc/copyright` (documentation) and "
        "`/usr/share/doc/libpython3.11-stdlib/copyright` (library). The PSF licence permits use, "
        "modification and redistribution, including of derivative works, provided the copyright notice "
        "is retained. `heldout.txt` in this directory is such PSF text (unmodified files, concatenated).", "",
        "## Split", "",
        f"Deterministic: within each source the files are sorted by path and every {HELDOUT_EVERY}th file "
        "(index 0, 50, 100, ...) is held out (~2%). The tokenizer is trained on the training split only; "
        "the held-out files are never seen in training.", "",
        f"- `heldout.txt`: the held-out files, documentation first then code, separated by a blank line "
        f"({hb:,} bytes of source text).",
        f"- Held-out evaluation set: {eval_seqs.size(0)} chunks of {args.seq_len} tokens "
        f"({eval_seqs.numel():,} tokens), evenly spaced over the held-out token stream (so both prose and "
        "code), fixed for every evaluation in TRAINING.md.",
        f"- Training order: the training stream cut into {args.seq_len}-token chunks, visited in a seeded "
        f"permutation per epoch (seed {args.seed}).", "",
        "## Tokenizer", "",
        f"Byte-level BPE (`tokenizers` {__import__('tokenizers').__version__}), vocabulary {args.vocab_size}, "
        "trained on the training split; ByteLevel pre-tokenizer (add_prefix_space false) and ByteLevel "
        "decoder, no normaliser, so any text round-trips exactly. Special tokens: `<|endoftext|>` = 0, "
        "`<|im_start|>` = 1, `<|im_end|>` = 2. `tokenizer_config.json` carries a ChatML chat template.", "",
    ]
    (out / "DATA.md").write_text("\n".join(lines))


def write_training_md(out: Path, args, state: dict, s: dict, bench: dict | None, log_rows: list[dict],
                      config) -> None:
    p = s["params"]
    evals = [r for r in log_rows if r.get("kind") == "eval"]
    notes = [r for r in log_rows if r.get("kind") == "note"]
    train_rows = [r for r in log_rows if r.get("kind") == "train"]
    thread_steps = {}
    for r in train_rows:
        thread_steps[r["threads"]] = thread_steps.get(r["threads"], 0) + 1
    ppl = math.exp
    runs = "\n".join(f"    python {' '.join(r['argv'])}    # started {r['started']}, from step {r['from_step']}"
                     for r in state["runs"])
    lines = [
        "# ferry-demo: training record", "",
        "A small Qwen3.5-MoE (`Qwen3_5MoeForCausalLM`, transformers "
        f"{__import__('transformers').__version__}, torch {torch.__version__}) trained from scratch on a "
        "2-core CPU (no GPU) by `tools/train_demo.py`, on Python's documentation and standard library "
        "(see DATA.md).", "",
        "## Command", "",
        "From the repository root (each line is one process; later lines resumed from the checkpoint):", "",
        runs, "",
        f"Seed {args.seed}; `torch.set_num_threads({args.threads})`"
        + (" with the contention fallback to 1 thread (`--adaptive-threads`)" if args.adaptive_threads else "")
        + ". Steps per thread count: " + ", ".join(f"{k} thread(s): {v}" for k, v in sorted(thread_steps.items()))
        + ".", "",
        "## Architecture", "",
        "| field | value |", "|---|---|",
    ]
    for k in ["vocab_size", "hidden_size", "num_hidden_layers", "layer_types", "num_attention_heads",
              "num_key_value_heads", "head_dim", "rope_parameters", "linear_num_key_heads",
              "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim", "linear_conv_kernel_dim",
              "num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
              "router_aux_loss_coef", "tie_word_embeddings", "rms_norm_eps", "max_position_embeddings"]:
        lines.append(f"| {k} | `{json.dumps(getattr(config, k, None))}` |")
    lines += [
        "", f"Parameters: **{p['total']:,}** in total ({p['total'] * 2 / 2**20:.1f} MiB in BF16), of which "
        f"{p['routed_experts']:,} in routed experts, {p['embedding']:,} embedding and {p['lm_head']:,} LM head; "
        f"{p['active_per_token']:,} active per token ({p['active_per_token_non_embedding']:,} without the "
        "embedding).", "",
        "## Recipe", "",
        f"- AdamW (betas 0.9/0.95, eps 1e-8), peak LR {args.lr:g}, linear warmup {args.warmup} steps, cosine "
        f"to {args.final_lr_frac:g} x peak at step {state['total_steps']}, weight decay {args.weight_decay:g} "
        "(not on norms, biases, A_log, dt_bias), gradient clipping at "
        f"{args.grad_clip:g}.",
        f"- Sequence length {args.seq_len}, batch {args.batch} sequences = {args.batch * args.seq_len:,} tokens "
        "per step; FP32 weights and compute; router load-balancing auxiliary loss on "
        f"(`output_router_logits=True`, coefficient {config.router_aux_loss_coef:g}).",
        f"- The cosine length is set from the measured step time so that the schedule ends with the "
        f"{args.minutes:g}-minute budget (estimated from step 10, re-estimated every 10 steps, frozen at step "
        f"{args.refine_until}; see the notes below). Only {state['total_steps']} steps of "
        f"{args.batch * args.seq_len:,} tokens fit in the budget on this CPU; a 200-step warmup would be "
        f"{200 / max(1, state['total_steps']):.0%} of them, so warmup is {args.warmup} steps "
        f"({args.warmup / max(1, state['total_steps']):.0%}).",
        f"- Held-out loss every {args.eval_every} steps on the fixed held-out set; checkpoints every "
        f"{args.ckpt_minutes:g} minutes (atomic), resumable.", "",
        "## Experts implementation", "",
    ]
    if bench:
        lines += [
            f"Measured with `python tools/train_demo.py --bench-experts {bench['steps_requested']}` "
            f"({bench['when']}, {bench['threads']} threads; training steps of sequence length "
            f"{bench['seq_len']}: forward, backward, AdamW; "
            "two untimed warm-up steps; steps during which other processes on this shared machine used "
            "more than 0.25 cores were not counted):", "",
            "| implementation | tokens / step | uncontended steps timed | s / step (median) | tokens / s |",
            "|---|---:|---:|---:|---:|",
        ]
        for impl, r in bench["results"].items():
            cap = " (time cap reached)" if r["capped"] else ""
            lines.append(f"| `{impl}` | {r['tokens_per_step']:,} | {r['timed_steps']}{cap} | {r['seconds_per_step']:.2f} "
                         f"| {r['tokens_per_s']:.0f} |")
        lines += ["", f"Fastest: `{bench['fastest']}`; used: `{s['experts_impl']}`. `grouped_mm` is "
                  "transformers' default for this model and runs `torch._grouped_mm`'s CPU kernel over "
                  "tokens sorted by expert; `eager` loops over the experts hit; `batched_mm` gathers a "
                  "weight matrix per (token, expert) pair, which on a CPU is memory-bound and far slower "
                  "(and needs ~0.75 MB per token per layer kept for backward, hence its smaller batch).", ""]
    else:
        lines += [f"Used: `{s['experts_impl']}` (no benchmark file in --work).", ""]
    fe = s["heldout_loss_fp32"]
    lines += [
        "## Results", "",
        f"- Steps: {s['steps']:,}; tokens seen: **{s['tokens_seen']:,}** ({s['epochs']:.2f} epochs of the "
        f"training split); training time {s['train_seconds'] / 60:.1f} "
        f"min (evaluations included), throughput **{s['tokens_per_s']:.0f} tokens/s** (training steps only).",
        f"- Final train loss: {s['final_train_loss']:.4f} (last step), {s['final_train_loss_mean20']:.4f} "
        "(mean of the last 20 steps), nats/token.",
        f"- Held-out loss, FP32 model before the cast: {fe:.4f} (perplexity {ppl(fe):.2f}).",
        f"- Held-out loss, BF16 checkpoint reloaded from this directory (`from_pretrained(..., dtype=float32)`, "
        f"BF16 weights, FP32 compute): **{s['heldout_loss_bf16_weights']:.4f} (perplexity "
        f"{ppl(s['heldout_loss_bf16_weights']):.2f})**; relative perplexity difference to FP32 "
        f"{s['ppl_rel_diff_bf16_vs_fp32']:.2%}.",
        f"- Same checkpoint reloaded as-is (BF16 weights and BF16 compute): {s['heldout_loss_bf16_compute']:.4f} "
        f"(perplexity {ppl(s['heldout_loss_bf16_compute']):.2f}).",
        f"- Unigram baseline on the same held-out tokens (training-token frequencies, add-one smoothing): "
        f"{s['unigram_loss']:.4f} (perplexity {ppl(s['unigram_loss']):.2f}).",
        f"- Directory size: {s['du']} (`du -sh`); weights {s['weights_bytes']:,} bytes.", "",
        "Held-out evaluations during training:", "",
        "| step | tokens | held-out loss | perplexity |", "|---:|---:|---:|---:|",
    ]
    for r in evals:
        lines.append(f"| {r['step']} | {r['tokens']:,} | {r['heldout_loss']:.4f} | {r['heldout_ppl']:.2f} |")
    lines += ["", "![loss curve](loss_curve.png)", "",
              f"## Greedy samples ({args.sample_tokens} new tokens, reloaded BF16 checkpoint)", ""]
    for smp in s["samples"]:
        lines += [f"Prompt `{smp['prompt']}`:", "", "```", smp["prompt"] + smp["text"], "```", ""]
    if notes:
        lines += ["## Notes from the run", ""] + [f"- step {r['step']}: {r['note']}" for r in notes] + [""]
    (out / "TRAINING.md").write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
