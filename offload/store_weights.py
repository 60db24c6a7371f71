"""`StoreExperts`: the `ExpertWeights` of an artifact's expert store, every expert resident.

Legend: G slots of a launch.
The store file is memory-mapped; each block's arrays are wrapped as MindSpore tensors without a
copy (`Tensor.from_numpy` over the mapped pages) the first time the block is launched, after its
SHA-256 is checked (a corrupted block fails naming its layer and expert). A launch gets the tensors
in the order the tier's expert-group graph takes them: each block part for the G slots in turn
(FP32/FP16: G gate_up, G down; INT8: G gate_up, G down, G gate_up_scale, G down_scale).
"""
from __future__ import annotations

from typing import Sequence

import mindspore as ms

from artifact.reader import ExpertStoreReader


class StoreExperts:
    def __init__(self, store: ExpertStoreReader, verify: bool = True):
        self.store = store
        self.verify = verify
        self.parts = len(store.parts)
        self._tensors: dict[tuple[int, int], tuple] = {}

    def expert(self, layer: int, expert: int) -> tuple:
        """The block's tensors, in part order."""
        key = (layer, expert)
        tensors = self._tensors.get(key)
        if tensors is None:
            if self.verify:
                self.store.verify_once(layer, expert)
            arrays = self.store.arrays(layer, expert)
            tensors = tuple(ms.Tensor.from_numpy(arrays[part.name]) for part in self.store.parts)
            self._tensors[key] = tensors
        return tensors

    def launch_weights(self, layer: int, experts: Sequence[int]) -> tuple:
        slots = [self.expert(layer, e) for e in experts]
        return tuple(slot[part] for part in range(self.parts) for slot in slots)
