"""Ferry's command line (Hydra). With no model chosen it runs the built-in demo.

    python run.py                                          # demo: built once, generates, streams, counters
    python run.py prompt="..." max_new_tokens=64           # also prompt_file=PATH, prompt_ids=[1,2,3], chat=true
    python run.py mode=plan +model=qwen36_35b device=ascend_310p3   # memory plan, no weights needed
    python run.py mode=predict +model=qwen36_35b device=ascend_310p3  # predicted decode speed (app.predict)
    python run.py +sweep=optuna_310p3 --multirun           # Optuna: the config predicted fastest on a 310P3
    python run.py +model=qwen36_35b model.path=DIR         # the real model
    python run.py +model=local model.path=DIR              # any HF checkpoint of this architecture
    python run.py --multirun tiers=default,coarse placement.expert_budget_gb=0.02,0.05
    python -m app.sweep_summary multirun/DATE/TIME     # that sweep as a table and a plot

A run goes: config -> validated settings -> memory plan of both memories (refused when it does not
fit) -> model directory (the demo is built on first use) -> prompt checks -> artifact (an HF
directory is converted on first use into artifact_cache, keyed by its content and the convert
options; an artifact directory is used as it is) -> engine over the artifact, experts where the
plan's residence puts them (`offload.residence`) -> warm-up (compiles or loads every graph shape)
-> generation, streamed -> timings, counters and planned against measured peak RSS on stdout, the
whole record as metrics.json in the Hydra output directory (and in output_json=FILE when asked).
A config mistake ends the run with one `error:` line and status 2; a model that is missing or does
not fit, status 1.
"""
from __future__ import annotations

import os

os.environ.setdefault("GLOG_v", "3")  # before anything imports MindSpore: its C++ INFO logs drown the output

import sys

from app import interrupts

if __name__ == "__main__":
    interrupts.take()  # before the imports below start threads (see app/interrupts.py)

import hydra
from omegaconf import DictConfig

from app import main as app_main


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    return app_main.main(cfg)  # mode=predict: the predicted tokens/s, for a sweeper to optimize


if __name__ == "__main__":
    app_main.check_group_overrides(sys.argv[1:])
    main()
