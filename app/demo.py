"""The demo model: a small Qwen3.5-MoE trained from scratch by `tools/train_demo.py` on Python's
documentation and standard library, shipped with the repository in `models/ferry-demo`.

`python run.py` with no model chosen runs it. It is an HF checkpoint like any other (config.json,
BF16 safetensors, tokenizer.json, a ChatML template, generation_config.json), read by the same code
as Qwen3.6-35B-A3B: run.py converts it on first use into the artifact cache and runs the artifact.
Its training data, recipe and figures are in the directory's DATA.md and TRAINING.md; its
`heldout.txt` is text it never saw, which the routing benches and the calibration notebook run on.
"""
from __future__ import annotations

from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parents[1] / "models" / "ferry-demo"
HELDOUT = DEMO_DIR / "heldout.txt"
