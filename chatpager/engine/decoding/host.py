"""What a decoder (beam search, speculation) may do to the engine that runs it.

`LLMEngine` hands each decoder an `EngineHost` (its `DecodingHost`), never itself: a decoder
reads and changes the engine's requests only through these methods. So decoding/ never imports
the engine (imports point one way: llm_engine -> decoding), and the engine's state (its live
requests, their blocks and queues) keeps one owner. A decoder may change the Sequences it is
given (their tokens, progress and group) as the step's sampler would; where they live, which
blocks they hold and when they end is the host's.
"""
from __future__ import annotations

from typing import Protocol

from chatpager.engine.core.request import Sequence
from chatpager.engine.outputs import RequestOutput
from chatpager.engine.sampling_params import SamplingParams


class EngineHost(Protocol):
    @property
    def eos_token_ids(self) -> set[int]: ...

    def decode(self, token_ids: list[int]) -> str:
        """The text of these tokens, special tokens skipped."""

    def is_live(self, request_id: str) -> bool:
        """Whether a live request has this id."""

    def make(self, prompt: str | list[int], params: SamplingParams, request_id: str | None,
             cache_salt: str | None) -> Sequence:
        """A validated new one-sequence request (RequestError if it can never be served); not
        yet live: `queue` makes it so."""

    def queue(self, seq: Sequence) -> None:
        """Make `seq` live and queue it to run."""

    def attach(self, parent: Sequence, child: Sequence) -> None:
        """Make `child` (a copy of live `parent` by `Sequence.continue_from`) live: running
        beside its parent on shared blocks if there is room, else queued to recompute."""

    def rename(self, seq: Sequence, request_id: str) -> None:
        """Give live `seq` another (free) request id."""

    def release(self, seq: Sequence, reason: str | None = None) -> None:
        """End `seq` without an output of its own: finished, its blocks freed, no longer live."""

    def rollback(self, seq: Sequence, num_tokens: int) -> None:
        """Free the blocks of `seq` that hold nothing of its first `num_tokens` tokens."""

    def append_token(self, seq: Sequence, token: int) -> str | None:
        """Append a token to `seq`; the finish reason if it ends the request (EOS, a stop
        string, the length limit)."""

    def output(self, seq: Sequence, new_token_ids: list[int]) -> RequestOutput:
        """The output of live `seq` after this step's new tokens."""

    def end(self, seq: Sequence, reason: str, new_token_ids: list[int]) -> RequestOutput:
        """Finish `seq` (exactly once) for `reason`, free its blocks, and give its last output."""
