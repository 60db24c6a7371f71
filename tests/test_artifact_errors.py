"""Bad artifacts and bad converts fail early, naming the culprit; nothing in an artifact is unpickled.

One small FP32 artifact (decode graphs only) is converted per module; each test damages a copy.
"""
from __future__ import annotations

import dataclasses
import json
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from checkpoints import TinyShape, write_checkpoint
from artifact.reader import Artifact, ChecksumError, ExpertChecksumError, MissingFileError, ModelMismatchError
from convert.cli import main as cli
from artifact.manifest import (DIGEST_KEY, VERSION, ArtifactError, ManifestError, ManifestVersionError, TierRecord,
                               UnsafePathError, manifest_digest)
from convert.pipeline import ArtifactExistsError, ConvertOptions, convert
from offload.device import DeviceMemory
from offload.store_weights import StoreExperts
from runtime.build import engine_from_artifact

REPO = Path(__file__).resolve().parents[1]
OPTIONS = ConvertOptions("fp32", (TierRecord(1, 2), TierRecord(4, 2)), (16,), 32)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    model_dir = write_checkpoint(TinyShape(), tmp_path_factory.mktemp("ckpt"))
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))  # copied as is
    out = tmp_path_factory.mktemp("art") / "good"
    convert(model_dir, out, OPTIONS, progress=False)
    return model_dir, out


@pytest.fixture
def artifact(source, tmp_path):
    copy = tmp_path / "artifact"
    shutil.copytree(source[1], copy)
    return copy


def edit_manifest(root: Path, change, sign: bool = True) -> None:
    """Change manifest.json's fields; `sign` records the digest of the result, as a convert would, so
    the check under test is the one that speaks (not the digest's)."""
    path = root / "manifest.json"
    data = json.loads(path.read_text())
    recorded = data.pop(DIGEST_KEY)
    change(data)
    data[DIGEST_KEY] = manifest_digest(data) if sign else recorded
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("change", [lambda m: m["model"].update(rope_theta=m["model"]["rope_theta"] * 2),
                                    lambda m: m["model"].update(eos_token_ids=[7]),
                                    lambda m: m["source"].update(config_sha256="0" * 64),
                                    lambda m: m["graphs"][0]["inputs"][0].update(dtype="float16")],
                         ids=["rope_theta", "eos_token_ids", "config_sha256", "graph-signature"])
def test_edited_manifest_is_refused(artifact, change):
    """Numbers no file checksum covers (the model's rope theta, its EOS ids) would change the output
    silently, and an edited graph signature would fail mid-run: the manifest's own digest refuses any
    edit when the artifact is opened."""
    edit_manifest(artifact, change, sign=False)
    with pytest.raises(ManifestError, match="do not match the manifest_sha256 recorded by the convert .edited"):
        Artifact.open(artifact, verify="none")


def artifact_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_artifact_carries_the_tokenizer_files(source):
    model_dir, out = source
    assert (out / "tokenizer" / "tokenizer_config.json").read_bytes() == (model_dir / "tokenizer_config.json").read_bytes()
    assert Artifact.open(out).tokenizer_dir() == (out / "tokenizer").resolve()


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_every_file_damaged_is_refused_by_name(source, tmp_path, damage):
    """Each file of the artifact in turn: one byte flipped where the run reads it (inside an expert
    block for the store; the middle elsewhere), or the file cut to half. A full verify (what
    `python -m convert verify` does) refuses each, naming the file; a truncation is refused even by
    verify=none, which checks sizes only."""
    files = artifact_files(source[1])
    assert {"manifest.json", "dense.safetensors", "experts.bin", "tokenizer/tokenizer_config.json"} <= set(files)
    assert any(f.startswith("graphs/") for f in files)
    for name in files:
        root = tmp_path / name.replace("/", "_")
        shutil.copytree(source[1], root)
        path = root / name
        data = bytearray(path.read_bytes())
        if damage == "truncate":
            path.write_bytes(bytes(data[: len(data) // 2]))
        else:
            at = len(data) // 2
            if name == "experts.bin":
                block = Artifact.open(source[1], verify="none").manifest.experts.blocks[3]
                at = block.offset + 5
            data[at] ^= 0x10
            path.write_bytes(bytes(data))
        modes = ("full", "none") if damage == "truncate" else ("full",)
        for verify in modes:
            with pytest.raises(ArtifactError) as err:
                Artifact.open(root, verify=verify)
            assert name in str(err.value), f"{name} ({damage}, verify={verify}): {err.value}"


def test_good_artifact_opens_fully_verified(artifact):
    opened = Artifact.open(artifact, verify="full")
    assert len(opened.experts.verified) == opened.spec.num_layers * opened.spec.num_experts


def test_corrupted_expert_block_names_layer_and_expert(artifact, capsys):
    opened = Artifact.open(artifact, verify="none")
    block = opened.experts.blocks[(2, 5)]
    with open(artifact / "experts.bin", "r+b") as f:  # flip one byte inside the block's down weights
        f.seek(block.offset + opened.manifest.experts.parts[1].offset + 100)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x40]))
    with pytest.raises(ExpertChecksumError, match="layer 2, expert 5") as err:
        Artifact.open(artifact, verify="full")
    assert (err.value.layer, err.value.expert) == (2, 5)
    # lazily, at run time: the first launch that needs the block fails, other blocks still serve
    weights = StoreExperts(Artifact.open(artifact).experts, DeviceMemory())
    weights.launch_slots(2, [4, 6])
    with pytest.raises(ExpertChecksumError, match="layer 2, expert 5"):
        weights.launch_slots(2, [4, 5])
    assert cli(["verify", str(artifact)]) == 1
    printed = capsys.readouterr().out
    assert "layer 2, expert 5" in printed and "FAILED: 1 of" in printed


