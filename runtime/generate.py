"""Prefill then decode, one token at a time, stopping on EOS or `max_new_tokens`."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from runtime.engine import Engine
from runtime.sampling import Sampler, Sampling


@dataclass
class Generation:
    """What one call produced, with its timings (seconds)."""

    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    stopped_on_eos: bool = False
    time_to_first_token: float = 0.0
    decode_time: float = 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        steps = len(self.token_ids) - 1
        return steps / self.decode_time if steps > 0 and self.decode_time > 0 else 0.0


def generate(engine: Engine, prompt_ids: Sequence[int], max_new_tokens: int, sampling: Sampling = Sampling(),
             eos_ids: Sequence[int] | None = None, on_token: Callable[[int], None] | None = None) -> Generation:
    """Generate from a fresh sequence. `on_token` sees every new id as soon as it exists (streaming)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    # an empty prompt and ids outside the vocabulary are refused by engine.forward before it launches
    if len(prompt_ids) + max_new_tokens - 1 > engine.max_context:
        raise ValueError(f"a prompt of {len(prompt_ids)} tokens and {max_new_tokens} new tokens need "
                         f"{len(prompt_ids) + max_new_tokens - 1} positions, more than max_context={engine.max_context}")
    eos = set(engine.spec.eos_token_ids if eos_ids is None else eos_ids)
    sampler = Sampler(sampling)
    result = Generation(prompt_ids=[int(t) for t in prompt_ids])
    engine.reset()
    # greedy: the head picks the token on the device and only its id comes back; else the logits
    next_token = engine.next_greedy if sampling.greedy else (lambda ids: sampler(engine.forward(ids)))
    start = time.perf_counter()
    token = next_token(result.prompt_ids)
    for step in range(max_new_tokens):
        if step == 0:
            result.time_to_first_token = time.perf_counter() - start
            decode_start = time.perf_counter()
        result.token_ids.append(token)
        if on_token is not None:
            on_token(token)
        if token in eos:
            result.stopped_on_eos = True
            break
        if step + 1 < max_new_tokens:
            token = next_token([token])
    result.decode_time = time.perf_counter() - decode_start
    return result
