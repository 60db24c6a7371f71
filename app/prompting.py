"""Prompt in, text out: the prompt sources, the model's chat template, and streaming detokenisation."""
from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from omegaconf import ListConfig

from app.settings import ConfigError


@dataclass(frozen=True)
class PromptSource:
    """Exactly one of text and ids is set; `origin` says which config key gave it."""

    origin: str
    text: str | None = None
    ids: tuple[int, ...] | None = None


def prompt_source(prompt, prompt_file, prompt_ids, default: str | None) -> PromptSource:
    given = {key: value for key, value in
             (("prompt", prompt), ("prompt_file", prompt_file), ("prompt_ids", prompt_ids)) if value is not None}
    if len(given) > 1:
        raise ConfigError(f"give one of prompt, prompt_file, prompt_ids, not {' and '.join(given)}")
    if "prompt_ids" in given:
        ids = list(prompt_ids) if isinstance(prompt_ids, (list, tuple, ListConfig)) else None
        if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise ConfigError(f"prompt_ids must be a non-empty list of token ids, e.g. prompt_ids=[1,2,3]; got {prompt_ids!r}")
        return PromptSource("prompt_ids", ids=tuple(ids))
    if "prompt_file" in given:
        path = Path(str(prompt_file)).expanduser()
        if not path.is_file():
            raise ConfigError(f"prompt_file={prompt_file}: no such file")
        try:
            return PromptSource("prompt_file", text=path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as err:
            raise ConfigError(f"prompt_file={prompt_file}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    if "prompt" in given:
        return PromptSource("prompt", text=str(prompt))
    if default is None:
        raise ConfigError("no prompt: give prompt=..., prompt_file=... or prompt_ids=[...]")
    return PromptSource("model.default_prompt", text=str(default))


def _special(value) -> str | None:
    """tokenizer_config.json writes special tokens as strings or as {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


def apply_chat_template(model_dir: Path, text: str, extra: dict) -> str:
    """`text` as one user message rendered with the checkpoint's template, ready for the reply.

    Rendered the way transformers renders it (a sandboxed Jinja environment with trim_blocks and
    lstrip_blocks), so the model sees the prompt format it was trained on."""
    path = model_dir / "tokenizer_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    template = config.get("chat_template")
    if isinstance(template, list):  # several named templates: take the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if template is None and (model_dir / "chat_template.jinja").is_file():
        template = (model_dir / "chat_template.jinja").read_text()
    if not template:
        raise ConfigError(f"chat=true, but {model_dir} has no chat template (tokenizer_config.json "
                          "'chat_template' or chat_template.jinja); run without chat")
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    variables = {"bos_token": _special(config.get("bos_token")) or "", "eos_token": _special(config.get("eos_token")) or ""}
    try:
        return env.from_string(template).render(
            messages=[{"role": "user", "content": text}], add_generation_prompt=True, **variables, **extra)
    except TemplateError as err:
        raise ConfigError(f"{model_dir}: chat template failed: {err}") from None


def shown(text: str) -> str:
    """Text safe for a terminal: control characters (a random model emits raw bytes) become U+FFFD."""
    return "".join(c if c in "\n\t" or unicodedata.category(c) != "Cc" else "\ufffd" for c in text)


class TextStream:
    """Turns token ids into text pieces as they come, holding back an incomplete UTF-8 sequence.

    Byte-level BPE splits a multi-byte character over several tokens, so each piece is the
    difference between decoding all ids so far and what was already given out."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=False)
        if text.endswith("\ufffd"):
            return ""  # wait for the rest of the character
        piece = text[len(self.emitted):] if text.startswith(self.emitted) else text
        self.emitted = text
        return piece

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=False)
        piece = text[len(self.emitted):] if text.startswith(self.emitted) else ""
        self.emitted = text
        return piece
