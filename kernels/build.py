"""Builds Ferry's CPU kernels (`ferry_cpu.cc`) into a shared library the graphs call as AOT ops.

The library is compiled once per source version, compiler and CPU into a cache directory named by a
hash of the source, the compiler and its flags, and this CPU's instruction-set extensions
(`-march=native` makes the binary CPU-specific, so a cache shared between machines, e.g. a network
home directory, holds one build per CPU type). It is written to a temporary name and renamed, so a
build interrupted halfway is never loaded.

Graphs do not name the library by its path, which belongs to one user on one machine: they name the
environment variable `VARIABLE` (keyed by the source hash: a graph runs only with the kernels it was
exported with), and MindSpore's CPU AOT kernel reads the path from it when the graph compiles (the
op's `path_from_env` attribute). `compiled()` builds the library and sets that variable, so any
process that calls it can load graphs exported anywhere. It returns None when the kernels are
switched off (`FERRY_CPU_KERNELS=0`) or the build fails (logged as a warning); `library()` also
when MindSpore's device is not the CPU. The graphs then use MindSpore's own operators, which give the
same results more slowly.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("ferry_cpu.cc")
FLAGS = ("-std=c++20", "-O3", "-march=native", "-shared", "-fPIC", "-pthread")
CACHE = Path(os.environ.get("FERRY_CACHE", Path.home() / ".cache" / "ferry")) / "kernels"
SOURCE_DIGEST = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
# holds the library's path; exported graphs name it. The suffix: MindSpore compiles an AOT op whose library
# name ends in "cc", "cpp" or "cu" as a source file, which a bare hex digest sometimes does
VARIABLE = f"FERRY_CPU_LIBRARY_{SOURCE_DIGEST}_PATH"

log = logging.getLogger(__name__)


class KernelBuildError(RuntimeError):
    """The compiler is missing or rejected the source (e.g. a CPU without AVX2, FMA and F16C)."""


def cpu_features() -> str:
    """This CPU's instruction-set extensions, which `-march=native` compiles for: the `flags` line of
    /proc/cpuinfo (read, not a compiler run: cheap enough for every process that loads the kernels)."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("flags"):
                    return " ".join(sorted(line.partition(":")[2].split()))
    except OSError:
        pass
    return platform.machine()


def cache_key(compiler: str, features: str) -> str:
    """The cache directory name of a build: what the binary depends on."""
    return hashlib.sha256("\n".join((SOURCE_DIGEST, compiler, *FLAGS, features)).encode()).hexdigest()[:16]


def build(cache: Path = CACHE) -> Path:
    """Compile the kernels unless this source was compiled before with this compiler for this CPU;
    return the .so."""
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        raise KernelBuildError(f"no C++ compiler ({os.environ.get('CXX', 'g++')}) on PATH")
    target = cache / cache_key(compiler, cpu_features()) / "libferry_cpu.so"
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
def compiled() -> Path | None:
    """The kernel library for this machine, its path set in `VARIABLE`; None if switched off or the
    build failed."""
    if os.environ.get("FERRY_CPU_KERNELS", "1") == "0":
        return None
    try:
        path = build()
    except KernelBuildError as error:
        log.warning("Ferry's CPU kernels are unavailable, using MindSpore's operators and numpy: %s", error)
        return None
    os.environ[VARIABLE] = str(path)
    return path


def library() -> str | None:
    """Path of the kernel library for MindSpore's current device, or None (see module docstring)."""
    import mindspore as ms

    path = compiled() if ms.get_context("device_target") == "CPU" else None
    return None if path is None else str(path)
