"""Token embedding and the output head. Legend: T tokens, V vocabulary, H hidden."""
import numpy as np
from mindspore import Tensor, nn, ops
from mindspore.common import dtype as mstype

from graphs.common import Linear, cpu_kernel, rms_norm, to_f32, wide_dtype


class Embedding(nn.Cell):
    def construct(self, ids, table):
        return to_f32(ops.gather(table, ids, 0))  # [T] -> [T, H], FP32 whatever the table's dtype


class Head(nn.Cell):
    """Final (1 + w) RMSNorm and the vocabulary projection; also each row's greedy choice, so a greedy
    decode reads back one id instead of the vocabulary's logits."""

    def __init__(self, eps: float, cpu_kernels: bool = True):
        super().__init__()
        self.eps = eps
        self.linear = Linear(wide_dtype(cpu_kernels))

    def construct(self, h, final_norm, lm_head):
        return self.project(h, final_norm, lm_head)

    def project(self, h, final_norm, lm_head):
        logits = self.linear(rms_norm(h, final_norm, self.eps), lm_head)  # [T, V]
        return logits, ops.argmax(logits, -1).astype(mstype.int32)  # [T, V], [T]


class LastHead(Head):
    """The head over one row of a launch's hidden states (`row` [1] int32, the last real token): a
    prompt's last launch reads back one row's logits or choice, and projects one row, not T.

    On the CPU this is one call of Ferry's kernel (`FerryLastHead`), which reads the vocabulary
    projection once at close to the memory bandwidth; for a card (`cpu_kernels=False`), MindSpore's
    operators."""

    def __init__(self, eps: float, cpu_kernels: bool = True):
        super().__init__(eps, cpu_kernels)
        self.kernel = cpu_kernel("FerryLastHead", lambda h, row, eps, norm, head: ([1, head[0]], [1]),
                                 lambda h, row, *rest: (h, mstype.int32)) if cpu_kernels else None
        self.use_kernel = self.kernel is not None
        self.eps_input = Tensor(np.array([eps], np.float32))  # [1], the kernel's norm epsilon

    def construct(self, h, row, final_norm, lm_head):
        if self.use_kernel:
            return self.kernel(h, row, self.eps_input, final_norm, lm_head)  # [1, V], [1]
        return self.project(ops.gather(h, row, 0), final_norm, lm_head)  # [1, V], [1]
