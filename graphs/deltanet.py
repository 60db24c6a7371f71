"""Gated DeltaNet (linear attention) with a causal conv state and a recurrent state.

Legend: T tokens in the launch, H hidden, C conv channels (q, k, v side by side), W conv width,
Hk key heads, Hv value heads, Dk key dim, Dv value dim, L chunk length, M = T / L chunks.

One launch of T > 1 tokens uses the chunked form (as `torch_chunk_gated_delta_rule`); T == 1 uses
the recurrent step. Tokens at or past `n_valid` are padding: their beta and decay are zeroed, which
leaves both states exactly as the real tokens left them.
"""
import numpy as np
from mindspore import Tensor, nn, ops
import mindspore as ms

from graphs.common import Linear, gated_rms_norm, l2_normalize

CHUNK = 64  # DeltaNet chunk length, as in the reference implementation


def unit_lower_inverse(strict_lower, size: int):
    """(I + A)^-1 for strictly lower-triangular A [..., L, L], exactly, in log2(L) matmul pairs.

    With N = -A nilpotent, (I - N)^-1 = (I + N)(I + N^2)(I + N^4)... up to N^(2^k) >= L.
    """
    eye = Tensor(np.eye(size, dtype=np.float32))
    power = -strict_lower
    inverse = eye + power
    reach = 2
    while reach < size:
        power = ops.matmul(power, power)
        inverse = inverse + ops.matmul(inverse, power)
        reach *= 2
    return inverse


