"""Routed-expert dispatch for one layer: group tokens by expert, launch per capacity tier, combine.

Legend: T tokens in the launch, N real tokens (N <= T), K experts per token, H hidden, E experts,
G slots and C capacity of a tier.

The layer's hidden state and MoE input stay on the device; the router's choice comes back to the
host (the one read per layer the offload controller needs). Tokens are sorted by expert and cut
into pieces by `plan_launches`; each launch of a tier's expert-group graph (`ExpertLaunch`) takes
from the host only which token each slot row holds and its router weight, gathers those rows of
the MoE input, and adds the weighted outputs to the hidden state, on the device. Where the weights
of a launch come from is the `ExpertWeights` provider's business.

The offload controller hooks in here: a `Placement` sends some experts to host compute (numpy, from
the host store) instead of launches, which reads the MoE input and the hidden state back and sends
the sum over; a `Prefetcher` gets the layer's MoE input (read back for it) as soon as the layer's
last launch has its weights, to stream the next layer's experts while this one computes; `stats`
(`OffloadCounters`) counts launches and padding per layer and tier, and host experts.

Launches run in order on one stream, so a slot is free for the next copy once the launch that reads
it has been issued on the CPU backend (graph calls return when done); on a card, a copy into a slot
would wait on the event of the last launch that read it.
"""
from __future__ import annotations

from typing import Callable, Protocol, Sequence

import numpy as np
import mindspore as ms

from offload.counters import LayerCounters, OffloadCounters
from offload.device import DeviceMemory, ExpertPool
from offload.placement import Placement, host_expert
from offload.tiers import Launch, Tier, TierSet, plan_launches


class ExpertGroupGraphs(Protocol):
    def expert_group(self, tier: Tier, tokens: int) -> Callable: ...


class ExpertWeights(Protocol):
    """Where the experts are: the device's expert pool (`offload.device.ExpertPool`) and, for one launch,
    the pool slots [G] int32 of its experts (each block in its slot once `launch_slots` returns)."""

    device_pool: ExpertPool

    def launch_slots(self, layer: int, experts: Sequence[int]) -> np.ndarray: ...


