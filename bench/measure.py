"""Shared measuring tools for the benchmarks: memory bandwidth, bytes per token, timed graphs.

Absolute times on shared machines are noisy, so every benchmark reports ratios of figures taken
in the same run; these helpers supply the yardsticks.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from model.spec import ModelSpec

FLOAT32 = 4


def read_bandwidth(gigabytes: float = 1.0, repeats: int = 5) -> float:
    """Best read bandwidth (bytes/s) over a buffer far larger than the caches, by three readers:
    MindSpore's multi-threaded ReduceSum, numpy's single-threaded sum, and a numpy (BLAS,
    multi-threaded) matrix-vector product over the buffer as a [rows, 2048] matrix: whichever
    reads fastest, so that the bound is as tight as this machine allows."""
    import mindspore as ms
    from mindspore import nn, ops

    class Sum(nn.Cell):
        def construct(self, x):
            return ops.sum(x)

    data = np.ones(int(gigabytes * 2**30) // FLOAT32, np.float32)
    matrix, vector = data.reshape(-1, 2048), np.ones(2048, np.float32)
    tensor, cell = ms.Tensor.from_numpy(data), Sum()
    cell(tensor).asnumpy()
    readers = (lambda: cell(tensor).asnumpy(), data.sum, lambda: matrix @ vector)
    best = float("inf")
    for _ in range(repeats):
        for read in readers:
            start = time.perf_counter()
            read()
            best = min(best, time.perf_counter() - start)
    return data.nbytes / best


def decode_bytes_per_token(spec: ModelSpec, context: int, expert_dtype: str = "fp32",
                           expert_bytes: int | None = None) -> int:
    """Bytes one decode step must read: the dense weights of every layer and the head as an artifact
    with `expert_dtype` experts stores them (artifact.dense: FP32, or FP16 matrices beside narrow
    experts), one embedding row, top-k experts per layer (`expert_bytes` each, as stored: default
    FP32), and the FP32 KV cache of the attention layers up to `context`."""
    from artifact.dense import dense_plan, tensor_bytes

    tensors = {t.name: tensor_bytes(t) for t in dense_plan(spec, "cpu", expert_dtype)}
    table = tensors.pop("embed")
    read = sum(tensors.values()) + (0 if "lm_head" in tensors else table)  # tied: the head reads the table
    read += table // spec.vocab_size
    attention_layers = spec.layer_types.count("full_attention")
    read += attention_layers * 2 * context * spec.num_key_value_heads * spec.head_dim * FLOAT32
    experts = spec.num_layers * spec.num_experts_per_tok
    return read + experts * (expert_bytes or spec.expert_params * FLOAT32)


def run_worker(script: Path, *args: str) -> dict:
    """Run a benchmark worker in its own process (so two models never share memory); it prints
    one JSON object as its last line of output."""
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{script.name} {' '.join(args)} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


class TimedGraphs:
    """Wraps a GraphSet and adds up the seconds spent in each kind of graph launch."""

    def __init__(self, graphs):
        self.graphs = graphs
        self.seconds: dict[str, float] = {}

    def timed(self, kind: str, graph):
        def call(*args):
            start = time.perf_counter()
            out = graph(*args)
            first = out[0] if isinstance(out, tuple) else out
            first.asnumpy()  # the launch is done when its output is readable
            self.seconds[kind] = self.seconds.get(kind, 0.0) + time.perf_counter() - start
            return out

        return call

    def attention(self, tokens):
        return self.timed("attention", self.graphs.attention(tokens))

    def deltanet(self, tokens):
        return self.timed("deltanet", self.graphs.deltanet(tokens))

    def embedding(self, tokens):
        return self.timed("embedding", self.graphs.embedding(tokens))

    def head(self, tokens):
        return self.timed("head", self.graphs.head(tokens))

    def last_head(self, tokens):
        return self.timed("head", self.graphs.last_head(tokens))

    def expert_group(self, tier, tokens):
        return self.timed("experts", self.graphs.expert_group(tier, tokens))
