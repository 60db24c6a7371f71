"""What the offload controller did, per layer and in total, printable as a table and as JSON.

Counted by three parties sharing one `OffloadCounters`: the slot provider (`offload.offloaded`:
hits, misses, bytes, stall), the prefetcher's copies (issued, hits, waste) and the dispatcher
(launches, carried tokens and padding per tier, host-computed experts); the engine adds the wall
time of its launches so that stall can be read as a fraction of step time.

Definitions:
    hit / miss        a launch needed an expert that was / was not in a slot (prefetched ones count as hits)
    bytes_streamed    bytes copied into slots, by misses and by prefetches (wasted ones included)
    prefetch_hits     prefetched experts that a launch then used; prefetch_wasted: evicted unused
    stall_s           time launches waited for copies: demand copies plus waits on in-flight prefetches
    host_experts      experts computed on the host instead (`offload.placement`), host_tokens their rows
    padding           slot-token rows launched without a token (G * C minus carried tokens)
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path


@dataclass
class LayerCounters:
    hits: int = 0
    misses: int = 0
    bytes_streamed: int = 0
    prefetch_issued: int = 0
    prefetch_hits: int = 0
    prefetch_wasted: int = 0
    stall_s: float = 0.0
    host_experts: int = 0
    host_tokens: int = 0
    launches: list[int] = field(default_factory=list)  # per tier
    tokens: list[int] = field(default_factory=list)  # per tier: carried tokens
    padding: list[int] = field(default_factory=list)  # per tier: padded slot-token rows

    def add(self, other: "LayerCounters") -> None:
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if isinstance(mine, list):
                setattr(self, f.name, [a + b for a, b in zip(mine, theirs)])
            else:
                setattr(self, f.name, mine + theirs)


@dataclass
class OffloadCounters:
    """Per-layer counters plus the run's launches (engine steps), their tokens and wall time."""

    layers: list[LayerCounters]
    tiers: list[str]  # e.g. "1x8": capacity x group, for the table header
    steps: int = 0
    step_tokens: int = 0
    step_s: float = 0.0

    @classmethod
    def create(cls, num_layers: int, tiers) -> "OffloadCounters":
        names = [f"{t.capacity}x{t.group}" for t in tiers]
        n = len(names)
        return cls([LayerCounters(launches=[0] * n, tokens=[0] * n, padding=[0] * n) for _ in range(num_layers)],
                   names)

    def reset(self) -> None:
        """Zero everything in place (the parties counting keep their reference), e.g. after a warm-up."""
        fresh = OffloadCounters.create(len(self.layers), ())
        for mine, new in zip(self.layers, fresh.layers):
            for f in fields(LayerCounters):
                value = getattr(new, f.name)
                setattr(mine, f.name, [0] * len(self.tiers) if isinstance(value, list) else value)
        self.steps, self.step_tokens, self.step_s = 0, 0, 0.0

    def total(self) -> LayerCounters:
        n = len(self.tiers)
        total = LayerCounters(launches=[0] * n, tokens=[0] * n, padding=[0] * n)
        for layer in self.layers:
            total.add(layer)
        return total

    def step_done(self, tokens: int, seconds: float) -> None:
        self.steps += 1
        self.step_tokens += tokens
        self.step_s += seconds

    @property
    def stall_fraction(self) -> float:
        return self.total().stall_s / self.step_s if self.step_s else 0.0

    def to_dict(self) -> dict:
        total = self.total()
        requests = total.hits + total.misses
        return {
            "tiers": self.tiers,
            "steps": self.steps,
            "step_tokens": self.step_tokens,
            "step_s": self.step_s,
            "stall_fraction": self.stall_fraction,
            "hit_rate": total.hits / requests if requests else 0.0,
            "bytes_per_token": total.bytes_streamed / self.step_tokens if self.step_tokens else 0.0,
            "total": asdict(total),
            "layers": [asdict(layer) for layer in self.layers],
        }

    def write_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    def table(self) -> str:
        """One row per layer and a total row; per-tier columns read `launches/padding`."""
        head = ["layer", "hits", "misses", "hit%", "MB", "pf", "pf_hit", "pf_waste", "stall_ms", "host"]
        head += [f"tier {name}" for name in self.tiers]
        rows = [[str(i), *self._cells(c)] for i, c in enumerate(self.layers)] + [["total", *self._cells(self.total())]]
        widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
        line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
        out = [line(head)] + [line(r) for r in rows]
        out.append(
            f"{self.steps} launches, {self.step_tokens} tokens, {self.step_s:.3f} s; "
            f"stalled {100 * self.stall_fraction:.1f}% of it; tier cells are launches/padded rows"
        )
        return "\n".join(out)

    @staticmethod
    def _cells(c: LayerCounters) -> list[str]:
        requests = c.hits + c.misses
        rate = f"{100 * c.hits / requests:.0f}" if requests else "-"
        tiers = [f"{n}/{p}" for n, p in zip(c.launches, c.padding)]
        return [str(c.hits), str(c.misses), rate, f"{c.bytes_streamed / 1e6:.2f}", str(c.prefetch_issued),
                str(c.prefetch_hits), str(c.prefetch_wasted), f"{1e3 * c.stall_s:.1f}", str(c.host_experts), *tiers]
