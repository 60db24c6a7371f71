"""Ferry's CPU kernels (kernels/ferry_cpu.cc) against numpy, and the engine with them switched off.

The decode kernels (a whole DeltaNet or attention layer at T = 1, and the last-row head) are checked
against the same Cells on MindSpore's operators, over several steps with their states fed back, with
FP32 and with FP16 weight matrices (an artifact with narrow experts stores its dense matrices in FP16).

The kernels run every expert group on the CPU, in each storage format (fp32, fp16, int8), so they
are checked at the shapes that exercise their remainders (rows not a multiple of the 4 x 3 register
block, widths not a multiple of 8, more rows than one 64-row pass), against the MindSpore-ops
fallback of the same Cells, and through their host entry (kernels/host.py). The whole engine is
checked to give the oracle's logits both with the kernels and with MindSpore's own operators
(FERRY_CPU_KERNELS=0), and the same logits with 1 or 2 kernel threads; exported graphs are checked
to run in a process whose kernel cache is elsewhere.
"""
import json
import os
import types
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import mindspore as ms
from mindspore import nn

from checkpoints import TinyShape, load_oracle, write_checkpoint
from artifact.dense import MATRICES
from artifact.store import block_bytes, block_layout, part_offsets
from graphs.common import cpu_kernel
from graphs.embed_head import LastHead
from graphs.layer import ATTENTION_WEIGHTS, DELTANET_WEIGHTS, AttentionLayer, DeltaNetLayer
from graphs.moe import GROUPS, ExpertLaunch
from kernels import build as kernel_build
from kernels.build import KernelBuildError, build, cache_key, cpu_features
from kernels.host import PARTS, host_kernels
from model.names import layer_names
from model.spec import ModelSpec
from offload.device import MODELS, DeviceMemory

ROOT = Path(__file__).parents[1]

# argv: a directory of <dtype>.npz expert-group inputs, then "export" (<dtype>.mindir beside each) or
# "load" (print each graph's output)
EXPORT_OR_LOAD = """
import json, sys
from pathlib import Path
import numpy as np
import mindspore as ms
from mindspore import nn
from runtime.backend import configure
configure()
from graphs.moe import GROUPS
from kernels.build import library
outputs = {}
for dtype, group in GROUPS.items():
    graph = Path(sys.argv[1]) / dtype
    saved = np.load(graph.with_suffix(".npz"))
    inputs = [ms.Tensor(saved[f"arr_{n}"]) for n in range(len(saved))]
    if sys.argv[2] == "export":
        cell = group(len(saved["arr_1"]), saved["arr_2"].shape[0] // 2)  # slots from counts, I from gate_up [2I, H]
        ms.export(cell, *inputs, file_name=str(graph), file_format="MINDIR")
    else:
        library()  # builds into this process's cache and names it for the graphs, as ExportedGraphs does
        outputs[dtype] = nn.GraphCell(ms.load(str(graph.with_suffix(".mindir"))))(*inputs).asnumpy().tolist()
print(json.dumps(outputs))
"""

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
    def __init__(self, name: str):
        super().__init__()
        self.op = cpu_kernel(name, lambda x, *shapes: x, lambda x, *dtypes: x)

    def construct(self, x, counts, *weights):
        return self.op(x, counts, *weights)


def silu(v):
    return v / (1 + np.exp(-v))


def expert_weights(rng, dtype: str, slots: int, hidden: int, intermediate: int):
    """Random slot inputs in graph order, and each slot's (gate_up, down) as the float64 values they stand for."""
    if dtype == "int8":
        q_up = [rng.integers(-127, 128, (2 * intermediate, hidden), dtype=np.int8) for _ in range(slots)]
        q_down = [rng.integers(-127, 128, (hidden, intermediate), dtype=np.int8) for _ in range(slots)]
        s_up = [(rng.uniform(0.5, 1.5, 2 * intermediate) / 127).astype(np.float32) for _ in range(slots)]
        s_down = [(rng.uniform(0.5, 1.5, hidden) / 127).astype(np.float32) for _ in range(slots)]
        exact = [(q.astype(np.float64) * s[:, None], d.astype(np.float64) * t[:, None])
                 for q, s, d, t in zip(q_up, s_up, q_down, s_down)]
        return q_up + q_down + s_up + s_down, exact
    kind = np.float16 if dtype == "fp16" else np.float32
    up = [rng.standard_normal((2 * intermediate, hidden)).astype(kind) for _ in range(slots)]
    down = [rng.standard_normal((hidden, intermediate)).astype(kind) for _ in range(slots)]
    return up + down, [(u.astype(np.float64), d.astype(np.float64)) for u, d in zip(up, down)]


