"""Test set-up: tests import the checkpoint factory as `checkpoints`, and MindSpore runs in graph mode."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from runtime.backend import configure  # noqa: E402

configure()
