"""Builds Ferry's CPU kernels (`ferry_cpu.cc`) into a shared library the graphs call as AOT ops.

The library is compiled once per source version and machine into a cache directory (named by a
hash of the source and the compiler flags), written to a temporary name and renamed, so a build
interrupted halfway is never loaded. `library()` gives its path, or None when the kernels are
switched off (`FERRY_CPU_KERNELS=0`), MindSpore's device is not the CPU, or the build fails; the
graphs then use MindSpore's own operators, which give the same results more slowly (a failed
build is logged as a warning).
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("ferry_cpu.cc")
FLAGS = ("-std=c++20", "-O3", "-march=native", "-shared", "-fPIC", "-pthread")
CACHE = Path(os.environ.get("FERRY_CACHE", Path.home() / ".cache" / "ferry")) / "kernels"

log = logging.getLogger(__name__)


class KernelBuildError(RuntimeError):
    """The compiler is missing or rejected the source (e.g. a CPU without AVX2 and FMA)."""


def build(cache: Path = CACHE) -> Path:
    """Compile the kernels unless this source and these flags were compiled before; return the .so."""
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        raise KernelBuildError(f"no C++ compiler ({os.environ.get('CXX', 'g++')}) on PATH")
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join((compiler, *FLAGS)).encode()).hexdigest()[:16]
    target = cache / digest / "libferry_cpu.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        partial = Path(scratch) / target.name
        done = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(partial)], capture_output=True, text=True)
        if done.returncode != 0:
            raise KernelBuildError(f"{compiler} could not build {SOURCE.name}:\n{done.stderr[-2000:]}")
        os.replace(partial, target)
    return target


@functools.cache
def library() -> str | None:
    """Path of the kernel library for MindSpore's current device, or None (see module docstring)."""
    import mindspore as ms

    if os.environ.get("FERRY_CPU_KERNELS", "1") == "0" or ms.get_context("device_target") != "CPU":
        return None
    try:
        return str(build())
    except KernelBuildError as error:
        log.warning("Ferry's CPU kernels are unavailable, using MindSpore's operators: %s", error)
        return None
