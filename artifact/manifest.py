"""`manifest.json`: what an artifact directory holds, as versioned typed records validated on load.

An artifact may come from a stranger, so the manifest is data read with `json` into frozen
dataclasses whose every field is type-checked (an error names the field's path), then checked
for sense: the format and version, paths that stay inside the artifact directory, graphs for every
bucket and tier, one expert block per (layer, expert) with the layout the expert graph consumes.
Nothing in an artifact is ever unpickled or executed.

Legend: L layers, E experts per layer, G slots and C capacity of a tier, T launch tokens.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from model.spec import CheckpointError, ModelSpec

FORMAT = "ferry-artifact"
DIGEST_KEY = "manifest_sha256"
VERSION = 9  # 2: expert-group graphs take the real rows of each slot after x; 3: target, kernels, dense dtypes;
# 4: the manifest carries its own digest, and the tokenizer files; 5: attention graphs write their keys and
# values into the KV cache in place (`kv_cache_rows` rows) instead of returning them; 6: the head graphs
# also return each row's greedy choice; 7: expert groups per (tier, launch size) gather their rows from the
# layer's MoE input and add their outputs to its hidden state on the device; `last_head` graphs; 8: a cpu
# artifact with fp16 or int8 experts stores its dense matrices in FP16; 9: expert groups read their experts
# from the device's expert pool by slot index (pool dimensions ANY), and a cpu artifact's kernel expert groups
# have no MindIR file
TOKENIZER_DIR = "tokenizer"
# Copied from the checkpoint when present: an artifact alone can then take a text prompt and a chat.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
MANIFEST_NAME = "manifest.json"
EXPERT_DTYPES = ("fp32", "fp16", "int8")
# What the graphs are for: `cpu` computes in FP32 (MindSpore's CPU kernels, Ferry's CPU expert kernel);
# `ascend_310p3` has no BF16 and no CPU op: FP16 matmuls over FP16 weights and KV cache, FP16 or INT8 experts.
TARGETS = ("cpu", "ascend_310p3")
GRAPH_KINDS = ("embedding", "head", "last_head", "attention", "deltanet", "expert_group")
TENSOR_DTYPES = ("float32", "float16", "int8", "int32")  # numpy names


def kv_cache_rows(max_context: int, largest_launch: int) -> int:
    """Rows of each KV cache: the context, plus room for a launch's padding rows, which the attention
    graph writes (masked, and overwritten by the next launch) past the last real token."""
    return max_context + largest_launch


class ArtifactError(CheckpointError):
    """An artifact directory is not what Ferry expects; the message names the file and the culprit."""


class ManifestError(ArtifactError):
    """`manifest.json` is malformed or inconsistent; the message names the field."""


class ManifestVersionError(ManifestError):
    """The manifest is of another format version than this Ferry reads."""


class UnsafePathError(ManifestError):
    """A manifest path is absolute, climbs out with `..`, or resolves (via a symlink) outside the artifact."""


ANY = -1  # a dimension of any size: the expert pool's slots and row length are the run's, not the graph's


@dataclass(frozen=True)
class TensorSig:
    """Shape and numpy dtype of one graph input or output; a dimension ANY takes any size."""

    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class FileRecord:
    """A file of the artifact: its path relative to the artifact directory, size and SHA-256."""

    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class TierRecord:
    capacity: int  # C: token rows per slot
    group: int  # G: slots per launch


@dataclass(frozen=True)
class GraphRecord:
    """One graph of the artifact. Layer graphs serve every layer of their kind (weights are inputs)."""

    name: str
    kind: str  # one of GRAPH_KINDS
    tokens: int  # T of a launch
    tier: TierRecord | None  # an expert group's slots and capacity [G, C]; None for other graphs
    # the exported MindIR; None for an expert group that calls Ferry's CPU kernels: MindSpore 2.10 cannot
    # load a graph whose AOT custom op takes a dynamic-shape input (the expert pool), so the runtime
    # builds the same Cell (`graphs.moe.ExpertLaunch`) and checks it against this record's signature
    file: FileRecord | None
    inputs: tuple[TensorSig, ...]
    outputs: tuple[TensorSig, ...]


@dataclass(frozen=True)
class DenseTensor:
    name: str  # "embed", "final_norm", "lm_head" or "layers.{i}.{canonical name}"
    shape: tuple[int, ...]
    dtype: str  # float32, or float16 for the projection matrices (artifact.dense.dense_dtype)


@dataclass(frozen=True)
class DenseRecord:
    """Every weight that is not a routed expert, in one safetensors file, resident at run time."""

    file: FileRecord
    tensors: tuple[DenseTensor, ...]
    tied_head: bool  # lm_head is not stored: the head reads `embed`


@dataclass(frozen=True)
class BlockPart:
    """One array inside an expert block, at `offset` bytes from the block's start."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        size = {"float32": 4, "float16": 2, "int8": 1, "int32": 4}[self.dtype]
        for dim in self.shape:
            size *= dim
        return size


