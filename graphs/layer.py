"""One decoder layer up to the routed experts: norm, token mixer, residual, norm, router, shared expert.

Legend: T tokens in the launch, H hidden, K experts per token.

Each launch returns `partial` = residual + mixer + shared expert, the normed input `x_moe` the
routed experts consume, and the router's top-K weights and expert ids; the expert-group launches
(`graphs.moe.ExpertLaunch`) add the routed experts' weighted outputs to `partial` on the device.
Weights arrive as trailing positional inputs ordered by `*_WEIGHTS`, so one compiled graph serves
every layer of the same kind. (Not as one tuple: MindSpore folds a tuple argument into the graph as a
constant and would recompile for every layer.)

On the CPU a layer's decode launch (T = 1) is one call of Ferry's kernel (`FerryDeltaNetDecode`,
`FerryAttentionDecode`, kernels/ferry_cpu.cc): the same arithmetic, each weight row read once, the
token's key and value written into the KV cache in place, as the operators' graph does.
Prefill launches, and graphs for a card (`cpu_kernels=False`), run MindSpore's operators.
"""
import numpy as np
from mindspore import Tensor, nn
from mindspore.common import dtype as mstype

from graphs.attention import GatedAttention
from graphs.common import cpu_kernel, rms_norm, wide_dtype
from graphs.deltanet import GatedDeltaNet
from graphs.moe import Router, SharedExpert

MOE_WEIGHTS = ("post_attn_norm", "router", "shared_gate", "shared_up", "shared_down", "shared_expert_gate")
ATTENTION_WEIGHTS = ("input_norm", "q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm") + MOE_WEIGHTS
DELTANET_WEIGHTS = (
    "input_norm", "in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "conv1d", "A_log", "dt_bias", "norm",
    "out_proj",
) + MOE_WEIGHTS


class MoEInput(nn.Cell):
    """Post-mixer half: residual add, norm, router and shared expert."""

    def __init__(self, spec, wide):
        super().__init__()
        self.eps = spec.rms_norm_eps
        self.router = Router(spec.num_experts_per_tok, wide)
        self.shared = SharedExpert(wide)

    def construct(self, residual, mixed, post_norm, router, gate, up, down, shared_gate):
        h = residual + mixed  # [T, H]
        x_moe = rms_norm(h, post_norm, self.eps)  # [T, H]
        weights, experts = self.router(x_moe, router)  # [T, K], [T, K]
        partial = h + self.shared(x_moe, gate, up, down, shared_gate)  # [T, H]
        return partial, x_moe, weights, experts


class AttentionLayer(nn.Cell):
    """Full-attention layer. State: the KV cache, updated in place with this launch's keys and values."""

    def __init__(self, spec, tokens: int, cpu_kernels: bool = True):
        super().__init__()
        self.eps = spec.rms_norm_eps
        self.attention = GatedAttention(spec, tokens, wide_dtype(cpu_kernels))
        self.moe_input = MoEInput(spec, wide_dtype(cpu_kernels))
        top_k = spec.num_experts_per_tok
        self.kernel = cpu_kernel(
            "FerryAttentionDecode",
            lambda h, *rest: (h, h, [h[0], top_k], [h[0], top_k]),
            lambda h, *rest: (h, h, h, mstype.int32),
        ) if cpu_kernels and tokens == 1 else None
        self.use_kernel = self.kernel is not None
        self.eps_input = Tensor(np.array([self.eps], np.float32))  # [1], the kernel's norm epsilon

    def construct(self, h, cos, sin, k_cache, v_cache, cache_len, *w):
        if self.use_kernel:
            return self.kernel(h, cos, sin, k_cache, v_cache, cache_len, self.eps_input, *w)
        x = rms_norm(h, w[0], self.eps)
        mixed = self.attention(x, w[1], w[2], w[3], w[4], w[5], w[6], cos, sin, k_cache, v_cache, cache_len)
        return self.moe_input(h, mixed, w[7], w[8], w[9], w[10], w[11], w[12])


class DeltaNetLayer(nn.Cell):
    """Linear-attention layer. State: conv state and recurrent state, returned updated."""

    def __init__(self, spec, tokens: int, cpu_kernels: bool = True):
        super().__init__()
        self.eps = spec.rms_norm_eps
        self.deltanet = GatedDeltaNet(spec, tokens, wide_dtype(cpu_kernels))
        self.moe_input = MoEInput(spec, wide_dtype(cpu_kernels))
        top_k = spec.num_experts_per_tok
        self.kernel = cpu_kernel(
            "FerryDeltaNetDecode",
            lambda h, conv, rec, *rest: (h, h, [h[0], top_k], [h[0], top_k], conv, rec),
            lambda h, conv, rec, *rest: (h, h, h, mstype.int32, conv, rec),
        ) if cpu_kernels and tokens == 1 else None
        self.use_kernel = self.kernel is not None
        self.eps_input = Tensor(np.array([self.eps], np.float32))  # [1], the kernel's norm epsilon

    def construct(self, h, conv_state, rec_state, n_valid, *w):
        if self.use_kernel:
            return self.kernel(h, conv_state, rec_state, n_valid, self.eps_input, *w)
        x = rms_norm(h, w[0], self.eps)
        mixed, conv_state, rec_state = self.deltanet(x, w[1], w[2], w[3], w[4], w[5], w[6], w[7], w[8], w[9],
                                                     conv_state, rec_state, n_valid)
        partial, x_moe, weights, experts = self.moe_input(h, mixed, w[10], w[11], w[12], w[13], w[14], w[15])
        return partial, x_moe, weights, experts, conv_state, rec_state