def expert_reference(x, gate_up, down):
    """One SwiGLU expert in float64: x [n, H] -> [n, H]."""
    both = x.astype(np.float64) @ gate_up.T  # [n, 2I]
    i = down.shape[1]
    return (silu(both[:, :i]) * both[:, i:]) @ down.T  # [n, H]


def run(cell, x, counts, weights) -> np.ndarray:
    return cell(ms.Tensor(x), ms.Tensor(np.array(counts, np.int32)), *map(ms.Tensor, weights)).asnumpy()


@pytest.mark.parametrize("dtype", GROUPS)
@pytest.mark.parametrize("hidden,intermediate,capacity,counts", [
    (29, 10, 7, [1, 1, 1]), (29, 10, 7, [0, 5, 2]), (29, 10, 7, [7, 0, 7]), (29, 10, 7, [3, 7, 6]),
    (256, 64, 70, [70, 1, 64]),  # more rows than one 64-row pass
])
def test_experts_match_numpy_and_skip_padding(dtype, hidden, intermediate, capacity, counts):
    """Widths that are not multiples of the 8-lane vectors or of the 4 x 3 register block."""
    rng = np.random.default_rng(sum(counts))
    x = rng.standard_normal((len(counts), capacity, hidden)).astype(np.float32)
    weights, exact = expert_weights(rng, dtype, len(counts), hidden, intermediate)
    ours = run(ExpertsOp(GROUPS[dtype].KERNEL), x, counts, weights)
    for g, count in enumerate(counts):
        expected = expert_reference(x[g, :count], *exact[g])
        np.testing.assert_allclose(ours[g, :count], expected, rtol=1e-4, atol=1e-4 * np.sqrt(hidden))
        assert not ours[g, count:].any(), f"slot {g}: padding rows past {count} must come out zero"


@pytest.mark.parametrize("dtype", GROUPS)
def test_kernel_matches_the_mindspore_fallback(dtype):
    """The kernel and the same Cell on MindSpore's operators (what FERRY_CPU_KERNELS=0 runs) agree to
    FP32 rounding: 1e-5 of the largest output (both sum FP32 products, in different orders)."""
    rng = np.random.default_rng(5)
    counts = [70, 3, 0]
    x = rng.standard_normal((3, 70, 37)).astype(np.float32)
    x[np.arange(70)[None, :] >= np.array(counts)[:, None]] = 0  # padding rows are zero in, as the dispatcher sends them
    weights, _ = expert_weights(rng, dtype, 3, 37, 10)
    kernel, fallback = GROUPS[dtype](3, 10), GROUPS[dtype](3, 10)
    fallback.use_kernel = False
    assert kernel.use_kernel, "the kernel library did not build"
    ours, theirs = run(kernel, x, counts, weights), run(fallback, x, counts, weights)
    assert np.abs(theirs).max() > 1
    assert np.abs(ours - theirs).max() <= 1e-5 * np.abs(theirs).max()