@dataclass(frozen=True)
class ExpertBlock:
    layer: int
    expert: int
    offset: int  # bytes from the start of the store file
    sha256: str  # of the block's `block_bytes` bytes


@dataclass(frozen=True)
class StorageReport:
    """What storing the experts in `dtype` did to their values (all experts of all layers)."""

    dtype: str
    values: int  # weights converted
    nonzero_to_zero: int  # nonzero weights stored as zero (FP16 underflow, INT8 rounding)
    overflow: int  # |w| above the FP16 maximum, stored as +-65504 (FP16 only)
    subnormal: int  # weights stored as FP16 subnormals, with fewer significant bits (FP16 only)
    zero_channels: int  # all-zero output channels, given scale 1 (INT8 only)
    max_abs: float  # largest |w| in the source
    relative_rms_error: float  # ||w - stored|| / ||w|| over all experts
    worst_layer: int  # the expert block with the largest relative RMS error
    worst_expert: int
    worst_relative_rms_error: float
    handling: str  # how out-of-range values were treated, in words


@dataclass(frozen=True)
class ExpertStoreRecord:
    """The expert store: one block per (layer, expert), `stride` bytes apart, each `alignment`-aligned.

    Every block has the same `parts`, the inputs of one slot of the expert-group graph for `dtype`
    (fp32/fp16: gate_up [2I, H], down [H, I]; int8 adds gate_up_scale [2I] and down_scale [H]).
    """

    path: str
    size: int
    dtype: str  # one of EXPERT_DTYPES
    alignment: int
    block_bytes: int
    stride: int
    parts: tuple[BlockPart, ...]
    blocks: tuple[ExpertBlock, ...]
    report: StorageReport


@dataclass(frozen=True)
class SourceRecord:
    """Where the artifact came from: the checkpoint directory's name and its config.json's SHA-256."""

    name: str
    config_sha256: str


