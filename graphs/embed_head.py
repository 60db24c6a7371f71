"""Token embedding and the output head. Legend: T tokens, V vocabulary, H hidden."""
from mindspore import nn, ops
from mindspore.common import dtype as mstype

from graphs.common import Linear, rms_norm, to_f32


class Embedding(nn.Cell):
    def construct(self, ids, table):
        return to_f32(ops.gather(table, ids, 0))  # [T] -> [T, H], FP32 whatever the table's dtype


class Head(nn.Cell):
    """Final (1 + w) RMSNorm and the vocabulary projection; also each row's greedy choice, so a greedy
    decode reads back one id instead of the vocabulary's logits."""

    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps
        self.linear = Linear()

    def construct(self, h, final_norm, lm_head):
        return self.project(h, final_norm, lm_head)

    def project(self, h, final_norm, lm_head):
        logits = self.linear(rms_norm(h, final_norm, self.eps), lm_head)  # [T, V]
        return logits, ops.argmax(logits, -1).astype(mstype.int32)  # [T, V], [T]


class LastHead(Head):
    """The head over one row of a launch's hidden states (`row` [1] int32, the last real token): a
    prompt's last launch reads back one row's logits or choice, and projects one row, not T."""

    def construct(self, h, row, final_norm, lm_head):
        return self.project(ops.gather(h, row, 0), final_norm, lm_head)  # [1, V], [1]
