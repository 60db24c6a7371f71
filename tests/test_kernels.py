"""Ferry's CPU kernel (kernels/ferry_cpu.cc) against numpy, and the engine with it switched off.

The kernel runs every expert group on the CPU, so it is checked at the shapes that exercise its
remainders (rows not a multiple of the 4 x 3 register block, widths not a multiple of 8), and the
whole engine is checked to give the oracle's logits both with the kernel and with MindSpore's own
operators (FERRY_CPU_KERNELS=0), and the same logits with 1 or 2 kernel threads.
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
from runtime.build import engine_from_artifact, engine_from_checkpoint
from runtime.engine import Buckets
if sys.argv[3] == "artifact":
    engine = engine_from_artifact(sys.argv[1])
else:
    engine = engine_from_checkpoint(sys.argv[1], buckets=Buckets((16,)), max_context=64)
ids = json.loads(sys.argv[2])
logits = [engine.forward(ids[:20], all_logits=True)] + [engine.forward(ids[n:n + 1])[None] for n in range(20, 24)]
print(json.dumps(np.concatenate(logits).tolist()))
"""


class ExpertsOp(nn.Cell):
    def __init__(self):
        super().__init__()
        self.op = cpu_kernel("FerryExperts", lambda x, *shapes: x, lambda x, *dtypes: x)

    def construct(self, x, counts, *weights):
        return self.op(x, counts, *weights)


def silu(v):
    return v / (1 + np.exp(-v))


@pytest.mark.parametrize("hidden,intermediate,capacity,counts", [
    (29, 10, 7, [1, 1, 1]), (29, 10, 7, [0, 5, 2]), (29, 10, 7, [7, 0, 7]), (29, 10, 7, [3, 7, 6]),
    (256, 64, 70, [70, 1, 64]),  # more rows than one 64-row pass
])
def test_experts_match_numpy_and_skip_padding(hidden, intermediate, capacity, counts):
    """Widths that are not multiples of the 8-lane vectors or of the 4 x 3 register block."""
    rng = np.random.default_rng(sum(counts))
    x = rng.standard_normal((len(counts), capacity, hidden)).astype(np.float32)
    gate_up = [rng.standard_normal((2 * intermediate, hidden)).astype(np.float32) for _ in counts]
    down = [rng.standard_normal((hidden, intermediate)).astype(np.float32) for _ in counts]
    ours = ExpertsOp()(ms.Tensor(x), ms.Tensor(np.array(counts, np.int32)),
                       *map(ms.Tensor, gate_up + down)).asnumpy()
    for g, count in enumerate(counts):
        both = x[g, :count].astype(np.float64) @ gate_up[g].T
        expected = (silu(both[:, :intermediate]) * both[:, intermediate:]) @ down[g].T
        np.testing.assert_allclose(ours[g, :count], expected, rtol=1e-4, atol=1e-4 * np.sqrt(hidden))
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


def engine_logits(model_dir: Path, ids: list[int], source: str = "checkpoint", **env: str) -> np.ndarray:
    """Logits of a 20-token prefill and 4 decode steps, from a fresh process with `env` set."""
    done = subprocess.run([sys.executable, "-c", RUN_ENGINE, str(model_dir), json.dumps(ids), source],
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


def test_artifact_loads_after_the_kernel_cache_is_cleared(tiny, tmp_path):
    """Exported expert-group graphs name the kernel library by path; loading rebuilds it there."""
    model_dir, ids, reference = tiny
    env = {"FERRY_CACHE": str(tmp_path / "cache")}
    convert = subprocess.run([sys.executable, "-m", "convert", "--model-dir", str(model_dir), "--out",
                              str(tmp_path / "artifact")], capture_output=True, text=True,
                             env={**os.environ, **env}, cwd=Path(__file__).parents[1])
    assert convert.returncode == 0, convert.stderr[-3000:]
    built = list((tmp_path / "cache").rglob("*.so"))
    assert built, "convert on the CPU exports expert groups that call the kernel library"
    for library in built:
        library.unlink()
    ours = engine_logits(tmp_path / "artifact", ids, "artifact", **env)
    assert list((tmp_path / "cache").rglob("*.so")), "the kernel library was not rebuilt"
    assert np.abs(ours - reference).max() <= 1e-4
