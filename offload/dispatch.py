"""Routed-expert dispatch for one layer: group tokens by expert, launch per capacity tier, combine.

Legend: N real tokens, K experts per token, H hidden, E experts, G slots and C capacity of a tier.

The router's choice comes back to the host (the one read per layer the offload controller needs);
tokens are sorted by expert, cut into pieces by `plan_launches`, gathered into the tier's padded
`[G, C, H]` input, and each launch's output rows are added to their tokens, weighted by the router.
Where the weights of a launch come from is the `ExpertWeights` provider's business.

The offload controller hooks in here: a `Placement` sends some experts to host compute (numpy, from
the host store) instead of launches; a `Prefetcher` gets the layer's MoE input as soon as the
layer's last launch has its weights, to stream the next layer's experts while this one computes;
`stats` (`OffloadCounters`) counts launches and padding per layer and tier, and host experts.
"""
from __future__ import annotations

from typing import Callable, Protocol, Sequence

import numpy as np
import mindspore as ms

from offload.counters import LayerCounters, OffloadCounters
from offload.crossings import Crossings
from offload.placement import Placement, host_expert
from offload.tiers import Launch, Tier, TierSet, plan_launches


class ExpertGroupGraphs(Protocol):
    def expert_group(self, tier: Tier) -> Callable: ...


class ExpertWeights(Protocol):
    """Gives the device tensors of the experts one launch needs, flat, in the order the tier's
    expert-group graph takes them after its input (FP32: G gate_up weights, then G down weights)."""

    def launch_weights(self, layer: int, experts: Sequence[int]) -> tuple: ...


