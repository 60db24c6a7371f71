"""Prefetch: guess the next layer's experts while the current layer computes, and stream them early.

Legend: N tokens, H hidden, E experts, K experts per token.

The guess applies layer l+1's router to layer l's MoE input `x` on the host (a [N, H] x [H, E]
product and a top-K): consecutive layers' hidden states differ by one residual update, so the
next router mostly picks the same experts from the current state (the idea of Pre-gated MoE and
of AdapMoE's lookahead gating, without training anything). The dispatcher hands over `x` once
the current layer's last launch has its weights; a background thread makes the guess and issues
the copies (`OffloadedExperts.prefetch`) while the main thread runs that launch and the next
layer's attention graph. Hints are not queued: a newer one replaces one not yet started, so the
thread never works on a layer the launch loop has passed.

Hits, waste and stall are counted by the provider (`offload.counters`).
"""
from __future__ import annotations

import threading
from typing import Callable, Sequence

import numpy as np


class RouterPredictor:
    """Next-layer expert guesses from the routers' weights, `routers[l]` = [E, H]."""

    def __init__(self, routers: Sequence[np.ndarray], top_k: int):
        self.routers = [np.ascontiguousarray(r, np.float32) for r in routers]
        self.top_k = top_k

    def predict(self, layer: int, x: np.ndarray, limit: int) -> list[int]:
        """`limit` experts for layer `layer` given tokens x [N, H]: the ones its router would pick, most
        picked first, then the rest by their strongest logit (a guess wider than top-K names the
        experts the router nearly picked: on the trained demo, 8 guesses per token name 78% of the
        next layer's experts, 10 name 85%; `python bench/routing.py`)."""
        logits = x @ self.routers[layer].T  # [N, E]; softmax keeps the order, so top-K of logits
        top = np.argpartition(-logits, self.top_k - 1, axis=1)[:, : self.top_k]  # [N, K]
        counts = np.bincount(top.ravel(), minlength=logits.shape[1])  # [E]
        best = logits.max(axis=0)  # [E]: ties in counts go to the strongest single preference
        order = np.lexsort((-best, -counts))
        return [int(e) for e in order[:limit]]


class Prefetcher:
    """One background thread turning `hint(layer, x)` into prefetches of layer + 1.

    `prefetch(layer, experts)` issues the copies (the provider's method); `skip(layer, expert)`
    names experts never streamed (computed on the host by a static placement).
    """

    def __init__(self, predictor: RouterPredictor, prefetch: Callable[[int, list[int]], int], num_layers: int,
                 limit: int, skip: Callable[[int, int], bool] | None = None,
                 record: Callable[[int, list[int]], None] | None = None):
        if limit < 1:
            raise ValueError(f"prefetch limit must be at least 1 expert per layer, got {limit}")
        self.predictor = predictor
        self._prefetch = prefetch
        self.num_layers = num_layers
        self.limit = limit
        self._skip = skip
        self._record = record
        self._cond = threading.Condition()
        self._hint: tuple[int, np.ndarray] | None = None
        self._busy = False
        self._closed = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="ferry-prefetch", daemon=True)
        self._thread.start()

    def hint(self, layer: int, x: np.ndarray) -> None:
        """Layer `layer`'s MoE input is known: prefetch for layer + 1 (none after the last layer)."""
        if layer + 1 >= self.num_layers:
            return
        with self._cond:
            self._hint = (layer + 1, x)
            self._cond.notify()

    def drain(self) -> None:
        """Wait until the thread has finished every hint given so far."""
        with self._cond:
            self._cond.wait_for(lambda: self._hint is None and not self._busy)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._hint is not None or self._closed)
                if self._closed:
                    return
                (layer, x), self._hint, self._busy = self._hint, None, True
            try:
                # with host-placed experts to drop, rank every guess, then cut to `limit`
                everything = self.predictor.routers[layer].shape[0]
                experts = self.predictor.predict(layer, x, self.limit if self._skip is None else everything)
                if self._skip is not None:
                    experts = [e for e in experts if not self._skip(layer, e)][: self.limit]
                if self._record is not None:
                    self._record(layer, experts)
                self._prefetch(layer, experts)
            except BaseException as err:  # surfaced by the dispatcher; prefetch is only an optimisation
                self.error = err
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