def test_verify_against_the_source_names_each_changed_file(artifact, source, tmp_path, capsys):
    assert cli(["verify", str(artifact), "--source", str(source[0])]) == 0
    assert "config.json and tokenizer files are the converted ones" in capsys.readouterr().out
    edited = tmp_path / "edited"
    shutil.copytree(source[0], edited)
    config = json.loads((edited / "config.json").read_text())
    config["text_config"]["rope_parameters"]["rope_theta"] = 1234.0
    (edited / "config.json").write_text(json.dumps(config))
    (edited / "tokenizer_config.json").unlink()
    (edited / "chat_template.jinja").write_text("{{ messages }}")
    assert cli(["verify", str(artifact), "--source", str(edited)]) == 1
    printed = capsys.readouterr().out
    assert f"{edited / 'config.json'}: SHA-256" in printed
    assert f"{edited / 'tokenizer_config.json'}: missing, the artifact was converted with one" in printed
    assert f"{edited / 'chat_template.jinja'}: present, the artifact was converted without it" in printed
    assert "FAILED" in printed


def test_graphs_of_other_kernels_are_refused_by_name(artifact):
    """Graphs that call another version of Ferry's CPU kernels (or none are buildable) are refused
    before MindSpore tries to load them."""
    edit_manifest(artifact, lambda data: data.update(kernels="FERRY_CPU_LIBRARY_0123456789abcdef"))
    with pytest.raises(ArtifactError, match="another source version .FERRY_CPU_LIBRARY_0123456789abcdef"):
        engine_from_artifact(artifact)


def test_manifest_of_another_version(artifact):
    edit_manifest(artifact, lambda m: m.update(version=1))
    with pytest.raises(ManifestVersionError, match=f"manifest version 1, this Ferry reads version {VERSION}"):
        Artifact.open(artifact)


def test_not_a_ferry_manifest(artifact):
    edit_manifest(artifact, lambda m: m.update(format="something-else"))
    with pytest.raises(ManifestError, match="not a Ferry artifact"):
        Artifact.open(artifact)


def test_missing_graph_file(artifact):
    (artifact / "graphs" / "deltanet_t16.mindir").unlink()
    with pytest.raises(MissingFileError, match="graphs/deltanet_t16.mindir"):
        Artifact.open(artifact)


def test_changed_graph_file_fails_its_checksum(artifact):
    path = artifact / "graphs" / "head_t1.mindir"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="head_t1.mindir: SHA-256"):
        Artifact.open(artifact)
    Artifact.open(artifact, verify="none")  # sizes only: opens


def test_truncated_store(artifact):
    with open(artifact / "experts.bin", "r+b") as f:
        f.truncate(4096)
    with pytest.raises(ChecksumError, match="experts.bin: 4096 bytes, the manifest records"):
        Artifact.open(artifact, verify="none")


def test_artifact_of_another_model(artifact, source, tmp_path):
    spec = Artifact.open(artifact, verify="none").spec
    other = dataclasses.replace(spec, hidden_size=128, num_experts=16)
    with pytest.raises(ModelMismatchError, match=r"hidden_size: artifact 64, expected 128; num_experts"):
        engine_from_artifact(artifact, expect=other)
    # a dense file taken from another artifact (another checkpoint of the same shape) fails its checksum
    other_dir = write_checkpoint(TinyShape(seed=9), tmp_path / "other-ckpt")
    convert(other_dir, tmp_path / "other", OPTIONS, progress=False)
    shutil.copy(tmp_path / "other" / "dense.safetensors", artifact / "dense.safetensors")
    with pytest.raises(ChecksumError, match="dense.safetensors: SHA-256"):
        Artifact.open(artifact)
    # a manifest claiming another model does not fit its own store
    edit_manifest(artifact, lambda m: m["model"].update(hidden_size=128))
    with pytest.raises(ManifestError, match="dense.tensors are not the dense weights of the model"):
        Artifact.open(artifact)


@pytest.mark.parametrize("path", ["../outside.bin", "/etc/passwd", "graphs/../../x", "C:/x", "./dense.safetensors", ""])
def test_manifest_paths_outside_the_artifact_are_refused(artifact, path):
    edit_manifest(artifact, lambda m: m["dense"]["file"].update(path=path))
    with pytest.raises(UnsafePathError, match="dense.file.path"):
        Artifact.open(artifact, verify="none")


