"""Ferry's CPU kernels (kernels/ferry_cpu.cc) against numpy, and the engine with them switched off.

The kernels replace MindSpore's MatMul in decode launches and run every expert group, so each
is checked at the shapes that exercise its remainders (rows not a multiple of the 4x3 register
block, widths not a multiple of 8), and the whole engine is checked to give the oracle's logits
both with the kernels and with MindSpore's own operators (FERRY_CPU_KERNELS=0).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import mindspore as ms
from mindspore import nn

from checkpoints import TinyShape, load_oracle, write_checkpoint
from graphs.common import cpu_kernel
from kernels.build import KernelBuildError, build

RUN_ENGINE = """
import json, sys
import numpy as np
from runtime.backend import configure
configure()
from runtime.build import engine_from_checkpoint
from runtime.engine import Buckets
engine = engine_from_checkpoint(sys.argv[1], buckets=Buckets((16,)), max_context=64)
ids = json.loads(sys.argv[2])
logits = [engine.forward(ids[:20], all_logits=True)] + [engine.forward(ids[n:n + 1])[None] for n in range(20, 24)]
print(json.dumps(np.concatenate(logits).tolist()))
"""


class LinearOp(nn.Cell):
    def __init__(self):
        super().__init__()
        self.op = cpu_kernel("FerryLinear", lambda x, w: [x[0], w[0]], lambda x, w: x)

    def construct(self, x, w):
        return self.op(x, w)


class ExpertsOp(nn.Cell):
    def __init__(self):
        super().__init__()
        self.op = cpu_kernel("FerryExperts", lambda x, *shapes: x, lambda x, *dtypes: x)

    def construct(self, x, counts, *weights):
        return self.op(x, counts, *weights)


def silu(v):
    return v / (1 + np.exp(-v))


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 9, 64])
@pytest.mark.parametrize("out_features,in_features", [(1, 8), (5, 13), (66, 2048), (1027, 40)])
def test_linear_matches_numpy(rows, out_features, in_features):
    rng = np.random.default_rng(rows * 1000 + out_features)
    x = rng.standard_normal((rows, in_features)).astype(np.float32)
    w = rng.standard_normal((out_features, in_features)).astype(np.float32)
    ours = LinearOp()(ms.Tensor(x), ms.Tensor(w)).asnumpy()
    expected = x.astype(np.float64) @ w.T.astype(np.float64)
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5 * np.sqrt(in_features))


@pytest.mark.parametrize("counts", [[1, 1, 1], [0, 5, 2], [7, 0, 7], [3, 7, 6]])
def test_experts_match_numpy_and_skip_padding(counts):
    hidden, intermediate, capacity = 24, 10, 7
    rng = np.random.default_rng(sum(counts))
    x = rng.standard_normal((3, capacity, hidden)).astype(np.float32)
    gate_up = [rng.standard_normal((2 * intermediate, hidden)).astype(np.float32) for _ in range(3)]
    down = [rng.standard_normal((hidden, intermediate)).astype(np.float32) for _ in range(3)]
    ours = ExpertsOp()(ms.Tensor(x), ms.Tensor(np.array(counts, np.int32)),
                       *map(ms.Tensor, gate_up + down)).asnumpy()
    for g, count in enumerate(counts):
        both = x[g, :count].astype(np.float64) @ gate_up[g].T
        expected = (silu(both[:, :intermediate]) * both[:, intermediate:]) @ down[g].T
        np.testing.assert_allclose(ours[g, :count], expected, rtol=1e-5, atol=1e-4)
        assert not ours[g, count:].any(), f"slot {g}: padding rows past {count} must come out zero"


def test_build_is_cached(tmp_path):
    first = build(tmp_path)
    stamp = first.stat().st_mtime_ns
    assert build(tmp_path) == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in first.parent.iterdir()] == ["libferry_cpu.so"]


def test_failed_build_names_the_compiler_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    with pytest.raises(KernelBuildError, match="could not build ferry_cpu.cc"):
        build(tmp_path)
    assert not list(tmp_path.rglob("*.so"))
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    with pytest.raises(KernelBuildError, match="no C\\+\\+ compiler"):
        build(tmp_path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    shape = TinyShape(seed=11)
    model_dir = write_checkpoint(shape, tmp_path_factory.mktemp("kernels"))
    ids = np.random.default_rng(11).integers(2, shape.vocab, 24).tolist()
    with torch.no_grad():
        reference = load_oracle(model_dir)(torch.tensor([ids])).logits[0].numpy()
    return model_dir, ids, reference


def engine_logits(model_dir: Path, ids: list[int], **env: str) -> np.ndarray:
    done = subprocess.run([sys.executable, "-c", RUN_ENGINE, str(model_dir), json.dumps(ids)],
                          capture_output=True, text=True, env={**os.environ, **env},
                          cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    return np.array(json.loads(done.stdout.splitlines()[-1]), np.float32)


def test_engine_matches_oracle_without_kernels(tiny):
    model_dir, ids, reference = tiny
    ours = engine_logits(model_dir, ids, FERRY_CPU_KERNELS="0")
    assert np.abs(ours - reference).max() <= 1e-4


def test_kernel_results_do_not_depend_on_thread_count(tiny):
    model_dir, ids, reference = tiny
    one = engine_logits(model_dir, ids, FERRY_CPU_THREADS="1")
    two = engine_logits(model_dir, ids, FERRY_CPU_THREADS="2")
    np.testing.assert_array_equal(one, two)
    assert np.abs(two - reference).max() <= 1e-4