@pytest.mark.parametrize("dtype", GROUPS)
def test_host_kernels_give_the_graph_result_bit_for_bit(dtype):
    """Host compute through kernels/host.py equals the expert-group graph, per group and per expert
    (a row's result does not depend on the other rows of its launch)."""
    rng = np.random.default_rng(7)
    counts = np.array([5, 0, 70], np.int32)
    x = rng.standard_normal((3, 70, 37)).astype(np.float32)
    weights, _ = expert_weights(rng, dtype, 3, 37, 10)
    graph = run(GROUPS[dtype](3, 10), x, counts, weights)
    host = host_kernels()
    np.testing.assert_array_equal(host.expert_group(x, counts, weights), graph)
    slots, slot = 3, 2
    block = {part: weights[index * slots + slot] for index, part in enumerate(PARTS[: len(weights) // slots])}
    for rows in (32, 1):  # 32 rows: 10 x 3 + 2, where the graph's 70 rows are 23 x 3 + 1; 1 row: a decode slot
        np.testing.assert_array_equal(host.expert(x[slot, :rows], block), graph[slot, :rows])


class SlotBlocks:
    """A `BlockSource` of the given per-slot weights (graph order), block g holding slot g's arrays in the
    store's block layout: expert pools built by `DeviceMemory` from it hold exactly those weights."""

    def __init__(self, dtype: str, weights: list, slots: int, hidden: int, intermediate: int):
        shape = types.SimpleNamespace(hidden_size=hidden, moe_intermediate_size=intermediate)
        self.parts = block_layout(shape, dtype)
        self.block_bytes = block_bytes(self.parts)
        self.num_layers, self.num_experts = 1, slots
        self.arrays = [[weights[p * slots + g] for p in range(len(self.parts))] for g in range(slots)]

    def read_into(self, layer: int, expert: int, out: np.ndarray) -> None:
        for part, array in zip(self.parts, self.arrays[expert]):
            out[part.offset: part.offset + part.nbytes] = np.ascontiguousarray(array).view(np.uint8).ravel()


@pytest.mark.parametrize("dtype", GROUPS)
def test_expert_launch_kernel_matches_the_mindspore_fallback(dtype):
    """A whole ExpertLaunch as one kernel call (gather, experts read from the pool by slot, weighted
    scatter-add) against the same Cell on MindSpore's operators: tokens chosen by several slots, a slot
    with no rows, padding rows naming a token with weight 0 (as the dispatcher sends them), experts in
    slots out of order in a pool larger than the launch, to FP32 rounding; each in both memory models'
    pool layouts, which give the kernel's result bit for bit."""
    rng = np.random.default_rng(13)
    tokens, hidden, intermediate, capacity, counts = 9, 37, 10, 5, np.array([5, 0, 2], np.int32)
    rows = rng.integers(0, tokens, (3, capacity)).astype(np.int32)
    rows[0], rows[2, :2] = [4, 0, 8, 1, 2], [4, 8]  # tokens 4 and 8 in two slots each
    scale = rng.uniform(0.1, 1, (3, capacity)).astype(np.float32)
    scale[np.arange(capacity)[None, :] >= counts[:, None]] = 0
    weights, _ = expert_weights(rng, dtype, 5, hidden, intermediate)
    source = SlotBlocks(dtype, weights, 5, hidden, intermediate)
    slots = np.array([4, 0, 2], np.int32)  # the launch's experts sit in these slots of a pool of 5
    inputs = [rng.standard_normal((tokens, hidden)).astype(np.float32) for _ in range(2)] + [rows, scale, counts, slots]
    offsets = part_offsets(source.parts, source.block_bytes)
    kernel = ExpertLaunch(GROUPS[dtype](3, intermediate), hidden, offsets)
    fallback = ExpertLaunch(GROUPS[dtype](3, intermediate), hidden, offsets)
    fallback.use_kernel = fallback.group.use_kernel = False  # the operators, multiplying in FP32 as the CPU does
    assert kernel.use_kernel, "the kernel library did not build"
    results = {}
    for memory in MODELS:
        pool = DeviceMemory(memory).expert_pool(source, 5)
        for g in range(5):
            pool.fill(g, 0, g)
        pool.commit()
        args = [ms.Tensor(a) for a in inputs] + list(pool.tensors)
        ours, theirs = results[memory] = tuple(cell(*args).asnumpy() for cell in (kernel, fallback))
        assert np.abs(theirs - inputs[0]).max() > 1, "the experts added something"
        np.testing.assert_array_equal(ours[[3, 5, 6, 7]], inputs[0][[3, 5, 6, 7]])  # tokens no slot row carries
        assert np.abs(ours - theirs).max() <= 1e-5 * np.abs(theirs).max()
    np.testing.assert_array_equal(results["shared"][0], results["apart"][0])
    np.testing.assert_array_equal(results["shared"][1], results["apart"][1])


def test_host_kernels_reject_inputs_that_do_not_fit():
    host = host_kernels()
    x = np.zeros((2, 3, 16), np.float32)
    counts = np.full(2, 3, np.int32)
    weights = [np.zeros((8, 16), np.float16)] * 2 + [np.zeros((16, 4), np.float16), np.zeros((16, 5), np.float16)]
    with pytest.raises(ValueError, match=r"down\[1\]: expected float16 \(16, 4\), got float16 \(16, 5\)"):
        host.expert_group(x, counts, weights)
    with pytest.raises(ValueError, match="weights of dtype"):
        host.expert_group(x, counts, [w.astype(np.float64) for w in weights])


def test_host_kernels_are_none_when_switched_off(monkeypatch):
    monkeypatch.setenv("FERRY_CPU_KERNELS", "0")
    kernel_build.compiled.cache_clear()
    host_kernels.cache_clear()
    try:
        assert host_kernels() is None
    finally:
        monkeypatch.undo()
        kernel_build.compiled.cache_clear()
        host_kernels.cache_clear()
    assert host_kernels() is not None


def test_build_is_cached_per_cpu(tmp_path):
    first = build(tmp_path)
    stamp = first.stat().st_mtime_ns
    assert build(tmp_path) == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in first.parent.iterdir()] == ["libferry_cpu.so"]
    compiler = shutil.which("g++")
    assert first.parent.name == cache_key(compiler, cpu_features())
    assert "avx2" in cpu_features().split()
    assert cache_key(compiler, cpu_features() + " avx512f") != first.parent.name


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


def python(*args: str, **env: str) -> str:
    """The last line printed by `python args` in a fresh process with `env` set (it must succeed)."""
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **env})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.splitlines()[-1]