@dataclass(frozen=True)
class Manifest:
    model: ModelSpec
    source: SourceRecord
    max_context: int  # S: the KV-cache length every attention graph was exported with
    buckets: tuple[int, ...]  # prefill launch sizes; decode (1 token) always has graphs too
    tiers: tuple[TierRecord, ...]
    graphs: tuple[GraphRecord, ...]
    dense: DenseRecord
    experts: ExpertStoreRecord
    target: str  # one of TARGETS: the device the graphs were exported for
    kernels: str | None  # the environment variable naming Ferry's CPU kernel library the graphs call; None: none
    tokenizer: tuple[FileRecord, ...]  # the checkpoint's tokenizer files, under TOKENIZER_DIR; may be empty
    format: str = FORMAT
    version: int = VERSION
    created_by: str = field(default="ferry")

    # -- lookups --------------------------------------------------------------------------------
    def graph(self, kind: str, tokens: int, tier: TierRecord | None = None) -> GraphRecord:
        for record in self.graphs:
            if record.kind == kind and record.tokens == tokens and record.tier == tier:
                return record
        def described(t, tier):
            return f"{t} tokens" + ("" if tier is None else f", capacity {tier.capacity}, group {tier.group}")

        have = sorted(described(r.tokens, r.tier) for r in self.graphs if r.kind == kind)
        want = described(tokens, tier)
        raise ArtifactError(f"artifact has no {kind} graph for {want} (it has: {', '.join(have) or 'none'})")

    def launch_sizes(self) -> tuple[int, ...]:
        return (1,) + tuple(t for t in self.buckets if t != 1)

    # -- JSON -----------------------------------------------------------------------------------
    def to_json(self) -> str:
        body = dataclasses.asdict(self)
        return json.dumps({**body, DIGEST_KEY: manifest_digest(body)}, indent=1)

    @classmethod
    def from_json(cls, text: str, source: str = MANIFEST_NAME) -> "Manifest":
        try:
            data = json.loads(text, parse_constant=_reject_constant)
        except (json.JSONDecodeError, ValueError) as err:
            raise ManifestError(f"{source}: not valid JSON ({err})") from None
        if not isinstance(data, dict):
            raise ManifestError(f"{source}: top level is not a JSON object")
        if data.get("format") != FORMAT:
            raise ManifestError(f"{source}: 'format' is {data.get('format')!r}, expected {FORMAT!r}: not a Ferry artifact")
        if data.get("version") != VERSION:
            raise ManifestVersionError(
                f"{source}: manifest version {data.get('version')!r}, this Ferry reads version {VERSION}; "
                f"re-run `python -m convert` to rebuild the artifact"
            )
        recorded = data.pop(DIGEST_KEY, None)
        if recorded != manifest_digest(data):
            raise ManifestError(f"{source}: its contents do not match the {DIGEST_KEY} recorded by the convert "
                                f"({'missing' if recorded is None else 'edited or damaged since'}); nothing in it can "
                                f"be trusted: re-run `python -m convert` to rebuild the artifact")
        manifest = _decode(cls, data, source, "")
        manifest.validate(source)
        return manifest

    # -- sense checks ---------------------------------------------------------------------------
    def validate(self, source: str = MANIFEST_NAME) -> None:
        """Everything the types cannot say; the first problem found is raised, naming its field."""
        from artifact.dense import dense_plan  # the layouts are defined beside their writers
        from artifact.store import block_layout

        def fail(message: str):
            raise ManifestError(f"{source}: {message}")

        spec = self.model
        if self.target not in TARGETS:
            fail(f"target is {self.target!r}, expected one of {TARGETS}")
        if self.kernels is not None and (self.target != "cpu" or not self.kernels.startswith("FERRY_CPU_LIBRARY_")):
            fail(f"kernels is {self.kernels!r}: only cpu artifacts call Ferry's CPU kernels (FERRY_CPU_LIBRARY_<hash>)")
        if self.target != "cpu" and self.experts.dtype == "fp32":
            fail(f"a {self.target} artifact stores its experts as fp16 or int8, not fp32")
        if len(spec.layer_types) != spec.num_layers:
            fail(f"model.layer_types has {len(spec.layer_types)} entries for {spec.num_layers} layers")
        if self.max_context < 1:
            fail(f"max_context must be positive, got {self.max_context}")
        if list(self.buckets) != sorted(set(self.buckets)) or any(b < 2 for b in self.buckets):
            fail(f"buckets must be sorted, distinct and above 1, got {list(self.buckets)}")
        capacities = [t.capacity for t in self.tiers]
        if not self.tiers or capacities != sorted(set(capacities)) or any(
                t.capacity < 1 or t.group < 1 for t in self.tiers):
            fail(f"tiers must be non-empty, positive and sorted by distinct capacity, got {capacities}")
        for where, path in self.paths():
            check_relative(path, f"{source}: {where}")

        names = [g.name for g in self.graphs]
        if len(set(names)) != len(names):
            fail("two graphs share a name")
        files = [g.file.path for g in self.graphs if g.file] + [self.dense.file.path, self.experts.path]
        if len(set(files)) != len(files):
            fail("two entries share a file path")
        for i, g in enumerate(self.graphs):
            if g.kind not in GRAPH_KINDS:
                fail(f"graphs[{i}].kind is {g.kind!r}, expected one of {GRAPH_KINDS}")
            if (g.kind == "expert_group") != (g.tier is not None) or not isinstance(g.tokens, int) or g.tokens < 1:
                fail(f"graphs[{i}] ({g.name}): every graph has a launch size (tokens >= 1), an expert_group a tier too, "
                     "other graphs no tier")
            if g.file is None and (g.kind != "expert_group" or self.kernels is None):
                fail(f"graphs[{i}] ({g.name}): only the expert groups of an artifact whose graphs call Ferry's CPU "
                     "kernels have no file")
            for sig in g.inputs + g.outputs:
                if sig.dtype not in TENSOR_DTYPES or any(d < 0 and d != ANY for d in sig.shape) or (
                        ANY in sig.shape and g.kind != "expert_group"):
                    fail(f"graphs[{i}] ({g.name}): bad tensor signature {sig}")
        kinds = {"embedding", "head", "last_head"} | {"attention" if k == "full_attention" else "deltanet"
                                                      for k in spec.layer_types}
        for tokens in self.launch_sizes():
            for kind in sorted(kinds):
                self._require_graph(kind, tokens, None, source)
            for tier in self.tiers:
                self._require_graph("expert_group", tokens, tier, source)

        if self.dense.tied_head != spec.tie_word_embeddings or self.dense.tensors != tuple(
                dense_plan(spec, self.target, self.experts.dtype)):
            fail("dense.tensors are not the dense weights of the model in 'model' (names, shapes, dtypes or tied head differ)")

        store = self.experts
        if store.dtype not in EXPERT_DTYPES:
            fail(f"experts.dtype is {store.dtype!r}, expected one of {EXPERT_DTYPES}")
        if store.alignment < 1 or store.alignment & (store.alignment - 1):
            fail(f"experts.alignment must be a power of two, got {store.alignment}")
        expected = block_layout(spec, store.dtype)
        if store.parts != expected:
            fail(f"experts.parts {store.parts} differ from the {store.dtype} layout the expert graph takes {expected}")
        if store.block_bytes != max(p.offset + p.nbytes for p in store.parts):
            fail(f"experts.block_bytes {store.block_bytes} does not match its parts")
        if store.stride < store.block_bytes or store.stride % store.alignment:
            fail(f"experts.stride {store.stride} must hold a block and be a multiple of the alignment")
        count = spec.num_layers * spec.num_experts
        if len(store.blocks) != count:
            fail(f"experts.blocks has {len(store.blocks)} entries, expected {count} (layers x experts)")
        seen = set()
        for i, block in enumerate(store.blocks):
            key = (block.layer, block.expert)
            if not (0 <= block.layer < spec.num_layers and 0 <= block.expert < spec.num_experts) or key in seen:
                fail(f"experts.blocks[{i}] is layer {block.layer} expert {block.expert}: out of range or repeated")
            seen.add(key)
            if block.offset % store.alignment or block.offset < 0 or block.offset + store.block_bytes > store.size:
                fail(f"experts.blocks[{i}] (layer {block.layer} expert {block.expert}) has offset {block.offset}: "
                     f"unaligned or past the {store.size}-byte store")
        offsets = sorted(b.offset for b in store.blocks)
        if any(b - a < store.block_bytes for a, b in zip(offsets, offsets[1:])):
            fail("experts.blocks overlap")

    def _require_graph(self, kind, tokens, tier, source) -> None:
        try:
            self.graph(kind, tokens, tier)
        except ArtifactError as err:
            raise ManifestError(f"{source}: {err}") from None

    def checksummed_files(self) -> list[FileRecord]:
        """Every file with a recorded SHA-256: graphs (those with a file), the dense weights, the tokenizer."""
        return [g.file for g in self.graphs if g.file] + [self.dense.file, *self.tokenizer]

    def paths(self) -> list[tuple[str, str]]:
        """(field, relative path) of every file the manifest names."""
        return ([(f"graphs[{i}].file.path", g.file.path) for i, g in enumerate(self.graphs) if g.file]
                + [("dense.file.path", self.dense.file.path), ("experts.path", self.experts.path)]
                + [(f"tokenizer[{i}].path", f.path) for i, f in enumerate(self.tokenizer)])