class GatedDeltaNet(nn.Cell):
    def __init__(self, spec, tokens: int, wide):
        super().__init__()
        self.eps = spec.rms_norm_eps
        self.tokens = tokens
        self.k_heads = spec.linear_num_key_heads
        self.v_heads = spec.linear_num_value_heads
        self.k_dim = spec.linear_key_head_dim
        self.v_dim = spec.linear_value_head_dim
        self.key_width = spec.linear_key_dim
        self.width = spec.linear_conv_kernel_dim
        self.chunk = CHUNK if tokens % CHUNK == 0 else tokens
        if tokens > 1 and tokens % self.chunk:
            raise ValueError(f"DeltaNet launch of {tokens} tokens is not a multiple of the chunk {CHUNK}")
        self.linear = Linear(wide)
        self.bmm = ops.BatchMatMul()
        self.positions = Tensor(np.arange(tokens, dtype=np.int32))  # [T]
        self.state_rows = Tensor(np.arange(self.width - 1, dtype=np.int32))  # [W-1]
        size = self.chunk
        self.lower_incl = Tensor(np.tril(np.ones((size, size), np.float32)))  # [L, L]
        self.lower_strict = Tensor(np.tril(np.ones((size, size), np.float32), -1))

    def conv(self, mixed, conv_weight, conv_state, n_valid):
        """Causal depthwise conv over [state; mixed], SiLU; returns output and the new state."""
        t, w = self.tokens, self.width
        padded = ops.concat((conv_state, mixed), 0)  # [W-1+T, C]
        if t == 1:  # decode: one dot product per channel; the state shifts by one row
            out = ops.sum(padded.transpose(1, 0) * conv_weight, 1).reshape(1, -1)  # [1, C]
            return ops.silu(out), padded[1:]
        out = padded[0:t] * conv_weight[:, 0]
        for j in range(1, w):
            out = out + padded[j : j + t] * conv_weight[:, j]  # [T, C]
        new_state = ops.gather(padded, self.state_rows + n_valid, 0)  # last W-1 real inputs [W-1, C]
        return ops.silu(out), new_state

    def heads_qkv(self, mixed):
        t = self.tokens
        q = mixed[:, : self.key_width].reshape(t, self.k_heads, self.k_dim)
        k = mixed[:, self.key_width : 2 * self.key_width].reshape(t, self.k_heads, self.k_dim)
        v = mixed[:, 2 * self.key_width :].reshape(t, self.v_heads, self.v_dim)  # [T, Hv, Dv]
        rep = self.v_heads // self.k_heads
        if rep > 1:  # each key head serves `rep` consecutive value heads
            q = ops.broadcast_to(q.reshape(t, self.k_heads, 1, self.k_dim), (t, self.k_heads, rep, self.k_dim))
            k = ops.broadcast_to(k.reshape(t, self.k_heads, 1, self.k_dim), (t, self.k_heads, rep, self.k_dim))
        q = l2_normalize(q.reshape(t, self.v_heads, self.k_dim)) * (self.k_dim ** -0.5)  # [T, Hv, Dk]
        k = l2_normalize(k.reshape(t, self.v_heads, self.k_dim))
        return q, k, v

    def recurrent(self, q, k, v, beta, decay, state):
        """One token. q/k [1, Hv, Dk], v [1, Hv, Dv], beta/decay [1, Hv], state [Hv, Dk, Dv].

        Reads and the rank-1 update are batched matmuls: reductions over the state's middle axis
        run several times slower on the CPU kernels."""
        hv, dk, dv = self.v_heads, self.k_dim, self.v_dim
        state = state * ops.exp(decay[0]).reshape(hv, 1, 1)
        k_row = k[0].reshape(hv, 1, dk)
        remembered = self.bmm(k_row, state)  # [Hv, 1, Dv]
        delta = (v[0].reshape(hv, 1, dv) - remembered) * beta[0].reshape(hv, 1, 1)
        state = state + self.bmm(k_row.reshape(hv, dk, 1), delta)  # rank-1 update [Hv, Dk, Dv]
        out = self.bmm(q[0].reshape(hv, 1, dk), state)  # [Hv, 1, Dv]
        return out.reshape(1, hv, dv), state

    def chunked(self, q, k, v, beta, decay, state):
        """T tokens in M chunks of L. Same algebra as the reference chunked gated delta rule."""
        hv, l, m = self.v_heads, self.chunk, self.tokens // self.chunk
        q = q.transpose(1, 0, 2).reshape(hv, m, l, self.k_dim)  # [Hv, M, L, Dk]
        k = k.transpose(1, 0, 2).reshape(hv, m, l, self.k_dim)
        v = v.transpose(1, 0, 2).reshape(hv, m, l, self.v_dim)  # [Hv, M, L, Dv]
        beta = beta.transpose(1, 0).reshape(hv, m, l, 1)
        decay = decay.transpose(1, 0).reshape(hv, m, l)  # [Hv, M, L]
        k_beta = k * beta
        v_beta = v * beta
        cum = ops.cumsum(decay, -1)  # [Hv, M, L]
        # pairwise decay exp(cum_i - cum_j) for j <= i, zero above the diagonal
        pair = ops.exp((cum.reshape(hv, m, l, 1) - cum.reshape(hv, m, 1, l)) * self.lower_incl) * self.lower_incl
        system = ops.matmul(k_beta, k.swapaxes(-1, -2)) * pair * self.lower_strict  # [Hv, M, L, L]
        solve = unit_lower_inverse(system, l)
        new_values = ops.matmul(solve, v_beta)  # [Hv, M, L, Dv]
        k_cumdecay = ops.matmul(solve, k_beta * ops.exp(cum).reshape(hv, m, l, 1))  # [Hv, M, L, Dk]
        intra = ops.matmul(q, k.swapaxes(-1, -2)) * pair  # [Hv, M, L, L]
        q_decayed = q * ops.exp(cum).reshape(hv, m, l, 1)
        k_decayed = k * ops.exp(cum[..., -1:] - cum).reshape(hv, m, l, 1)
        chunk_decay = ops.exp(cum[..., -1]).reshape(hv, m, 1, 1)
        # per-chunk operands split once: indexing x[:, i] inside the loop runs ~5x slower on the CPU
        new_values, k_cumdecay, q_decayed, intra, chunk_decay = (
            ops.unstack(part, 1) for part in (new_values, k_cumdecay, q_decayed, intra, chunk_decay))
        k_decayed_t = ops.unstack(k_decayed.swapaxes(-1, -2), 1)  # M x [Hv, Dk, L]
        outs = []
        for i in range(m):
            v_new = new_values[i] - ops.matmul(k_cumdecay[i], state)  # [Hv, L, Dv]
            outs.append(ops.matmul(q_decayed[i], state) + ops.matmul(intra[i], v_new))
            state = state * chunk_decay[i] + ops.matmul(k_decayed_t[i], v_new)
        out = ops.stack(outs, 1).reshape(hv, self.tokens, self.v_dim).transpose(1, 0, 2)  # [T, Hv, Dv]
        return out, state

    def construct(self, x, in_proj_qkv, in_proj_z, in_proj_b, in_proj_a, conv1d, a_log, dt_bias, norm,
                  out_proj, conv_state, rec_state, n_valid):
        t = self.tokens
        mixed, conv_state = self.conv(self.linear(x, in_proj_qkv), conv1d, conv_state, n_valid)  # [T, C]
        q, k, v = self.heads_qkv(mixed)
        real = (self.positions < n_valid).astype(ms.float32).reshape(t, 1)  # [T, 1]
        beta = ops.sigmoid(self.linear(x, in_proj_b)) * real  # [T, Hv]
        decay = -ops.exp(a_log) * ops.softplus(self.linear(x, in_proj_a) + dt_bias) * real  # [T, Hv]
        if t == 1:
            core, rec_state = self.recurrent(q, k, v, beta, decay, rec_state)
        else:
            core, rec_state = self.chunked(q, k, v, beta, decay, rec_state)
        z = self.linear(x, in_proj_z).reshape(t, self.v_heads, self.v_dim)
        core = gated_rms_norm(core, z, norm, self.eps).reshape(t, self.v_heads * self.v_dim)  # [T, Hv*Dv]
        return self.linear(core, out_proj), conv_state, rec_state  # [T, H], [W-1, C], [Hv, Dk, Dv]