def engine_logits(model_dir: Path, ids: list[int], source: str = "checkpoint", **env: str) -> np.ndarray:
    """Logits of a 20-token prefill and 4 decode steps, from a fresh process with `env` set."""
    return np.array(json.loads(python("-c", RUN_ENGINE, str(model_dir), json.dumps(ids), source, **env)), np.float32)


def assert_no_machine_paths(graph: Path, *paths: Path) -> None:
    """An exported graph names the kernel library by its variable, never by a path of this machine."""
    data = graph.read_bytes()
    assert b"libferry_cpu" not in data, f"{graph.name} names the kernel library file"
    for path in paths:
        assert str(path).encode() not in data, f"{graph.name} holds the path {path}"


def test_exported_graphs_run_with_the_kernels_built_elsewhere(tmp_path):
    """Exported with kernel cache A, then run in a process whose cache B is empty (A removed): each
    storage format's expert group finds the library B builds, and computes what numpy does."""
    graphs, cache_a, cache_b = tmp_path / "graphs", tmp_path / "a", tmp_path / "b"
    graphs.mkdir()
    rng = np.random.default_rng(3)
    counts, exact = [5, 2], {}
    for dtype in GROUPS:
        x = rng.standard_normal((2, 5, 37)).astype(np.float32)
        weights, exact[dtype] = expert_weights(rng, dtype, 2, 37, 10)
        np.savez(graphs / dtype, x, np.array(counts, np.int32), *weights)
        exact[dtype] = [expert_reference(x[g, :count], *exact[dtype][g]) for g, count in enumerate(counts)]
    python("-c", EXPORT_OR_LOAD, str(graphs), "export", FERRY_CACHE=str(cache_a))
    assert list(cache_a.rglob("*.so")), "the export used the kernel library"
    shutil.rmtree(cache_a)
    outputs = json.loads(python("-c", EXPORT_OR_LOAD, str(graphs), "load", FERRY_CACHE=str(cache_b)))
    assert list(cache_b.rglob("*.so")), "the load built the kernel library in its own cache"
    for dtype in GROUPS:
        assert_no_machine_paths(graphs / f"{dtype}.mindir", tmp_path, Path.home())
        ours = np.array(outputs[dtype], np.float32)  # [G, C, H]
        for g, count in enumerate(counts):
            np.testing.assert_allclose(ours[g, :count], exact[dtype][g], rtol=1e-4, atol=1e-4 * np.sqrt(37))
            assert not ours[g, count:].any()


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


