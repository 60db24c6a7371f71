"""The MoE halves that run as graphs: the router with the shared expert, and one expert group.

Legend: T tokens, H hidden, E experts, K experts per token, I expert intermediate width,
G expert slots in one launch, C token capacity of each slot, S slots of the expert pool, R a pool row.

The routed experts run in an expert-group launch whose weights are *inputs*, one pair per slot,
so any slot can hold any expert and the offload controller decides where weights live. Which
tokens go to which slot is decided on the host from the router's output. `ExpertGroupFP16` and
`ExpertGroupInt8` take the same slots in the expert store's narrower formats and compute in FP32.
`ExpertLaunch` wraps a group so that the tokens' rows never leave the device: it gathers them from
the layer's MoE input, reads its experts from the device's expert pool by slot index, and adds the
weighted outputs to the layer's hidden state, in one launch (on the CPU, one kernel call).
"""
import math

import numpy as np
from mindspore import Tensor, nn, ops
from mindspore.common import dtype as mstype

from graphs.common import Linear, SwiGLU, cpu_kernel, wide_dtype


class Router(nn.Cell):
    """Softmax over E experts, top-K, renormalised: the same arithmetic as the reference router."""

    def __init__(self, top_k: int, wide):
        super().__init__()
        self.top_k = top_k
        self.linear = Linear(wide)

    def construct(self, x, router):
        probs = ops.softmax(self.linear(x, router), -1)  # [T, E]
        weights, experts = ops.topk(probs, self.top_k)  # [T, K], [T, K]
        return weights / ops.sum(weights, -1, keepdim=True), experts


class SharedExpert(nn.Cell):
    """The always-on expert, scaled by sigmoid(shared_expert_gate . x)."""

    def __init__(self, wide):
        super().__init__()
        self.mlp = SwiGLU(wide)
        self.linear = Linear(wide)

    def construct(self, x, gate, up, down, shared_expert_gate):
        return ops.sigmoid(self.linear(x, shared_expert_gate)) * self.mlp(x, gate, up, down)  # [T, H]


def swiglu(both, intermediate: int):
    """silu(gate) * up for the fused gate_up projection's output [C, 2I] -> [C, I]."""
    return ops.silu(both[:, :intermediate]) * both[:, intermediate:]


class ExpertGroup(nn.Cell):
    """G routed experts in one launch: x [G, C, H] -> [G, C, H].

    After x come `counts` [G] int32 (the real rows of each slot; the rest is padding, zero in and
    zero out), then G `gate_up` weights [2I, H] (gate rows, then up rows), then G `down` weights
    [H, I], one pair per slot as separate inputs, so that no launch stacks (copies) expert weights.
    On the CPU the whole group is one kernel call (`KERNEL`), which skips the padding rows; without
    it (`FERRY_CPU_KERNELS=0`, or `cpu_kernels=False`: graphs for a card) each slot runs `expert` on
    MindSpore's operators, narrow weights widened to `wide`: FP32 where the CPU computes, FP16 for a
    card that multiplies FP16 (the 310P3).
    """

    KERNEL = "FerryExperts"  # the CPU kernel for this storage format
    LAUNCH_KERNEL = "FerryExpertLaunch"  # the same inside a whole ExpertLaunch
    POOL_PARTS = (0, 0)  # the expert pool's tensor holding each part of a block (gate_up, down)

    def __init__(self, slots: int, intermediate: int, cpu_kernels: bool = True):
        super().__init__()
        self.slots = slots
        self.intermediate = intermediate
        self.wide = wide_dtype(cpu_kernels)
        self.linear = Linear(self.wide)
        self.kernel = cpu_kernel(self.KERNEL, lambda x, *shapes: x, lambda x, *dtypes: x) if cpu_kernels else None
        self.use_kernel = self.kernel is not None

    def construct(self, x, counts, *weights):
        if self.use_kernel:
            return self.kernel(x, counts, *weights)  # [G, C, H]
        outs = []
        for g in range(self.slots):
            outs.append(self.expert(x[g], g, weights))  # [C, H]
        return ops.stack(outs)  # [G, C, H]

    def expert(self, x, g, weights):
        """Slot g's expert on x [C, H], from all slots' weights."""
        hidden = swiglu(self.linear(x, weights[g]), self.intermediate)  # [C, I]
        return self.linear(hidden, weights[self.slots + g])  # [C, H]


class ExpertGroupFP16(ExpertGroup):
    """ExpertGroup over FP16-stored weights: the same inputs in FP16.

    The CPU computes in FP32 (MindSpore's FP16 matmuls are several times slower there): the kernel
    widens the weights in registers; the fallback casts each weight to FP32 inside the graph. For a
    card (`wide` FP16) the cast is none and the matmuls are FP16.
    """

    KERNEL = "FerryExpertsF16"
    LAUNCH_KERNEL = "FerryExpertLaunchF16"

    def expert(self, x, g, weights):
        gate_up = ops.cast(weights[g], self.wide)  # [2I, H]
        down = ops.cast(weights[self.slots + g], self.wide)  # [H, I]
        hidden = swiglu(self.linear(x, gate_up), self.intermediate)  # [C, I]
        return self.linear(hidden, down)  # [C, H]


