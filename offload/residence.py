"""Where a run's routed experts live and compute: decided here, once.

The memory plan (`app.plan`) asks this module how many slots a placement buys in the room the
rest of the plan leaves; the engine builder (`runtime.build.engine_from_artifact`) builds exactly
what the answer says; `run.py` reports it. Two answers:

- **resident**: every expert of the artifact's store is used where it lies (the store file mapped
  in place; nothing streams). What a run gets when every expert fits and nothing asks for more.
- **streamed**: a pool of `slots` device slots filled from the host store on demand, evicted by
  `policy`, optionally prefetched, and optionally with some experts computed on the host instead
  of streamed (`host_compute`, the CPU/NPU split). A numeric budget, `prefetch`, host compute, or
  `auto` without room for every expert all stream.

Budgets are GiB (2^30 bytes), as the `*_gb` config fields are; `auto` is the largest pool that fits
and `all` insists on every expert resident (streamed into a pool of one slot per expert when
prefetch or host compute is asked for, since they act on a pool).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from offload.policies import DEFAULT_POLICY

AUTO, ALL = "auto", "all"


@dataclass(frozen=True)
class Residence:
    """The decision. `slots` is None for resident; `host_compute` is `offload.placement`'s config."""

    slots: int | None
    total_experts: int
    policy: str = DEFAULT_POLICY
    prefetch: bool = False
    host_compute: dict = field(default_factory=dict)

    @property
    def streams(self) -> bool:
        return self.slots is not None

    @property
    def device_experts(self) -> int:
        """Expert blocks held in device memory: the pool, or every expert."""
        return self.total_experts if self.slots is None else self.slots

    def describe(self) -> str:
        if not self.streams:
            return f"all {self.total_experts} experts resident"
        host = self.host_compute.get("mode") or self.host_compute.get("host_layers") or "never"
        return (f"{self.slots} of {self.total_experts} expert slots, policy {self.policy}, "
                f"prefetch {'on' if self.prefetch else 'off'}, host compute {host}")


def host_compute_config(value) -> dict:
    """The app's `placement.host_compute` (`never`, `auto` or a list of layers) as `offload.placement`'s config."""
    if value in (None, "never"):
        return {}
    if value == "auto":
        return {"mode": "auto"}
    if isinstance(value, (list, tuple)):
        return {"host_layers": list(value)}
    raise ValueError(f"host_compute must be never, auto or a list of layers, got {value!r}")


def decide(budget: float | str, block_bytes: int, room_bytes: int, total_experts: int, policy: str = DEFAULT_POLICY,
           prefetch: bool = False, host_compute="never") -> Residence:
    """The residence of a run whose expert blocks are `block_bytes` each, with `room_bytes` left for them.

    `host_compute` is the app's value (`never`, `auto`, layers). A pool is never larger than one
    slot per expert; whether it is large enough for the widest launch, and whether it fits, is the
    memory plan's verdict (it names the figure that breaks)."""
    host_compute = host_compute_config(host_compute)
    if budget == ALL:
        slots = total_experts
    elif budget == AUTO:
        slots = max(0, min(room_bytes // block_bytes, total_experts))
    else:
        slots = min(int(budget * (1 << 30)) // block_bytes, total_experts)
    if budget in (ALL, AUTO) and slots >= total_experts and not prefetch and not host_compute:
        return Residence(None, total_experts, policy, prefetch, host_compute)
    return Residence(slots, total_experts, policy, prefetch, host_compute)