def test_artifact_loads_with_another_kernel_cache(tiny, tmp_path):
    """An artifact converted with kernel cache A runs from a process whose cache B is empty, A removed:
    loading builds the library in B (runtime/exported.py)."""
    model_dir, ids, reference = tiny
    cache_a, cache_b = tmp_path / "a", tmp_path / "b"
    python("-m", "convert", "--model-dir", str(model_dir), "--out", str(tmp_path / "artifact"),
           FERRY_CACHE=str(cache_a))
    assert list(cache_a.rglob("*.so")), "convert on the CPU exports expert groups that call the kernel library"
    shutil.rmtree(cache_a)
    for graph in (tmp_path / "artifact").rglob("*.mindir"):
        assert_no_machine_paths(graph, tmp_path, Path.home())
    ours = engine_logits(tmp_path / "artifact", ids, "artifact", FERRY_CACHE=str(cache_b))
    assert list(cache_b.rglob("*.so")), "the kernel library was not built in the loading process's cache"
    assert np.abs(ours - reference).max() <= 1e-4


# A decode step through one layer: value heads twice the key heads (each key head serves two), widths
# that are not multiples of 8, an expert count above top-k.
DECODE_SPEC = ModelSpec(
    vocab_size=50, hidden_size=44, num_layers=2, layer_types=("linear_attention", "full_attention"), rms_norm_eps=1e-6,
    tie_word_embeddings=False, num_attention_heads=4, num_key_value_heads=2, head_dim=12, rotary_dim=6,
    rope_theta=1e4, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=12,
    linear_value_head_dim=10, linear_conv_kernel_dim=4, num_experts=9, num_experts_per_tok=3,
    moe_intermediate_size=16, shared_expert_intermediate_size=20, eos_token_ids=())


def layer_weights(rng, layer: int, order: tuple[str, ...], matrices: str) -> list:
    """The layer's weights in `order`, its matrices (artifact.dense.MATRICES) in `matrices`."""
    names = layer_names(DECODE_SPEC, layer)
    return [ms.Tensor((0.4 * rng.standard_normal(names[key].shape)).astype(matrices if key in MATRICES else np.float32))
            for key in order]


def kernel_and_operators(make, monkeypatch):
    """The Cell `make()` builds with Ferry's kernel, and the same CPU graph on MindSpore's operators
    (what FERRY_CPU_KERNELS=0 builds: FP16 weights widened to FP32 where they multiply)."""
    kernel = make()
    with monkeypatch.context() as switched_off:
        switched_off.setenv("FERRY_CPU_KERNELS", "0")
        kernel_build.compiled.cache_clear()
        operators = make()
    kernel_build.compiled.cache_clear()
    assert kernel.use_kernel and not operators.use_kernel, "the kernel library did not build"
    return kernel, operators


def assert_step_agrees(ours, theirs) -> None:
    """Float outputs agree to FP32 rounding (both sum FP32 products, in different orders), the
    router's choice exactly."""
    for mine, reference in zip(ours, theirs):
        mine, reference = mine.asnumpy(), reference.asnumpy()
        if reference.dtype == np.int32:
            np.testing.assert_array_equal(mine, reference)
        else:
            np.testing.assert_allclose(mine, reference, rtol=1e-5, atol=1e-5 * max(np.abs(reference).max(), 1.0))


