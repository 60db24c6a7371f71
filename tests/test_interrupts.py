"""Converts that are raced, starved of disk or killed leave either a whole artifact or nothing.

Each case runs real processes (`python -m convert`, or `convert.cache.cached_artifact` in two
processes at once) on a tiny checkpoint.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from checkpoints import TinyShape, write_checkpoint

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}

CACHED = """
import json, sys
from pathlib import Path
from artifact.manifest import TierRecord
from convert.cache import cached_artifact
from convert.pipeline import ConvertOptions
options = ConvertOptions("fp32", (TierRecord(1, 2), TierRecord(4, 2)), (16,), 32)
done = cached_artifact(Path(sys.argv[1]), Path(sys.argv[2]), options, progress=False, say=lambda text: None)
print(json.dumps({"path": str(done.path), "built_now": done.built_now}))
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_checkpoint(TinyShape(), tmp_path_factory.mktemp("tiny"))


def test_two_processes_converting_into_one_cache_convert_once(tiny, tmp_path):
    """The cache's lock: one process converts, the other waits for it and reuses its artifact."""
    cache = tmp_path / "cache"
    procs = [subprocess.Popen([sys.executable, "-c", CACHED, str(tiny), str(cache)], env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-2000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert sorted(r["built_now"] for r in results) == [False, True]
    assert results[0]["path"] == results[1]["path"]
    artifacts = [p for p in cache.iterdir() if not p.name.startswith(".")]
    assert [p.name for p in artifacts] == [Path(results[0]["path"]).name]  # no second copy, no temporaries


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB filesystem (smaller than the tiny artifact) of its own (tmpfs; needs root), unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {made.stderr.strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_disk_full_during_a_convert_is_a_clear_error_and_leaves_nothing(tiny, small_disk):
    proc = subprocess.run([sys.executable, "-m", "convert", "--model-dir", str(tiny), "--out", str(small_disk / "art"),
                           "--quiet", "--tiers", "1x2,4x2", "--buckets", "16", "--max-context", "32"],
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "error: No space left on device" in proc.stderr and "nothing was written" in proc.stderr
    assert list(small_disk.iterdir()) == []  # no artifact, no temporary directory


def test_artifact_cache_refuses_a_convert_the_disk_cannot_hold(tiny, small_disk):
    proc = subprocess.run([sys.executable, "-c", CACHED, str(tiny), str(small_disk / "cache")], env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "NoRoomError" in proc.stderr  # run.py turns it into `error:` and status 1
    assert "python -m convert --model-dir" in proc.stderr  # the command to convert elsewhere
    assert [p.name for p in (small_disk / "cache").iterdir() if not p.name.startswith(".")] == []