class ExpertDispatcher:
    """Runs the routed experts of any layer through the tier graphs (or on the host, by placement)."""

    def __init__(self, spec, tiers: TierSet, weights: ExpertWeights, graphs: ExpertGroupGraphs, device: DeviceMemory,
                 placement: Placement | None = None, host_store=None, prefetcher=None,
                 stats: OffloadCounters | None = None):
        self.spec = spec
        self.tiers = tiers
        self.weights = weights
        self.graphs = graphs
        self._groups: dict[tuple[int, int], Callable] = {}  # (tier index, T) -> expert-group graph
        self.placement = placement or Placement()
        if self.placement.uses_host and host_store is None:
            raise ValueError("a placement that computes experts on the host needs the host expert store")
        self.host_store = host_store
        self.prefetcher = prefetcher
        self.stats = stats or OffloadCounters.create(spec.num_layers, tiers)
        self.device = device
        self.crossings = device.ledger  # the engine's launches count theirs here too
        self._resident = getattr(weights, "is_resident", None)

    def run(self, layer: int, hidden: ms.Tensor, x: ms.Tensor, weights: np.ndarray, experts: np.ndarray) -> ms.Tensor:
        """`hidden` plus the weighted sum of the routed experts' outputs, [T, H] on the device.

        hidden, x [T, H] device tensors (the layer's output so far, its MoE input); weights and
        experts [N, K] the router's choice for the N real tokens, on the host (the padding rows of a
        launch route nowhere)."""
        n, k = experts.shape
        flat = experts.reshape(-1)  # [N*K] expert of each (token, choice)
        order = np.argsort(flat, kind="stable")  # (token, choice) rows grouped by expert
        loads = np.bincount(flat, minlength=self.spec.num_experts)  # [E]
        starts = np.concatenate(([0], np.cumsum(loads)[:-1]))  # [E] first row of each expert in `order`
        scale = weights.reshape(-1).astype(np.float32)  # [N*K]
        on_host = self._host_experts(layer, loads)
        device_loads = loads
        if on_host:
            device_loads = loads.copy()
            device_loads[on_host] = 0
        launches = plan_launches(device_loads, self.tiers)
        if not launches:
            self._hint(layer, x, n)
        for i, launch in enumerate(launches):
            hidden = self._launch(layer, launch, hidden, x, n, order, starts, scale, k, hint=i == len(launches) - 1)
        if on_host:
            hidden = self._add_host_experts(layer, on_host, hidden, x, n, order, starts, loads, scale, k)
        return hidden

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

    def _hint(self, layer: int, x: ms.Tensor, n: int) -> None:
        if self.prefetcher is None:
            return
        if self.prefetcher.error is not None:
            raise RuntimeError(f"the prefetch thread failed: {self.prefetcher.error!r}") from self.prefetcher.error
        self.prefetcher.hint(layer, self.device.download("prefetch input", x)[:n])

    def _group(self, tier_index: int, tokens: int) -> Callable:
        graph = self._groups.get((tier_index, tokens))
        if graph is None:
            graph = self._groups[tier_index, tokens] = self.graphs.expert_group(self.tiers[tier_index], tokens)
        return graph

    def _launch(self, layer, launch: Launch, hidden, x, n, order, starts, scale, k, hint: bool = False) -> ms.Tensor:
        tier = self.tiers[launch.tier_index]
        # fresh arrays per launch: a launch input shares its array's memory until the launch has run
        rows = np.zeros((tier.group, tier.capacity), np.int32)  # [G, C] token of each slot row
        row_scale = np.zeros((tier.group, tier.capacity), np.float32)  # [G, C] router weight; 0: padding
        counts = np.zeros(tier.group, np.int32)  # [G]
        for g, piece in enumerate(launch.pieces):
            first = starts[piece.expert] + piece.start
            piece_rows = order[first : first + piece.count]  # flat (token, choice) indices
            rows[g, : piece.count] = piece_rows // k
            row_scale[g, : piece.count] = scale[piece_rows]
            counts[g] = piece.count
        experts = [piece.expert for piece in launch.pieces]
        experts += [experts[0]] * (tier.group - len(experts))  # padding slots reuse a resident expert
        slots = self.weights.launch_slots(layer, experts)  # [G]
        if hint:  # the layer's last launch has its slots: prefetching can no longer evict them
            self._hint(layer, x, n)
        d, pool = self.device, self.weights.device_pool
        carried = int(counts.sum())
        hidden = self._group(launch.tier_index, hidden.shape[0])(
            hidden, x, d.upload("expert rows", rows), d.upload("expert rows", row_scale),
            d.upload("expert rows", counts), d.upload("expert slots", slots), *pool.tensors)  # [T, H]
        self.crossings.launched()
        per_layer = self.stats.layers[layer]
        per_layer.launches[launch.tier_index] += 1
        per_layer.tokens[launch.tier_index] += carried
        per_layer.padding[launch.tier_index] += tier.slot_tokens - carried
        return hidden

    def _add_host_experts(self, layer, on_host, hidden, x, n, order, starts, loads, scale, k) -> ms.Tensor:
        """Compute `on_host` experts in numpy from the host store and add them to `hidden`: the MoE
        input and the hidden state cross to the host and the sum crosses back."""
        d = self.device
        x_host = d.download("host expert input", x)[:n]  # [N, H]
        total = d.download("hidden out", hidden)  # [T, H]
        for expert in on_host:
            rows = order[starts[expert] : starts[expert] + loads[expert]]  # flat (token, choice) indices
            self.host_store.verify_once(layer, expert)
            y = host_expert(x_host[rows // k], self.host_store.arrays(layer, expert))  # [rows, H]
            total[rows // k] += y * scale[rows, None]  # an expert holds a token once
            self.stats.layers[layer].host_experts += 1
            self.stats.layers[layer].host_tokens += len(rows)
        return d.upload("hidden in", total)


class ResidentExperts:
    """Every expert resident, from FP32 arrays in memory (an HF checkpoint read whole: the reference engine):
    the arrays laid out as an FP32 expert store in host memory, placed on the device as a store is."""

    def __init__(self, spec, layers: Sequence[tuple[np.ndarray, np.ndarray]], device: DeviceMemory):
        # layers[i] = (gate_up [E, 2I, H], down [E, H, I])
        self.blocks = BlockArray(spec, layers)
        self.device_pool = device.store_pool(self.blocks, self.blocks.buffer)

    def launch_slots(self, layer: int, experts: Sequence[int]) -> np.ndarray:
        return np.array([layer * self.blocks.num_experts + int(e) for e in experts], np.int32)


class BlockArray:
    """Expert blocks in host memory, [L * E, stride] bytes in the FP32 block layout (`artifact.store`): a
    `BlockSource` like the store file, for experts that come from arrays rather than an artifact."""

    def __init__(self, spec, layers: Sequence[tuple[np.ndarray, np.ndarray]]):
        from artifact.store import block_bytes, block_layout, block_stride

        self.parts = block_layout(spec, "fp32")
        self.block_bytes = block_bytes(self.parts)
        self.num_layers, self.num_experts = len(layers), spec.num_experts
        self.buffer = np.zeros((self.num_layers * self.num_experts, block_stride(self.parts)), np.uint8)
        for layer, arrays in enumerate(layers):
            for part, array in zip(self.parts, arrays):  # gate_up, down
                for expert in range(self.num_experts):
                    row = self.buffer[layer * self.num_experts + expert]
                    row[part.offset: part.offset + part.nbytes].view(np.float32)[:] = array[expert].ravel()

    def read_into(self, layer: int, expert: int, out: np.ndarray) -> None:
        out[: self.block_bytes] = self.buffer[layer * self.num_experts + expert, : self.block_bytes]
