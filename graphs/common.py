"""Building blocks shared by Ferry's Cells: norms, projections and activations.

Legend: T tokens in a launch, H hidden, D any feature width.
Weights arrive in the HF `[out, in]` layout and are multiplied with `transpose_b=True`, so no
weight is ever transposed (copied) at run time. FP32 weights give FP32 matmuls. FP16 weights are
multiplied in the graph's `wide` dtype (`wide_dtype`): in a graph for a card (the `ascend_310p3`
target, which has no BF16 and whose cube unit multiplies FP16) as they are, activations cast to
FP16 going in and back to FP32 coming out; in a graph for the CPU (an artifact with narrow experts
stores its dense matrices in FP16 too) widened to FP32. Norms, softmax, gates and the DeltaNet
recurrence stay FP32. The branch on the weight's dtype is decided when the graph compiles, not at
run time.
"""
from mindspore import nn, ops
from mindspore.common import dtype as mstype

from kernels.build import VARIABLE, library


def cpu_kernel(name: str, out_shape, out_dtype):
    """The AOT custom op `name` of Ferry's CPU kernel library, or None where it is unavailable.

    The op names the environment variable that holds the library's path, not the path
    (`path_from_env`, see kernels/build.py): an exported graph holds no path of this machine."""
    if library() is None:
        return None
    op = ops.Custom(f"{VARIABLE}:{name}", out_shape=out_shape, out_dtype=out_dtype, func_type="aot")
    return op.add_prim_attr("path_from_env", True)


def wide_dtype(cpu_kernels: bool):
    """The dtype a graph multiplies FP16 weights in: FP32 in graphs for the CPU, which computes in FP32
    (its FP16 matmuls are several times slower), FP16 in graphs for a card (`cpu_kernels=False`)."""
    return mstype.float32 if cpu_kernels else mstype.float16


def in_dtype_of(x, other):
    """x cast to `other`'s dtype when that is FP16 (a FP16 matmul's operands), else x as it is."""
    if other.dtype == mstype.float16:
        return ops.cast(x, mstype.float16)
    return x


def to_f32(x):
    """A FP16 matmul's result back in FP32; FP32 as it is."""
    if x.dtype == mstype.float16:
        return ops.cast(x, mstype.float32)
    return x


class Linear(nn.Cell):
    """y = x @ w.T for x [T, in] and w [out, in], without copying w; y in FP32. FP16 weights are
    multiplied in `wide` (see the module docstring)."""

    def __init__(self, wide):
        super().__init__()
        self.matmul = ops.MatMul(transpose_b=True)
        self.widen = wide == mstype.float32

    def construct(self, x, weight):
        if self.widen and weight.dtype == mstype.float16:
            return self.matmul(x, ops.cast(weight, mstype.float32))  # [T, out]
        return to_f32(self.matmul(in_dtype_of(x, weight), weight))  # [T, out]


def rms_norm(x, weight, eps: float):
    """Qwen3.5 RMSNorm: scales by (1 + weight), computed in FP32."""
    variance = ops.mean(x * x, -1, keep_dims=True)  # [..., 1]
    return x * ops.rsqrt(variance + eps) * (1.0 + weight)  # [..., D]


def gated_rms_norm(x, gate, weight, eps: float):
    """DeltaNet output norm: plain `weight` scale (not 1 + w), then a SiLU gate."""
    variance = ops.mean(x * x, -1, keep_dims=True)
    return x * ops.rsqrt(variance + eps) * weight * ops.silu(gate)


def l2_normalize(x, eps: float = 1e-6):
    """Matches FLA's l2norm: x / sqrt(sum(x^2) + eps)."""
    return x * ops.rsqrt(ops.sum(x * x, -1, keepdim=True) + eps)


class SwiGLU(nn.Cell):
    """down(silu(gate(x)) * up(x)) with separate gate and up weights (the shared expert)."""

    def __init__(self, wide):
        super().__init__()
        self.linear = Linear(wide)

    def construct(self, x, gate, up, down):
        hidden = ops.silu(self.linear(x, gate)) * self.linear(x, up)  # [T, I]
        return self.linear(hidden, down)  # [T, H]