def test_symlink_out_of_the_artifact_is_refused(artifact, tmp_path):
    outside = tmp_path / "outside.mindir"
    target = artifact / "graphs" / "head_t1.mindir"
    shutil.copy(target, outside)  # same bytes, so only the location is wrong
    target.unlink()
    target.symlink_to(outside)
    with pytest.raises(UnsafePathError, match="outside the artifact"):
        Artifact.open(artifact, verify="none")


def test_wrong_field_type_names_the_field(artifact):
    edit_manifest(artifact, lambda m: m["experts"]["blocks"][3].update(offset="12288"))
    with pytest.raises(ManifestError, match=r"'experts.blocks\[3\].offset' should be int"):
        Artifact.open(artifact, verify="none")
    edit_manifest(artifact, lambda m: m["experts"]["blocks"][3].update(offset=12288, extra=1))
    with pytest.raises(ManifestError, match=r"experts.blocks\[3\] has unknown field"):
        Artifact.open(artifact, verify="none")


def test_overlapping_blocks_are_refused(artifact):
    edit_manifest(artifact, lambda m: m["experts"]["blocks"][1].update(offset=m["experts"]["blocks"][0]["offset"]))
    with pytest.raises(ManifestError, match="overlap"):
        Artifact.open(artifact, verify="none")


def test_directory_without_manifest_is_not_an_artifact(tmp_path):
    with pytest.raises(ArtifactError, match="no manifest.json"):
        Artifact.open(tmp_path)


def test_nothing_is_unpickled(artifact, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("an artifact must never be unpickled")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(np, "load", refuse)
    engine = engine_from_artifact(artifact, verify="full")
    assert np.isfinite(engine.forward([3, 4, 5])).all()


def test_interrupted_convert_leaves_nothing(source, tmp_path):
    out = tmp_path / "interrupted"

    def stop(layer):
        if layer == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(source[0], out, OPTIONS, progress=False, on_layer=stop)
    assert list(tmp_path.iterdir()) == []


def test_killed_convert_leaves_no_artifact_and_the_next_one_cleans_up(source, tmp_path):
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "convert", "--model-dir", str(source[0]), "--out", str(out), "--quiet",
               "--tiers", "1x2", "--buckets", "16", "--max-context", "32"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob("killed.tmp-*/graphs/*.mindir")) and time.monotonic() < deadline:
        assert process.poll() is None, "convert finished before it could be killed"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not out.exists()
    (stale,) = tmp_path.glob("killed.tmp-*")
    assert not (stale / "manifest.json").exists()
    with pytest.raises(ArtifactError, match="no manifest.json"):
        Artifact.open(stale)
    convert(source[0], out, OPTIONS, progress=False)  # the dead process's directory is removed
    assert [p.name for p in tmp_path.iterdir()] == ["killed"]


@pytest.mark.slow
def test_convert_killed_at_random_moments_leaves_nothing_that_looks_like_an_artifact(source, tmp_path):
    """kill -9 at seeded random moments from start-up to the last rename (fractions of a full convert's
    measured wall time): the output either does not exist or is a whole artifact that verifies; a
    leftover `DST.tmp-*` (a name no loader reads) holds no manifest, or (killed between writing it and
    the rename) a whole artifact that verifies, or a manifest torn mid-write that is refused; the next
    convert into the same place succeeds and clears the leftovers."""
    def command(out):
        return [sys.executable, "-m", "convert", "--model-dir", str(source[0]), "--out", str(out), "--quiet",
                "--tiers", "1x2,4x2", "--buckets", "16", "--max-context", "32"]

    start = time.monotonic()
    subprocess.run(command(tmp_path / "whole"), cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    full = time.monotonic() - start
    rng = np.random.default_rng(13)
    for i, fraction in enumerate(rng.uniform(0.3, 1.0, 4)):
        out = tmp_path / f"killed-{i}"
        process = subprocess.Popen(command(out), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(fraction * full)
        process.send_signal(signal.SIGKILL)
        process.wait()
        if out.exists():  # killed after its final rename
            Artifact.open(out, verify="full")
        for stale in tmp_path.glob(f"killed-{i}.tmp-*"):
            if (stale / "manifest.json").exists():
                try:
                    Artifact.open(stale, verify="full")
                except ManifestError:  # torn mid-write: refused, never read as an artifact
                    pass
        convert(source[0], out, OPTIONS, progress=False, force=True)
        assert sorted(p.name for p in tmp_path.glob(f"killed-{i}*")) == [out.name]
        Artifact.open(out, verify="full")


def test_existing_output_needs_force(source, tmp_path):
    out = tmp_path / "again"
    convert(source[0], out, OPTIONS, progress=False)
    with pytest.raises(ArtifactExistsError, match="--force"):
        convert(source[0], out, OPTIONS, progress=False)
    before = json.loads((out / "manifest.json").read_text())["experts"]["dtype"]
    convert(source[0], out, dataclasses.replace(OPTIONS, dtype="fp16"), force=True, progress=False)
    assert (before, Artifact.open(out).manifest.experts.dtype) == ("fp32", "fp16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(ArtifactExistsError, match="not an artifact"):
        convert(source[0], precious, OPTIONS, force=True, progress=False)
    assert (precious / "notes.txt").read_text() == "keep me"