class ExpertGroupInt8(ExpertGroup):
    """ExpertGroup over INT8 weight-only storage with one FP32 scale per output channel.

    After x come G `gate_up` [2I, H] int8, G `down` [H, I] int8, G `gate_up_scale` [2I] and
    G `down_scale` [H]. A row's scale multiplies that row's dot products, so it is applied to the
    matmul output ([C, 2I], [C, H]) rather than to the weight: the same value, fewer multiplies.
    """

    KERNEL = "FerryExpertsI8"
    LAUNCH_KERNEL = "FerryExpertLaunchI8"
    POOL_PARTS = (0, 0, 1, 1)  # int8 weights in the pool's first tensor, float32 scales in its second

    def expert(self, x, g, weights):
        n = self.slots
        gate_up = ops.cast(weights[g], self.wide)  # [2I, H] integer values
        down = ops.cast(weights[n + g], self.wide)  # [H, I]
        hidden = swiglu(self.linear(x, gate_up) * weights[2 * n + g], self.intermediate)  # [C, I]
        return self.linear(hidden, down) * weights[3 * n + g]  # [C, H]


class ExpertLaunch(nn.Cell):
    """One expert-group launch over device-resident activations: T tokens, a group of G slots of C rows,
    its experts read from the expert pool by slot index.

    Inputs: `hidden` [T, H] (the layer's output so far), `x` [T, H] (its MoE input), `rows` [G, C]
    int32 (the token of each slot row; padding rows name any token), `scale` [G, C] (the router's
    weight of each row; 0 on padding), `counts` [G] int32, `slots` [G] int32 (the pool slot of each of
    the G experts), then the pool: one tensor [S, R] per storage dtype of the block, row s holding that
    dtype's region of the block in slot s from its start (`POOL_PARTS` says which part lies in which;
    `offload.device.ExpertPool` builds it). S and R are the pool's, not the graph's: one graph serves a
    pool of any size. `offsets` (at construction: `artifact.store.part_offsets`) say where each part
    starts in its row. Returns hidden + sum over rows of scale * expert(x[row]) added at each row's
    token, [T, H]: only `rows`, `scale`, `counts` and `slots` come from the host. Where the group has a
    CPU kernel the whole launch is one call of its launch kernel (`LAUNCH_KERNEL`), which reads each
    expert where it lies in the pool: MindSpore's gather, multiply and scatter-add around the group
    added 12-26% to a prefill launch (2 slots of 64 rows over 1024 tokens), 0-8% to a decode launch
    (`python -m bench.expert_launch`). The operators' path (graphs for a card) gathers the G experts'
    rows of the pool first and slices their parts out.
    """

    def __init__(self, group: ExpertGroup, hidden: int, offsets: tuple[int, ...]):
        super().__init__()
        self.group = group
        i = group.intermediate
        self.shapes = ((2 * i, hidden), (hidden, i), (2 * i,), (hidden,))[: len(group.POOL_PARTS)]
        if len(offsets) != len(self.shapes):
            raise ValueError(f"{type(group).__name__} blocks have {len(self.shapes)} parts, got {len(offsets)} offsets")
        self.pool_parts, self.offsets = group.POOL_PARTS, tuple(offsets)
        self.sizes = tuple(math.prod(shape) for shape in self.shapes)
        self.layout = Tensor(np.array((i,) + self.offsets, np.int32))  # [1 + P], the kernel's: I, then offsets
        self.kernel = (cpu_kernel(group.LAUNCH_KERNEL, lambda hidden, *shapes: hidden, lambda hidden, *dtypes: hidden)
                       if group.use_kernel else None)
        self.use_kernel = self.kernel is not None

    def construct(self, hidden, x, rows, scale, counts, slots, *pool):
        if self.use_kernel:
            return self.kernel(hidden, x, rows, scale, counts, slots, self.layout, *pool)  # [T, H]
        group, capacity = rows.shape
        tables = tuple(ops.gather(tensor, slots, 0) for tensor in pool)  # [G, R] each: the experts' rows
        weights = ()
        for p in range(len(self.shapes)):
            start = self.offsets[p]
            part = tables[self.pool_parts[p]][:, start:start + self.sizes[p]].reshape((group,) + self.shapes[p])
            weights += tuple(part[g] for g in range(group))  # G slot arrays of this part
        flat = rows.reshape(-1)  # [G*C]
        gathered = ops.gather(x, flat, 0).reshape(group, capacity, -1)  # [G, C, H]
        y = self.group(gathered, counts, *weights) * scale.reshape(group, capacity, 1)  # [G, C, H]
        return ops.tensor_scatter_add(hidden, flat.reshape(-1, 1), y.reshape(group * capacity, -1))  # [T, H]


class SlotWrite(nn.Cell):
    """Expert blocks written into their slots of the expert pool, in place: the only way a block enters
    device memory when the memory model keeps the host apart (`offload.device`).

    Inputs: `slots` [B] int32, the pool's K tensors [S, R_k] (updated in place), then the B blocks split
    the same way, K tensors [B, R_k]; returns `slots` (the pool is not an output: returning it would copy
    it). On the CPU one call of Ferry's kernel (`FerrySlotWrite`, a threaded copy); for a card
    MindSpore's ScatterUpdate per tensor.
    """

    def __init__(self, cpu_kernels: bool = True):
        super().__init__()
        self.kernel = cpu_kernel("FerrySlotWrite", lambda slots, *shapes: slots,
                                 lambda slots, *dtypes: slots) if cpu_kernels else None
        self.use_kernel = self.kernel is not None

    def construct(self, slots, *pool_and_blocks):
        if self.use_kernel:
            return self.kernel(slots, *pool_and_blocks)  # [B]
        k = len(pool_and_blocks) // 2
        for i in range(k):
            ops.scatter_update(pool_and_blocks[i], slots, pool_and_blocks[k + i])
        return slots


GROUPS = {"fp32": ExpertGroup, "fp16": ExpertGroupFP16, "int8": ExpertGroupInt8}  # by expert storage dtype
