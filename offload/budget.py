"""How many expert slots a byte budget buys, refused at start when it cannot work.

A launch of tier (C, G) reads up to G distinct experts at once, all of which must sit in slots, so
the pool needs at least max(G) slots; and it cannot be larger than the device's memory. A budget
above what every expert needs is not an error: the pool is capped at one slot per expert (all
resident after first use). Sizes are binary, as the `*_gb` config fields are (1 GiB = 2^30 bytes).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from offload.tiers import TierSet


class BudgetError(ValueError):
    """The expert budget cannot work; the message says what fits."""


def _size(nbytes: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{int(nbytes)} B"


def host_memory_bytes() -> int:
    """Physical RAM: the 'device' memory of MindSpore's CPU backend."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass(frozen=True)
class SlotPlan:
    num_slots: int
    block_bytes: int
    total_experts: int  # L x E: slots that would hold every expert

    @property
    def pool_bytes(self) -> int:
        return self.num_slots * self.block_bytes

    @property
    def everything_resident(self) -> bool:
        return self.num_slots == self.total_experts


def min_slots(tiers: TierSet) -> int:
    """Distinct experts the widest launch may read at once."""
    return max(t.group for t in tiers)


def plan_slots(budget_bytes: int, block_bytes: int, tiers: TierSet, total_experts: int,
               device_bytes: int | None = None) -> SlotPlan:
    """Slots for an expert budget, or a `BudgetError` naming the range of budgets that fit."""
    device_bytes = host_memory_bytes() if device_bytes is None else device_bytes
    need = min(min_slots(tiers), total_experts)
    widest = max(tiers, key=lambda t: t.group)
    low, high = need * block_bytes, min(device_bytes, total_experts * block_bytes)
    fits = (f"budgets from {_size(low)} ({need} slots of {_size(block_bytes)}) to {_size(device_bytes)} fit"
            if low <= device_bytes else
            f"nothing fits: {need} slots of {_size(block_bytes)} exceed the device's {_size(device_bytes)}")
    if not budget_bytes > 0:
        raise BudgetError(f"expert budget must be positive, got {budget_bytes} bytes; {fits}")
    if budget_bytes > device_bytes:
        raise BudgetError(f"expert budget {_size(budget_bytes)} exceeds the device's memory "
                          f"{_size(device_bytes)}; {fits}")
    slots = min(int(budget_bytes // block_bytes), total_experts)
    if slots < need:
        raise BudgetError(
            f"expert budget {_size(budget_bytes)} holds {slots} slots of {_size(block_bytes)}, but the widest tier "
            f"launch (capacity {widest.capacity}, group {widest.group}) needs {need} slots = {_size(low)}; {fits}"
            + (f" (all {total_experts} experts resident from {_size(high)})" if high >= low else "")
        )
    return SlotPlan(slots, block_bytes, total_experts)


def gib(value: float) -> int:
    """Bytes of a budget given in GiB, as config (`placement.expert_budget_gb`) writes it."""
    return int(round(value * 2**30))
