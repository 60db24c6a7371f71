"""`StoreExperts`: the `ExpertWeights` of an artifact's expert store, every expert resident.

Legend: L layers, E experts per layer, G experts of a launch.
The device's expert pool is the whole store, block (l, e) in slot l * E + e (`DeviceMemory.store_pool`:
in `shared` the store file mapped in place, in `apart` every block copied to the device at start). A
launch names its experts' slots; each block's SHA-256 is checked the first time it is launched (a
corrupted block fails naming its layer and expert).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from artifact.reader import ExpertStoreReader
from offload.device import DeviceMemory


class StoreExperts:
    def __init__(self, store: ExpertStoreReader, device: DeviceMemory, verify: bool = True):
        self.store = store
        self.verify = verify
        self.device_pool = device.store_pool(store, store.mapped_blocks())

    def launch_slots(self, layer: int, experts: Sequence[int]) -> np.ndarray:
        """The pool slots [G] int32 of one launch's experts."""
        if self.verify:
            for expert in experts:
                self.store.verify_once(layer, int(expert))
        return np.array([layer * self.store.num_experts + int(e) for e in experts], np.int32)
