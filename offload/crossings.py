"""The ledger of crossings: every transfer between host and device memory, by kind, bytes and phase.

Every such transfer is made by `offload.device.DeviceMemory`, which counts it here at the copy: launch
inputs that are host arrays (`upload`), outputs read back (`download`), and expert blocks copied into
slots (`copied`). On MindSpore's CPU backend in the `shared` memory model those cost nothing; in
`apart`, and on a 310P3, each is a copy (over PCIe on the card), and a read-back a sync; both models
count the same. Inputs that are device tensors already (weights, the expert pool, state kept as
tensors) are not counted: they do not cross.

Counts are kept per phase: `prefill` for launches of more than one token, `decode` for one-token
launches (the engine says which launch is running); a prefetch copy counts in the phase of the
launch it overlaps. `tokens` per phase gives the per-token figures, and `launches` counts the graph
launches of each phase (on a card each is a host cost and, where an output is read, a sync).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

PHASES = ("prefill", "decode")
H2D, D2H = "host->device", "device->host"


@dataclass
class Tally:
    direction: str
    transfers: int = 0
    bytes: int = 0


class Crossings:
    """Per phase and kind: direction, transfers and bytes; per phase: tokens."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # the prefetch thread copies blocks too
        self.phase = "prefill"
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.kinds: dict[str, dict[str, Tally]] = {phase: {} for phase in PHASES}
            self.tokens = dict.fromkeys(PHASES, 0)
            self.launches = dict.fromkeys(PHASES, 0)

    def sequence_starts(self) -> None:
        """A new sequence: its state's reset counts with the prefill of its prompt."""
        self.phase = "prefill"

    def launch(self, tokens: int, decode: bool) -> None:
        """A launch of `tokens` real tokens starts (a decode launch, or a prefill one): its crossings
        count in its phase."""
        self.phase = "decode" if decode else "prefill"
        self.tokens[self.phase] += tokens

    def launched(self) -> None:
        """One graph launch of the current phase."""
        self.launches[self.phase] += 1

    def copied(self, kind: str, nbytes: int) -> None:
        """A host->device copy made outside a launch (an expert block into its slot)."""
        self.count(kind, H2D, nbytes)

    def count(self, kind: str, direction: str, nbytes: int) -> None:
        """One transfer of `nbytes` in `direction` (H2D or D2H), in the current phase."""
        with self._lock:
            tally = self.kinds[self.phase].setdefault(kind, Tally(direction))
            if tally.direction != direction:
                raise ValueError(f"crossing kind '{kind}' is {tally.direction}, counted now as {direction}")
            tally.transfers += 1
            tally.bytes += int(nbytes)

    def per_token(self, phase: str, kinds: tuple[str, ...] | None = None) -> float:
        """Bytes per token of `phase`, over `kinds` (default all)."""
        tallies = self.kinds[phase]
        total = sum(t.bytes for kind, t in tallies.items() if kinds is None or kind in kinds)
        return total / self.tokens[phase] if self.tokens[phase] else 0.0

    def to_dict(self) -> dict:
        return {phase: {"tokens": self.tokens[phase], "launches": self.launches[phase],
                        "kinds": {kind: {"direction": t.direction, "transfers": t.transfers, "bytes": t.bytes}
                                  for kind, t in sorted(self.kinds[phase].items())}}
                for phase in PHASES}

    def table(self) -> str:
        """Per phase, each kind's transfers and bytes per token, and the total."""
        lines = ["crossings host<->device, as a card would pay them (per token of each phase)",
                 f"  {'phase':8} {'kind':18} {'direction':13} {'transfers/token':>15} {'bytes/token':>12}"]
        for phase in PHASES:
            tokens = self.tokens[phase]
            if not tokens:
                continue
            for kind, t in sorted(self.kinds[phase].items()):
                lines.append(f"  {phase:8} {kind:18} {t.direction:13} {t.transfers / tokens:>15.1f} "
                             f"{_size(t.bytes / tokens):>12}")
            lines.append(f"  {phase:8} {'total':18} {'':13} "
                         f"{sum(t.transfers for t in self.kinds[phase].values()) / tokens:>15.1f} "
                         f"{_size(self.per_token(phase)):>12}  over {tokens} tokens, "
                         f"{self.launches[phase] / tokens:.1f} graph launches per token")
        return "\n".join(lines)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024 or unit == "MiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def decode_crossings(spec, tiers, greedy: bool = False) -> dict[str, tuple[str, int, int]]:
    """kind -> (direction, transfers, bytes) that one decode token (T = 1) moves between host and
    device in today's engine, from the model's shape and the tiers alone (experts on the device, none
    computed on the host, no prefetch; streamed blocks not included). V vocabulary, P rotary dims, K
    experts per token, L layers; a decode token's K experts, one row each, go in the launches
    `offload.tiers.decode_plan` makes of them, each taking its [G, C] rows and router weights, its [G]
    counts and the [G] pool slots of its experts from the host. Nothing depends on the hidden width or
    the context length: the hidden state, KV caches and DeltaNet states stay on the device. `greedy`: the head's choice is
    read back (4 bytes), not the logits (`Engine.next_greedy`, what greedy generation uses)."""
    from offload.tiers import decode_plan

    v, p, k, layers = spec.vocab_size, spec.rotary_dim, spec.num_experts_per_tok, spec.num_layers
    launches = decode_plan(k, tiers)
    shapes = [(tiers[launch.tier_index].group, tiers[launch.tier_index].capacity) for launch in launches]
    rows = layers * sum(2 * g * c * 4 + g * 4 for g, c in shapes)  # token and weight of each row; counts
    slots = layers * sum(g * 4 for g, _ in shapes)  # the pool slot of each of a launch's experts
    return {
        "token ids": (H2D, 1, 4),
        "rope tables": (H2D, 2, 2 * p * 4),
        "scalars": (H2D, 2, 8),  # tokens in the launch, cached length
        "router choice": (D2H, 2 * layers, layers * k * (4 + 4)),  # top-k weights (f32) and ids (i32)
        "expert rows": (H2D, 3 * layers * len(shapes), rows),
        "expert slots": (H2D, layers * len(shapes), slots),
        "last row": (H2D, 1, 4),  # the head's row of the launch
        **({"next token": (D2H, 1, 4)} if greedy else {"logits": (D2H, 1, v * 4)}),
    }


def decode_launch_count(spec, tiers) -> int:
    """Graph launches of one decode token: the embedding, each layer, its expert groups, the head."""
    from offload.tiers import decode_plan

    return 2 + spec.num_layers * (1 + len(decode_plan(spec.num_experts_per_tok, tiers)))