class ExpertDispatcher:
    """Runs the routed experts of any layer through the tier graphs (or on the host, by placement)."""

    def __init__(self, spec, tiers: TierSet, weights: ExpertWeights, graphs: ExpertGroupGraphs,
                 placement: Placement | None = None, host_store=None, prefetcher=None,
                 stats: OffloadCounters | None = None, crossings: Crossings | None = None):
        self.spec = spec
        self.tiers = tiers
        self.weights = weights
        self.groups = [graphs.expert_group(tier) for tier in tiers]
        # reusable host buffers per tier: the padded launch input and the real rows of each slot
        self.inputs = [np.zeros((t.group, t.capacity, spec.hidden_size), np.float32) for t in tiers]
        self.counts = [np.zeros(t.group, np.int32) for t in tiers]
        self.placement = placement or Placement()
        if self.placement.uses_host and host_store is None:
            raise ValueError("a placement that computes experts on the host needs the host expert store")
        self.host_store = host_store
        self.prefetcher = prefetcher
        self.stats = stats or OffloadCounters.create(spec.num_layers, tiers)
        self.crossings = crossings or Crossings()  # the engine's launches count theirs here too
        self._resident = getattr(weights, "is_resident", None)

    def run(self, layer: int, x: np.ndarray, weights: np.ndarray, experts: np.ndarray) -> np.ndarray:
        """Weighted sum of routed expert outputs. x [N, H], weights/experts [N, K] -> [N, H]."""
        n, k = experts.shape
        flat = experts.reshape(-1)  # [N*K] expert of each (token, choice)
        order = np.argsort(flat, kind="stable")  # (token, choice) rows grouped by expert
        loads = np.bincount(flat, minlength=self.spec.num_experts)  # [E]
        starts = np.concatenate(([0], np.cumsum(loads)[:-1]))  # [E] first row of each expert in `order`
        scale = weights.reshape(-1)  # [N*K]
        out = np.zeros((n, x.shape[1]), np.float32)
        on_host = self._host_experts(layer, loads)
        device_loads = loads
        if on_host:
            device_loads = loads.copy()
            device_loads[on_host] = 0
        launches = plan_launches(device_loads, self.tiers)
        if not launches:
            self._hint(layer, x)
        for i, launch in enumerate(launches):
            self._launch(layer, launch, x, order, starts, scale, out, k, hint=i == len(launches) - 1)
        for expert in on_host:
            rows = order[starts[expert] : starts[expert] + loads[expert]]  # flat (token, choice) indices
            self.host_store.verify_once(layer, expert)
            y = host_expert(x[rows // k], self.host_store.arrays(layer, expert))  # [rows, H]
            out[rows // k] += y * scale[rows, None]
            self.stats.layers[layer].host_experts += 1
            self.stats.layers[layer].host_tokens += len(rows)
        return out

    @property
    def counters(self) -> LayerCounters:
        """The run's totals over layers: launches, carried tokens and padding per tier, host experts."""
        return self.stats.total()

    def step_done(self, tokens: int, seconds: float) -> None:
        """The engine finished one launch of `tokens` tokens in `seconds` (wall time, stalls included)."""
        self.stats.step_done(tokens, seconds)

    def close(self) -> None:
        if self.prefetcher is not None:
            self.prefetcher.close()

    def _host_experts(self, layer: int, loads: np.ndarray) -> list[int]:
        if not self.placement.uses_host:
            return []
        resident = self._resident or (lambda layer, expert: True)
        return [int(e) for e in np.flatnonzero(loads)
                if self.placement.on_host(layer, int(e), int(loads[e]), resident(layer, int(e)))]

    def _hint(self, layer: int, x: np.ndarray) -> None:
        if self.prefetcher is None:
            return
        if self.prefetcher.error is not None:
            raise RuntimeError(f"the prefetch thread failed: {self.prefetcher.error!r}") from self.prefetcher.error
        self.prefetcher.hint(layer, x)

    def _launch(self, layer, launch: Launch, x, order, starts, scale, out, k, hint: bool = False) -> None:
        tier = self.tiers[launch.tier_index]
        buffer = self.inputs[launch.tier_index]  # [G, C, H]
        counts = self.counts[launch.tier_index]  # [G]
        buffer.fill(0.0)
        counts.fill(0)
        rows = []
        for g, piece in enumerate(launch.pieces):
            first = starts[piece.expert] + piece.start
            piece_rows = order[first : first + piece.count]  # flat (token, choice) indices
            buffer[g, : piece.count] = x[piece_rows // k]
            counts[g] = piece.count
            rows.append(piece_rows)
        experts = [piece.expert for piece in launch.pieces]
        experts += [experts[0]] * (tier.group - len(experts))  # padding slots reuse a resident expert
        weights = self.weights.launch_weights(layer, experts)
        if hint:  # the layer's last launch has its slots: prefetching can no longer evict them
            self._hint(layer, x)
        crossings = self.crossings
        y = crossings.to_host("expert output", self.groups[launch.tier_index](
            crossings.to_device("expert input", buffer), crossings.to_device("expert input", counts),
            *weights))  # [G, C, H]
        crossings.launched()
        for g, piece_rows in enumerate(rows):
            out[piece_rows // k] += y[g, : len(piece_rows)] * scale[piece_rows, None]
        carried = sum(len(r) for r in rows)
        per_layer = self.stats.layers[layer]
        per_layer.launches[launch.tier_index] += 1
        per_layer.tokens[launch.tier_index] += carried
        per_layer.padding[launch.tier_index] += tier.slot_tokens - carried


class ResidentExperts:
    """Every expert resident: one pair of tensors per expert, wrapping host arrays without copies."""

    def __init__(self, layers: Sequence[tuple[np.ndarray, np.ndarray]]):
        # layers[i] = (gate_up [E, 2I, H], down [E, H, I]); a slice along E stays contiguous
        self.tensors = [
            ([ms.Tensor.from_numpy(g) for g in gate_up], [ms.Tensor.from_numpy(d) for d in down])
            for gate_up, down in layers
        ]

    def launch_weights(self, layer: int, experts: Sequence[int]) -> tuple:
        gate_up, down = self.tensors[layer]
        return tuple(gate_up[e] for e in experts) + tuple(down[e] for e in experts)
