"""The model's tokenizer and chat template, read from its files without transformers.

transformers' `AutoTokenizer` costs seconds to import; the `tokenizers` library it wraps, and
jinja2 for the chat template, cost a tenth of that. What this module keeps equal to
`AutoTokenizer` (tests/engine/model/test_tokenizer.py checks the default model and the tiny ones):
- tokenizer.json is the whole pipeline (normalizer, pre-tokenizer, model, post-processor that
  adds BOS/EOS, decoder). transformers does the same when the file exists; it even drops
  tokenizer_config.json's `add_bos_token` / `add_eos_token` then.
- The named special tokens (bos, eos, unk, pad, ...) come from tokenizer_config.json, else from
  special_tokens_map.json; ones the vocabulary lacks are added, as transformers adds them.
- `decode` is the backend's decode. transformers' `clean_up_tokenization_spaces` is skipped for
  BPE models, which Llama-family tokenizers are, so it is not applied here either.
- The chat template (chat_template.jinja, else tokenizer_config.json's `chat_template`) renders
  in transformers' environment: sandboxed Jinja with trim_blocks / lstrip_blocks and loop
  controls, `raise_exception`, `strftime_now`, a `tojson` that does not escape HTML, the named
  special tokens as variables; its text is encoded without adding special tokens.
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from chatpager.errors import ModelLoadError

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class Tokenizer:
    """Text <-> token ids for one model, and its chat template."""

    def __init__(self, backend, special_tokens: dict[str, str], chat_template: str | None) -> None:
        from tokenizers import AddedToken

        self.backend = backend  # a tokenizers.Tokenizer
        self.special_tokens = special_tokens  # {"eos_token": "<|im_end|>", ...}
        self.chat_template = chat_template
        missing = [t for t in special_tokens.values() if backend.token_to_id(t) is None]
        if missing:
            backend.add_special_tokens([AddedToken(t, special=True) for t in missing])

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "Tokenizer":
        """The tokenizer of a Hugging Face model directory (tokenizer.json required)."""
        from tokenizers import Tokenizer as Backend

        model_dir = Path(model_dir)
        try:
            backend = Backend.from_file(str(model_dir / "tokenizer.json"))
            config = _read_json(model_dir / "tokenizer_config.json")
            legacy = {} if "added_tokens_decoder" in config else _read_json(model_dir / "special_tokens_map.json")
        except Exception as exc:  # tokenizers raises its own Exception type for a bad file
            raise ModelLoadError(f"cannot load tokenizer from {model_dir}: {exc}") from None
        special = {}
        for name in SPECIAL_TOKEN_NAMES:
            value = legacy.get(name, config.get(name))
            if isinstance(value, dict):  # a serialized AddedToken
                value = value.get("content")
            if isinstance(value, str):
                special[name] = value
        template_file = model_dir / "chat_template.jinja"
        template = template_file.read_text(encoding="utf-8") if template_file.is_file() else config.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return cls(backend, special, template)

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_id(self, name: str) -> int | None:
        """The id of a named special token ("eos_token", ...), None when the model has none."""
        token = self.special_tokens.get(name)
        return None if token is None else self.backend.token_to_id(token)

    @property
    def eos_token_id(self) -> int | None:
        return self.token_id("eos_token")

    @property
    def bos_token_id(self) -> int | None:
        return self.token_id("bos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self.token_id("pad_token")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False,
                            tokenize: bool = True) -> list[int] | str:
        """The conversation in the model's chat template: token ids, or the text (`tokenize=False`).
        A template's `raise_exception` raises jinja2's TemplateError."""
        if not self.chat_template:
            raise ModelLoadError("this model's tokenizer has no chat template")
        # transformers drops keys whose value is None: templates test for a missing key
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        text = _compiled(self.chat_template).render(
            messages=messages, tools=None, documents=None, add_generation_prompt=add_generation_prompt,
            **self.special_tokens)
        return self.encode(text, add_special_tokens=False) if tokenize else text


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


@lru_cache(maxsize=8)
def _compiled(template: str):
    from jinja2.exceptions import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)
