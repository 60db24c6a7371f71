"""Gated full attention with q/k RMSNorm, partial RoPE and a static KV cache.

Legend: T tokens in the launch, S cache capacity (max context), H hidden, N query heads,
KV key/value heads, R = N / KV queries per KV head, D head dim, P rotary dims.

The caches are device tensors the graph updates in place: this launch's T keys and values are
written at rows cache_len .. cache_len+T-1 (a scatter into the input; padding rows land past the
last real token, masked, and the next launch overwrites them), so nothing of the cache crosses to
the host. Scores against the cache's first `cache_len` rows and against the new keys are computed
separately, so the cache is read once and never concatenated (copied); whether the read sees the
rows this launch writes does not matter, since they are masked there. A FP16 cache (the
`ascend_310p3` target) is multiplied in FP16 as it is, the queries and probabilities cast to it;
softmax stays FP32.
"""
import numpy as np
from mindspore import Tensor, nn, ops
import mindspore as ms

from graphs.common import Linear, in_dtype_of, rms_norm, to_f32


def rotate_half(x):
    half = x.shape[-1] // 2
    return ops.concat((-x[..., half:], x[..., :half]), -1)


class GatedAttention(nn.Cell):
    def __init__(self, spec, tokens: int, wide):
        super().__init__()
        self.eps = spec.rms_norm_eps
        self.heads = spec.num_attention_heads
        self.kv_heads = spec.num_key_value_heads
        self.group = self.heads // self.kv_heads
        self.head_dim = spec.head_dim
        self.rotary = spec.rotary_dim
        self.scale = spec.head_dim ** -0.5
        self.tokens = tokens
        self.linear = Linear(wide)
        self.write = ops.ScatterNdUpdate()
        self.bmm_t = ops.BatchMatMul(transpose_b=True)
        self.bmm = ops.BatchMatMul()
        # causal mask among the launch's own tokens: 0 where visible, -inf above the diagonal
        causal = np.triu(np.full((tokens, tokens), -np.inf, np.float32), 1)
        self.causal = Tensor(causal)  # [T, T]
        self.offsets = Tensor(np.arange(tokens, dtype=np.int32).reshape(tokens, 1))  # [T, 1]

    def rope(self, x, cos, sin):
        """Rotate the first P dims of each head. x [T, heads, D], cos/sin [T, P]."""
        cos = ops.expand_dims(cos, 1)  # [T, 1, P]
        sin = ops.expand_dims(sin, 1)
        x_rot = x[..., : self.rotary]
        x_pass = x[..., self.rotary :]
        return ops.concat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), -1)

    def construct(self, x, q_proj, k_proj, v_proj, o_proj, q_norm, k_norm, cos, sin, k_cache, v_cache, cache_len):
        t, n, kv, r, d = self.tokens, self.heads, self.kv_heads, self.group, self.head_dim
        q_and_gate = self.linear(x, q_proj).reshape(t, n, 2 * d)  # [T, N, 2D]
        query = q_and_gate[..., :d]  # [T, N, D]
        gate = q_and_gate[..., d:].reshape(t, n * d)  # [T, N*D]
        query = rms_norm(query, q_norm, self.eps)
        key = rms_norm(self.linear(x, k_proj).reshape(t, kv, d), k_norm, self.eps)  # [T, KV, D]
        value = self.linear(x, v_proj).reshape(t, kv, d)  # [T, KV, D]
        query = self.rope(query, cos, sin)
        key = self.rope(key, cos, sin)

        # queries grouped under their KV head: [KV, R*T, D] (row = r * T + t)
        q = query.reshape(t, kv, r, d).transpose(1, 2, 0, 3).reshape(kv, r * t, d)
        key, value = in_dtype_of(key, k_cache), in_dtype_of(value, v_cache)  # returned in the cache's dtype
        q = in_dtype_of(q, k_cache)
        k_old = k_cache.transpose(1, 0, 2)  # [KV, S, D]
        v_old = v_cache.transpose(1, 0, 2)
        k_new = key.transpose(1, 0, 2)  # [KV, T, D]
        v_new = value.transpose(1, 0, 2)

        rows = k_cache.shape[0]  # S: the cache's rows (static)
        positions = ops.arange(rows, dtype=ms.int32)  # [S]
        old_mask = ops.select(positions < cache_len, ops.zeros((rows,), ms.float32),
                              ops.fill(ms.float32, (rows,), -np.inf))  # [S]
        new_mask = ops.tile(self.causal, (r, 1))  # [R*T, T]
        scores_old = to_f32(self.bmm_t(q, k_old)) * self.scale + old_mask  # [KV, R*T, S]
        scores_new = to_f32(self.bmm_t(q, k_new)) * self.scale + new_mask  # [KV, R*T, T]
        probs = in_dtype_of(ops.softmax(ops.concat((scores_old, scores_new), -1), -1), v_cache)  # [KV, R*T, S+T]
        out = to_f32(self.bmm(probs[..., :rows], v_old) + self.bmm(probs[..., rows:], v_new))
        out = out.reshape(kv, r, t, d).transpose(2, 0, 1, 3).reshape(t, n * d)  # [T, N*D]
        out = out * ops.sigmoid(gate)
        where = cache_len + self.offsets  # [T, 1] rows of this launch's tokens
        written = (self.write(k_cache, where, key), self.write(v_cache, where, value))
        return ops.depend(self.linear(out, o_proj), written)  # [T, H]; the caches updated