def manifest_digest(body: dict) -> str:
    """SHA-256 of the manifest's fields in a canonical JSON form: covers the model's numbers (rope theta,
    EOS ids, ...) that no file checksum does."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def check_relative(path: str, where: str) -> None:
    """Refuse paths that could leave the artifact directory before any file is opened."""
    pure = PurePosixPath(path)
    if not path or pure.is_absolute() or "\\" in path or ":" in path.split("/")[0]:
        raise UnsafePathError(f"{where}: path {path!r} must be relative to the artifact directory")
    if any(part in ("..", ".", "") for part in path.split("/")):
        raise UnsafePathError(f"{where}: path {path!r} must be normalised: no '..', '.' or empty components")


def resolve_inside(root: Path, path: str, where: str) -> Path:
    """`root / path`, refused when it (through symlinks) resolves outside `root`."""
    check_relative(path, where)
    target = (root / path).resolve()
    if not target.is_relative_to(root.resolve()):
        raise UnsafePathError(f"{where}: path {path!r} resolves to {target}, outside the artifact {root}")
    return target


def _reject_constant(name: str):
    raise ValueError(f"non-standard JSON constant {name}")


# -- typed decoding --------------------------------------------------------------------------------
def _decode(kind, value, source: str, where: str):
    """`value` (parsed JSON) as `kind`, a dataclass, tuple, union or scalar type; errors name `where`."""
    origin = typing.get_origin(kind)
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            raise ManifestError(f"{source}: {where or 'manifest'} should be an object, got {_brief(value)}")
        hints = typing.get_type_hints(kind)
        fields = {f.name: f for f in dataclasses.fields(kind)}
        unknown = sorted(set(value) - set(fields))
        if unknown:
            raise ManifestError(f"{source}: {where or 'manifest'} has unknown field(s) {unknown}")
        out = {}
        for name, f in fields.items():
            path = f"{where}.{name}" if where else name
            if name not in value:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise ManifestError(f"{source}: missing field '{path}'")
                continue
            out[name] = _decode(hints[name], value[name], source, path)
        return kind(**out)
    if origin is tuple:
        item_type = typing.get_args(kind)[0]
        if not isinstance(value, list):
            raise ManifestError(f"{source}: '{where}' should be a list, got {_brief(value)}")
        return tuple(_decode(item_type, item, source, f"{where}[{i}]") for i, item in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        (inner,) = [o for o in options if o is not type(None)]
        return _decode(inner, value, source, where)
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind in (str, bool):
        if isinstance(value, kind):
            return value
    else:
        raise TypeError(f"manifest decoder has no rule for {kind!r} at {where}")
    raise ManifestError(f"{source}: '{where}' should be {kind.__name__}, got {_brief(value)}")


def _brief(value) -> str:
    text = json.dumps(value)
    return text if len(text) < 60 else text[:57] + "..."
