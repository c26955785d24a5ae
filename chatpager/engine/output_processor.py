"""Output processing: from a sampled token to what the caller sees.

Appends the token, detokenizes incrementally, decides whether the request ends (EOS, a stop
string, the length limit) and builds the RequestOutput (cumulative text and token ids, plus
the tokens new this step). Stop strings are searched only in a window covering the newest
text, and a match cuts the text at the earliest stop string. Touches no blocks and no queues.
"""
from __future__ import annotations

from chatpager.engine.core.request import Sequence
from chatpager.engine.outputs import RequestOutput


class OutputProcessor:
    def __init__(self, tokenizer, eos_token_ids: set[int]) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids

    def append_token(self, seq: Sequence, token: int) -> str | None:
        """Add one generated token; returns the finish reason if the request ends with it."""
        seq.token_ids.append(token)
        delta = seq.detok.update(self.tokenizer, seq.output_token_ids)
        return self._finish_reason(seq, token, delta)

    def _finish_reason(self, seq: Sequence, token: int, delta: str) -> str | None:
        p = seq.params
        if not p.ignore_eos and token in self.eos_token_ids:
            seq.detok.flush(self.tokenizer, seq.output_token_ids)
            return "stop"
        if p.stop and delta:
            text = seq.detok.text
            window = len(delta) + max(len(s) for s in p.stop)
            start = max(0, len(text) - window)
            hits = [i for s in p.stop if (i := text.find(s, start)) >= 0]
            if hits:
                seq.detok.text = text[:min(hits)]
                return "stop"
        if len(seq.output_token_ids) >= seq.max_output_tokens or seq.num_tokens >= seq.max_len:
            seq.detok.flush(self.tokenizer, seq.output_token_ids)
            return "length"
        return None

    @staticmethod
    def output(seq: Sequence, new: list[int]) -> RequestOutput:
        return RequestOutput(
            request_id=seq.request_id,
            prompt_token_ids=tuple(seq.token_ids[:seq.num_prompt_tokens]),
            token_ids=tuple(seq.output_token_ids),
            new_token_ids=tuple(new),
            text=seq.detok.text,
            finished=seq.is_finished,
            finish_reason=seq.finish_reason,
            error=seq.error,
            parent_id=seq.parent_id,
            num_cached_tokens=seq.num_cached_tokens,
        )