@pytest.mark.parametrize("matrices", ["float32", "float16"])
def test_deltanet_decode_kernel_matches_the_operators(matrices, monkeypatch):
    """Four decode steps through a DeltaNet layer, states fed back: `FerryDeltaNetDecode` and the
    graph's operators give the same outputs and states; a padding step (n_valid 0) leaves the
    recurrent state as it was."""
    rng = np.random.default_rng(11)
    weights = layer_weights(rng, 0, DELTANET_WEIGHTS, matrices)
    kernel, operators = kernel_and_operators(lambda: DeltaNetLayer(DECODE_SPEC, 1), monkeypatch)
    c, v = DECODE_SPEC.conv_dim, DECODE_SPEC.linear_num_value_heads
    conv = ms.Tensor(rng.standard_normal((3, c)).astype(np.float32))
    recurrent = ms.Tensor(rng.standard_normal((v, 12, 10)).astype(np.float32))
    states = {"kernel": (conv, recurrent), "operators": (conv, recurrent)}
    for step, real in enumerate((1, 1, 0, 1)):
        h = ms.Tensor(rng.standard_normal((1, 44)).astype(np.float32))
        n_valid = ms.Tensor(real, ms.int32)
        ours = kernel(h, *states["kernel"], n_valid, *weights)
        theirs = operators(h, *states["operators"], n_valid, *weights)
        assert_step_agrees(ours, theirs)
        if not real:
            np.testing.assert_array_equal(ours[5].asnumpy(), states["kernel"][1].asnumpy())
        states = {"kernel": ours[4:], "operators": theirs[4:]}


@pytest.mark.parametrize("matrices", ["float32", "float16"])
def test_attention_decode_kernel_matches_the_operators(matrices, monkeypatch):
    """Three decode steps through an attention layer over a cache already holding 5 tokens:
    `FerryAttentionDecode` and the graph's operators give the same outputs and write the same key and
    value rows into their caches, in place."""
    rng = np.random.default_rng(12)
    weights = layer_weights(rng, 1, ATTENTION_WEIGHTS, matrices)
    kernel, operators = kernel_and_operators(lambda: AttentionLayer(DECODE_SPEC, 1), monkeypatch)
    filled = np.zeros((9, 2, 12), np.float32)
    filled[:5] = rng.standard_normal((5, 2, 12))
    caches = {name: (ms.Tensor(filled.copy()), ms.Tensor(filled[..., ::-1].copy())) for name in ("kernel", "operators")}
    for position in (5, 6, 7):
        h = ms.Tensor(rng.standard_normal((1, 44)).astype(np.float32))
        angles = position * rng.uniform(0.1, 1.0, 3)
        cos = ms.Tensor(np.cos(np.tile(angles, 2)).reshape(1, 6).astype(np.float32))
        sin = ms.Tensor(np.sin(np.tile(angles, 2)).reshape(1, 6).astype(np.float32))
        cache_len = ms.Tensor(position, ms.int32)
        ours = kernel(h, cos, sin, *caches["kernel"], cache_len, *weights)
        theirs = operators(h, cos, sin, *caches["operators"], cache_len, *weights)
        assert_step_agrees(ours, theirs)
        for mine, reference in zip(caches["kernel"], caches["operators"]):
            np.testing.assert_allclose(mine.asnumpy()[: position + 1], reference.asnumpy()[: position + 1],
                                       rtol=1e-5, atol=1e-5)
            assert np.abs(mine.asnumpy()[position]).max() > 0, "the token's row was not written into the cache"


@pytest.mark.parametrize("matrices", ["float32", "float16"])
def test_last_head_kernel_matches_the_operators(matrices, monkeypatch):
    rng = np.random.default_rng(13)
    h = ms.Tensor(rng.standard_normal((3, 44)).astype(np.float32))
    norm = ms.Tensor(rng.standard_normal(44).astype(np.float32))
    head = ms.Tensor(rng.standard_normal((50, 44)).astype(matrices))
    kernel, operators = kernel_and_operators(lambda: LastHead(1e-6), monkeypatch)
    for row in (0, 2):
        index = ms.Tensor(np.array([row], np.int32))
        assert_step_agrees(kernel(h, index, norm, head), operators(h, index, norm, head))


def test_artifact_cache_keys_by_kernel_version(monkeypatch):
    """run.py's artifact cache converts again when the kernels the graphs call change (an artifact of
    other kernels would be refused at load, runtime.exported.check_kernels); a card's graphs call none."""
    from convert import cache
    from convert.pipeline import ConvertOptions

    options = ConvertOptions()
    mine = cache.options_key(options)
    assert mine["kernels"] == kernel_build.VARIABLE
    assert cache.options_key(ConvertOptions("fp16", target="ascend_310p3"))["kernels"] is None
    monkeypatch.setattr(cache, "kernels_called", lambda target: "FERRY_CPU_LIBRARY_0123456789abcdef")
    assert cache.options_key(options) != mine
