"""The host cost of one graph launch, by call path and input count, on this machine.

    python -m bench.launch_overhead [--inputs 2,8,16,32] [--rounds 5] [--calls 300]

A graph summing `n` [1, 8] inputs in one kernel (`AddN`, a few microseconds) is called
through each path MindSpore 2.10 offers a loaded or compiled graph, taking turns within each round;
printed: the median microseconds per call over the rounds, and every round.

- `Cell`: the Cell itself in graph mode (what `runtime.graph_set.CellGraphs` hands out);
- `GraphCell`: the exported MindIR loaded as `nn.GraphCell` and called (what Ferry did before);
- `GraphLaunch`: Ferry's launch of an artifact graph (`runtime.exported`): the manifest signature
  checked, then MindSpore's graph executor called under the phase the first call compiled;
- `executor`: that executor call alone, without the signature check.

`Cell.__call__` recomputes on every call what the executor needs once: the arguments' key, the
compile-cache lookup, the JIT config; that is most of a launch's host cost. On a card every launch
pays it on top of the kernel launches, so it bounds decode at 40 layers x 2 launches per token.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def timed_us(call, calls: int) -> float:
    for _ in range(20):
        call()
    start = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - start) / calls * 1e6


def contenders(count: int, scratch: Path) -> dict:
    import mindspore as ms
    from mindspore import nn, ops

    from artifact.manifest import FileRecord, GraphRecord, TensorSig
    from runtime.exported import GraphLaunch

    class Sum(nn.Cell):
        def construct(self, *inputs):
            return ops.addn(inputs)  # one kernel, whatever n

    args = [ms.Tensor(np.ones((1, 8), np.float32)) for _ in range(count)]
    cell = Sum()
    cell(*args).asnumpy()
    path = scratch / f"sum{count}"
    ms.export(Sum(), *args, file_name=str(path), file_format="MINDIR")
    loaded = nn.GraphCell(ms.load(f"{path}.mindir"))
    loaded(*args).asnumpy()
    sigs = tuple(TensorSig((1, 8), "float32") for _ in args)
    record = GraphRecord(f"sum{count}", "head", 1, None, FileRecord("x", 0, ""), sigs, (TensorSig((1, 8), "float32"),))
    launch = GraphLaunch(nn.GraphCell(ms.load(f"{path}.mindir")), record)
    launch(*args).asnumpy()
    run, packed = launch.run, tuple(args)
    return {"Cell": lambda: cell(*args), "GraphCell": lambda: loaded(*args),
            "GraphLaunch": lambda: launch(*args), "executor": lambda: run(packed)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", default="2,8,16,32")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args()
    from runtime.backend import configure

    configure()
    counts = [int(n) for n in args.inputs.split(",")]
    with tempfile.TemporaryDirectory() as scratch:
        paths = {n: contenders(n, Path(scratch)) for n in counts}
        rounds = {(n, name): [] for n in counts for name in paths[counts[0]]}
        for _ in range(args.rounds):
            for n in counts:
                for name, call in paths[n].items():
                    rounds[n, name].append(timed_us(call, args.calls))
    print(f"microseconds per launch of a graph summing n [1, 8] inputs; median of {args.rounds} rounds "
          f"({args.calls} calls each), then every round")
    for n in counts:
        for name in paths[n]:
            times = rounds[n, name]
            print(f"  n={n:3} {name:12} {statistics.median(times):7.0f}   "
                  + " ".join(f"{t:.0f}" for t in times))


if __name__ == "__main__":
    main()
