"""The MoE halves that run as graphs: the router with the shared expert, and one expert group.

Legend: T tokens, H hidden, E experts, K experts per token, I expert intermediate width,
G expert slots in one launch, C token capacity of each slot.

The routed experts run in an expert-group launch whose weights are *inputs*, one pair per slot,
so any slot can hold any expert and the offload controller decides where weights live. Which
tokens go to which slot is decided on the host from the router's output.
"""
from mindspore import nn, ops

from graphs.common import Linear, SwiGLU


class Router(nn.Cell):
    """Softmax over E experts, top-K, renormalised: the same arithmetic as the reference router."""

    def __init__(self, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.linear = Linear()

    def construct(self, x, router):
        probs = ops.softmax(self.linear(x, router), -1)  # [T, E]
        weights, experts = ops.topk(probs, self.top_k)  # [T, K], [T, K]
        return weights / ops.sum(weights, -1, keepdim=True), experts


class SharedExpert(nn.Cell):
    """The always-on expert, scaled by sigmoid(shared_expert_gate . x)."""

    def __init__(self):
        super().__init__()
        self.mlp = SwiGLU()
        self.linear = Linear()

    def construct(self, x, gate, up, down, shared_expert_gate):
        return ops.sigmoid(self.linear(x, shared_expert_gate)) * self.mlp(x, gate, up, down)  # [T, H]


class ExpertGroup(nn.Cell):
    """G routed experts in one launch: x [G, C, H] -> [G, C, H].

    After x come G `gate_up` weights [2I, H] (gate rows, then up rows), then G `down` weights [H, I],
    one pair per slot as separate inputs, so that no launch stacks (copies) expert weights.
    """

    def __init__(self, slots: int, intermediate: int):
        super().__init__()
        self.slots = slots
        self.intermediate = intermediate
        self.linear = Linear()

    def construct(self, x, *weights):
        outs = []
        for g in range(self.slots):
            both = self.linear(x[g], weights[g])  # [C, 2I]
            hidden = ops.silu(both[:, : self.intermediate]) * both[:, self.intermediate :]  # [C, I]
            outs.append(self.linear(hidden, weights[self.slots + g]))  # [C, H]
        return ops.stack(outs)  # [G, C, H]
