"""Ferry's expert-group kernels called on numpy arrays from the host, outside any graph.

Legend: G slots, C rows per slot, H hidden, I expert intermediate width, n a host expert's rows.

Why: the offload controller computes some experts on the host instead of streaming them ("host
compute"). Calling the graphs' own kernels (kernels/ferry_cpu.cc) reads FP16 and INT8 blocks at
their stored width, where numpy would first widen the whole block to FP32, and gives the graph's
results bit for bit. The call goes through the same entry points MindSpore's CPU AOT ABI calls,
`int f(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
void *extra)`, with the inputs, then the output, in graph order.

`host_kernels()` is None where the library is unavailable (switched off or not buildable): callers
then compute in numpy.
"""
from __future__ import annotations

import ctypes
import functools
from typing import Mapping, Sequence

import numpy as np

from kernels.build import compiled

PARTS = ("gate_up", "down", "gate_up_scale", "down_scale")  # a slot's arrays, in graph and block-layout order
# weight dtype -> (entry point, the per-slot arrays it takes)
KERNELS = {
    np.dtype(np.float32): ("FerryExperts", PARTS[:2]),
    np.dtype(np.float16): ("FerryExpertsF16", PARTS[:2]),
    np.dtype(np.int8): ("FerryExpertsI8", PARTS),
}
_ABI = (ctypes.c_int, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_int),
        ctypes.POINTER(ctypes.POINTER(ctypes.c_int64)), ctypes.POINTER(ctypes.c_char_p), ctypes.c_void_p,
        ctypes.c_void_p)


class HostKernels:
    """The kernel library loaded into this process (the same object MindSpore's graphs load)."""

    def __init__(self, path: str):
        library = ctypes.CDLL(path)
        self.functions = {}
        for dtype, (name, _) in KERNELS.items():
            function = getattr(library, name)
            function.argtypes, function.restype = _ABI, ctypes.c_int
            self.functions[dtype] = function

    def expert_group(self, x: np.ndarray, counts: np.ndarray, weights: Sequence[np.ndarray]) -> np.ndarray:
        """The expert-group graph's result: x [G, C, H] float32, counts [G] int32, then the weights in
        graph input order (G gate_up, G down, and for int8 G gate_up_scale, G down_scale) -> [G, C, H]."""
        dtype = weights[0].dtype if weights else None
        if dtype not in KERNELS or x.ndim != 3:
            raise ValueError(f"expert groups take x [G, C, H] and weights of dtype {', '.join(map(str, KERNELS))}; "
                             f"got x {x.shape} and {dtype} weights")
        name, parts = KERNELS[dtype]
        g, c, h = x.shape
        i = weights[0].shape[0] // 2
        part_signature = {"gate_up": (dtype, (2 * i, h)), "down": (dtype, (h, i)),
                          "gate_up_scale": (np.float32, (2 * i,)), "down_scale": (np.float32, (h,))}
        expected = [("x", np.float32, (g, c, h)), ("counts", np.int32, (g,))] + [
            (f"{part}[{slot}]", *part_signature[part]) for part in parts for slot in range(g)]
        arrays = [x, counts, *weights]
        if len(arrays) != len(expected):
            raise ValueError(f"{name} takes x, counts and {len(parts)} x {g} weights, got {len(weights)} weights")
        for (what, want_dtype, want_shape), array in zip(expected, arrays):
            if array.dtype != want_dtype or array.shape != want_shape:
                raise ValueError(f"{name} input {what}: expected {np.dtype(want_dtype)} {want_shape}, "
                                 f"got {array.dtype} {array.shape}")
        out = np.empty((g, c, h), np.float32)  # [G, C, H], padding rows zeroed by the kernel
        arrays = [np.ascontiguousarray(a) for a in arrays] + [out]  # the ABI's params: inputs, then the output
        shape_rows = [(ctypes.c_int64 * a.ndim)(*a.shape) for a in arrays]
        done = self.functions[dtype](
            len(arrays),
            (ctypes.c_void_p * len(arrays))(*(a.ctypes.data for a in arrays)),
            (ctypes.c_int * len(arrays))(*(a.ndim for a in arrays)),
            (ctypes.POINTER(ctypes.c_int64) * len(arrays))(*shape_rows),
            (ctypes.c_char_p * len(arrays))(*(str(a.dtype).encode() for a in arrays)),
            None, None)
        if done != 0:
            raise RuntimeError(f"{name} returned {done}")
        return out

    def expert(self, x: np.ndarray, block: Mapping[str, np.ndarray]) -> np.ndarray:
        """One expert on x [n, H] from a block's arrays by part name (`artifact.store`) -> [n, H]."""
        weights = [block[part] for part in PARTS if part in block]
        return self.expert_group(x[None], np.array([len(x)], np.int32), weights)[0]


@functools.cache
def host_kernels() -> HostKernels | None:
    """The kernels for host compute, or None where the library is unavailable (see kernels/build.py)."""
    path = compiled()
    return None if path is None else HostKernels(str(path))
