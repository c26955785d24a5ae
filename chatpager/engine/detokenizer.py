"""Incremental detokenization: a request's text grows by whole characters as tokens arrive.

Invariant: `text` is what the output tokens spell up to `read_offset`, never a broken
multi-byte character; the tokens after it are held back until they complete one (or, at the
end, `flush` keeps whatever they spell). Each update decodes only a short window, not the
whole output.
"""
from __future__ import annotations


class Detokenizer:
    __slots__ = ("text", "prefix_offset", "read_offset")

    def __init__(self) -> None:
        self.text = ""
        self.prefix_offset = 0
        self.read_offset = 0

    def copy(self) -> "Detokenizer":
        twin = Detokenizer()
        twin.text, twin.prefix_offset, twin.read_offset = self.text, self.prefix_offset, self.read_offset
        return twin

    def update(self, tokenizer, output_ids: list[int]) -> str:
        """Append what the newest tokens spell; returns the new characters."""
        prefix = tokenizer.decode(output_ids[self.prefix_offset:self.read_offset], skip_special_tokens=True)
        full = tokenizer.decode(output_ids[self.prefix_offset:], skip_special_tokens=True)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""  # an incomplete multi-byte character: wait for the next token
        delta = full[len(prefix):]
        self.text += delta
        self.prefix_offset = self.read_offset
        self.read_offset = len(output_ids)
        return delta

    def flush(self, tokenizer, output_ids: list[int]) -> None:
        """At the end: keep what the held-back tokens spell, replacement characters included."""
        prefix = tokenizer.decode(output_ids[self.prefix_offset:self.read_offset], skip_special_tokens=True)
        full = tokenizer.decode(output_ids[self.prefix_offset:], skip_special_tokens=True)
        self.text += full[len(prefix):]
        self.prefix_offset = self.read_offset = len(output_ids)
