"""What a decode token moves between host and device memory, by the ledger's formula, for the demo,
the real-width bench checkpoint and Qwen3.6-35B-A3B, and how long a 310P3's PCIe link would take.

    python -m bench.crossings

`offload.crossings.decode_crossings` gives the bytes from the model's shape and the tiers alone;
`tests/test_crossings.py` holds the engine's ledger to it byte for byte. The time column is the
bytes over the host-to-device rate of `conf/device/ascend_310p3.yaml` (both directions alike), so
it leaves out the per-transfer latency and the sync each read back costs.
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from app.demo import DEMO_DIR
from bench.realwidth import real_width_spec
from model.spec import load_spec, spec_from_config
from offload.crossings import decode_crossings, decode_launch_count
from offload.tiers import from_config

CONF = Path(__file__).resolve().parents[1] / "conf"


def main() -> None:
    qwen = OmegaConf.to_container(OmegaConf.load(CONF / "model" / "qwen36_35b.yaml"), resolve=True)
    tiers = OmegaConf.to_container(OmegaConf.load(CONF / "tiers" / "default.yaml"), resolve=True)["tiers"]
    h2d = OmegaConf.load(CONF / "device" / "ascend_310p3.yaml").h2d_gbps * 1e9
    models = [("demo", load_spec(DEMO_DIR)), ("real width, 4 layers", real_width_spec(4)),
              ("Qwen3.6-35B-A3B", spec_from_config(qwen["config"], CONF / "model" / "qwen36_35b.yaml"))]
    print(f"per greedy decode token (sampling reads the logits instead of the id: V x 4 bytes), expert blocks "
          f"excluded; time at {h2d / 1e9:.0f} GB/s (conf/device/ascend_310p3.yaml)")
    for name, spec in models:
        tier_set = from_config(tiers, default_group=spec.num_experts_per_tok)
        kinds = decode_crossings(spec, tier_set, greedy=True)
        total = sum(b for _, _, b in kinds.values())
        launches = decode_launch_count(spec, tier_set)
        print(f"\n{name}: {spec.num_layers} layers, hidden {spec.hidden_size}, vocab {spec.vocab_size}: "
              f"{total / 1024:.1f} KiB in {sum(n for _, n, _ in kinds.values())} transfers, "
              f"{total / h2d * 1e6:.0f} us; {launches} graph launches")
        for kind, (direction, transfers, nbytes) in kinds.items():
            print(f"  {kind:16} {direction:13} {transfers:5} {nbytes / 1024:10.1f} KiB")


if __name__ == "__main__":
    main()
