"""`ExportedGraphs`: the `GraphSet` of an artifact, MindIR graphs run through `nn.GraphCell`.

Legend: T tokens in a launch, G slots and C capacity of a tier.
A graph file is loaded (`mindspore.load`) the first time its shape is asked for and compiled on
its first call, then kept (per process, by checksum: identical graphs of two artifacts load once).
Each launch's arguments are checked against the signature the manifest records, so a wrong shape
fails naming the graph and the input instead of deep inside MindSpore.

After its first call a graph is run by MindSpore's graph executor directly, under the phase that
call compiled: `Cell.__call__` recomputes on every call what the executor needs once (the
arguments' key, the compile-cache lookup, the JIT config), most of a launch's host cost
(`python -m bench.launch_overhead`). The executor is MindSpore 2.10's (setup.cfg pins it); where it
is not found, every call goes through `GraphCell.__call__`.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import nn

try:
    from mindspore.graph.api import _cell_graph_executor

    _EXECUTOR = _cell_graph_executor._graph_executor  # runs a compiled phase: executor(args, phase)
except (ImportError, AttributeError):
    _EXECUTOR = None

from artifact.reader import Artifact
from kernels.build import VARIABLE, compiled
from artifact.manifest import ANY, ArtifactError, GraphRecord, TierRecord
from artifact.store import part_offsets
from graphs.moe import GROUPS, ExpertLaunch
from offload.tiers import Tier

_DTYPES = {"float32": ms.float32, "float16": ms.float16, "int8": ms.int8, "int32": ms.int32}
# Loaded graphs by file SHA-256: artifacts sharing a graph (one model in several storage formats)
# load and compile it once per process. A graph holds no weights, so sharing it is safe.
_CELLS: dict[str, nn.GraphCell] = {}


def check_kernels(artifact: Artifact) -> None:
    """Expert-group graphs that call Ferry's CPU kernels find the library through the environment
    variable the manifest names (kernels/build.py): build the library for this machine and set it,
    or refuse, saying why, an artifact whose graphs call kernels this Ferry cannot provide."""
    wanted = artifact.manifest.kernels
    if wanted is None:
        return
    where = artifact.root / "manifest.json"
    if wanted != VARIABLE:
        raise ArtifactError(f"{where}: its graphs call Ferry's CPU kernels of another source version ({wanted}; this "
                            f"Ferry's are {VARIABLE}): re-run `python -m convert` with this Ferry")
    if compiled() is None:
        raise ArtifactError(f"{where}: its graphs call Ferry's CPU kernels, which are unavailable here "
                            f"(FERRY_CPU_KERNELS=0, or no C++ compiler with AVX2/FMA/F16C: see the warning above); "
                            f"convert again with FERRY_CPU_KERNELS=0 for graphs of MindSpore's operators only")


class GraphLaunch:
    """One graph (a loaded `GraphCell`, or a Cell the runtime builds); calling it checks the arguments
    against the manifest's signature (a dimension ANY takes any size) and runs it."""

    def __init__(self, cell: nn.Cell, record: GraphRecord):
        self.cell, self.record = cell, record
        self.signature = tuple((tuple(s.shape), _DTYPES[s.dtype]) for s in record.inputs)
        # inputs with a dimension ANY (the expert pool): a Cell compiles anew for each size they come in
        self._sized = tuple(i for i, (shape, _) in enumerate(self.signature) if ANY in shape)
        self._phases: dict[tuple, str] = {}  # compiled phase by the sizes of those inputs

    def __call__(self, *args):
        if len(args) != len(self.signature):
            raise ValueError(f"graph {self.record.name} takes {len(self.signature)} inputs, got {len(args)}")
        for index, (arg, (shape, dtype)) in enumerate(zip(args, self.signature)):
            if arg.dtype != dtype or len(arg.shape) != len(shape) or any(
                    want not in (ANY, got) for got, want in zip(arg.shape, shape)):
                raise ValueError(f"graph {self.record.name} input {index}: expected {dtype} {shape}, "
                                 f"got {arg.dtype} {tuple(arg.shape)}")
        return self.run(args)

    def run(self, args: tuple):
        """Run on arguments of the signature (unchecked): the first call at given sizes compiles the graph
        (or finds it compiled, for a graph shared with another artifact) through `Cell.__call__`."""
        sizes = tuple(tuple(args[i].shape) for i in self._sized)
        phase = self._phases.get(sizes)
        if phase is not None:
            return _EXECUTOR(args, phase)
        outputs = self.cell(*args)
        if _EXECUTOR is not None:
            self._phases[sizes] = self.cell.compile_phase
        return outputs


class ExportedGraphs:
    """Implements `runtime.graph_set.GraphSet` from an artifact's graph files."""

    def __init__(self, artifact: Artifact):
        check_kernels(artifact)
        self.artifact = artifact
        self.manifest = artifact.manifest
        self._loaded: dict[str, GraphLaunch] = {}

    def _launch(self, record: GraphRecord) -> GraphLaunch:
        launch = self._loaded.get(record.name)
        if launch is None and record.file is None:  # a kernel expert group: built here (GraphRecord.file)
            spec = self.manifest.model
            group = GROUPS[self.manifest.experts.dtype](record.tier.group, spec.moe_intermediate_size)
            store = self.manifest.experts
            offsets = part_offsets(store.parts, store.block_bytes)
            launch = self._loaded[record.name] = GraphLaunch(ExpertLaunch(group, spec.hidden_size, offsets), record)
        elif launch is None:
            path = self.artifact.path_of(record.file.path, f"graph {record.name}")
            if not path.is_file():
                raise ArtifactError(f"{path}: graph file of {record.name} is missing")
            cell = _CELLS.get(record.file.sha256)
            if cell is None:
                cell = _CELLS[record.file.sha256] = nn.GraphCell(ms.load(str(path)))
            launch = GraphLaunch(cell, record)
            self._loaded[record.name] = launch
        return launch

    def attention(self, tokens: int) -> GraphLaunch:
        return self._launch(self.manifest.graph("attention", tokens))

    def deltanet(self, tokens: int) -> GraphLaunch:
        return self._launch(self.manifest.graph("deltanet", tokens))

    def embedding(self, tokens: int) -> GraphLaunch:
        return self._launch(self.manifest.graph("embedding", tokens))

    def head(self, tokens: int) -> GraphLaunch:
        return self._launch(self.manifest.graph("head", tokens))

    def last_head(self, tokens: int) -> GraphLaunch:
        return self._launch(self.manifest.graph("last_head", tokens))

    def expert_group(self, tier: Tier, tokens: int) -> GraphLaunch:
        return self._launch(self.manifest.graph("expert_group", tokens, TierRecord(tier.capacity, tier.group)))
