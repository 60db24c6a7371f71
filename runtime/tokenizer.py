"""The checkpoint's own tokenizer (`tokenizer.json`), via the `tokenizers` library."""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from model.spec import CheckpointError


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: no tokenizer.json; pass token ids instead (prompt_ids=[...])")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # the library raises a bare Exception with the parse error
        raise CheckpointError(f"{path}: not a valid tokenizers file ({err})") from None
