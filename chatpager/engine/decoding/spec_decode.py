"""Speculative decoding without a draft model: n-gram (prompt-lookup) proposals, verified in
one forward against the paged cache.

Each step, before scheduling, a decoding sequence whose last n tokens (n from
`prompt_lookup_max` down to `prompt_lookup_min`) occurred earlier in its context proposes the
up to `num_speculative_tokens` tokens that followed that occurrence. They are appended to its
tokens as *proposed* (`Sequence.num_spec_tokens`), so the scheduler gives it 1 + k tokens to
compute, like a prefill chunk, and the runner returns logits at each of them. Verification
then samples each position with the request's own sampler and accepts proposals while the
sample equals the proposal; the first sample that differs (or the one after the last
proposal) is the step's extra token. With a draft that proposes one token with certainty this
*is* the standard accept/resample rule (accept t with probability p(t), else draw from p
without t, renormalized): either way each position's token is distributed as p. Greedy
requests therefore accept the longest prefix equal to the model's argmax, plus one token.

Invariants:
- Proposed tokens exist only inside a step: `fit` drops those the scheduler did not schedule,
  `verify` (or `withdraw`, when the forward fails) drops the rejected ones, so between steps
  `token_ids` holds only real tokens.
- No block holding a proposed token is registered in the prefix cache until the token is
  accepted (BlockManager.allocate_slots stops at `num_tokens - num_spec_tokens`); after
  verification `rollback` frees the blocks that held only rejected tokens. Slots of rejected
  tokens inside a kept block lie beyond `num_computed_tokens` and are overwritten later.
- A sequence whose proposals keep failing (acceptance below `min_acceptance` over at least
  `probe_tokens` proposed tokens) stops proposing: speculation costs it nothing more.
- Nothing is proposed in a step with more than `disable_by_batch_size` decoding sequences.
  Why: a decode step is cheap per extra token only while it is memory-bound. On the dev CPU
  one row cost ~40 ms and 16 rows ~90 ms (docs/ARCHITECTURE.md, "Measured facts"), so 16
  sequences proposing 4 tokens each would make 80 rows (~3x the step) to gain well under 2x
  the tokens.
What it may do to the engine: only what its `EngineHost` offers (decoding/host.py): roll back
a sequence's rejected slots, append the accepted tokens and report or end the request.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from chatpager.engine.core.request import Sequence, Status
from chatpager.engine.decoding.host import EngineHost
from chatpager.engine.decoding.sampler import generator_for, sample_batch
from chatpager.engine.outputs import RequestOutput

if TYPE_CHECKING:
    from chatpager.engine.core.scheduler import ScheduledBatch

SEARCH_WINDOW = 8192  # proposals look this many tokens back at most (bounds the per-step cost)


@dataclass(frozen=True, slots=True)
class SpeculativeConfig:
    method: str = "ngram"
    num_speculative_tokens: int = 4
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 2
    min_acceptance: float = 0.2  # below this, a sequence stops proposing ...
    probe_tokens: int = 24  # ... once it has proposed this many tokens
    disable_by_batch_size: int = 4  # no proposals in a step with more decoding sequences

    def __post_init__(self) -> None:
        if self.method != "ngram":
            raise ValueError(f"speculative must be 'ngram' (or None for off), got {self.method!r}")
        if self.num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, got {self.num_speculative_tokens}")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError(f"need 1 <= prompt_lookup_min <= prompt_lookup_max, got "
                             f"{self.prompt_lookup_min} and {self.prompt_lookup_max}")


def propose_ngram(tokens: list[int], k: int, n_max: int, n_min: int) -> list[int]:
    """Up to `k` tokens that followed the most recent earlier occurrence of the longest suffix
    of `tokens` (n_max down to n_min tokens long); [] if there is none."""
    size = len(tokens)
    if size < n_min + 1 or k < 1:
        return []
    last, lo = tokens[-1], max(0, size - SEARCH_WINDOW)
    best_len, best_end = 0, -1
    for j in range(size - 2, lo - 1, -1):  # j: where an earlier copy of the last token sits
        if tokens[j] != last:
            continue
        n = 1
        while n < n_max and j - n >= 0 and tokens[j - n] == tokens[size - 1 - n]:
            n += 1
        if n > best_len:
            best_len, best_end = n, j
            if n == n_max:
                break
    if best_len < n_min:
        return []
    return tokens[best_end + 1:best_end + 1 + k]


@dataclass(slots=True)
class _Record:
    proposed: int = 0
    accepted: int = 0


class SpecDecoder:
    """The engine's n-gram speculation: `propose` before scheduling, `fit` after, `verify`
    after the forward. Counters: proposed / accepted tokens, verification steps."""

    def __init__(self, host: EngineHost, config: SpeculativeConfig | None,
                 excluded: Callable[[Sequence], bool] = lambda seq: False) -> None:
        """`excluded(seq)`: a sequence whose rows another decoder consumes (a beam slot)."""
        self.host = host
        self.config = config
        self._excluded = excluded
        self.proposed_tokens = 0
        self.accepted_tokens = 0
        self.verify_steps = 0  # (sequence, step) pairs that verified proposals
        self._records: weakref.WeakKeyDictionary[Sequence, _Record] = weakref.WeakKeyDictionary()
        self._pending: list[Sequence] = []  # sequences holding proposed tokens this step

    # --- before scheduling ---------------------------------------------------------------
    def propose(self, running: list[Sequence]) -> None:
        cfg = self.config
        if cfg is None:
            return
        decoding = [s for s in running if s.status is Status.RUNNING and s.num_tokens - s.num_computed_tokens == 1]
        if len(decoding) > cfg.disable_by_batch_size:
            return
        for seq in decoding:
            if not self._eligible(seq):
                continue
            room = min(seq.max_output_tokens - len(seq.output_token_ids), seq.max_len - seq.num_tokens) - 1
            draft = propose_ngram(seq.token_ids, min(cfg.num_speculative_tokens, room),
                                  cfg.prompt_lookup_max, cfg.prompt_lookup_min)
            if draft:
                seq.token_ids.extend(draft)
                seq.num_spec_tokens = len(draft)
                self._pending.append(seq)

    def _eligible(self, seq: Sequence) -> bool:
        """A decode (a prefill in progress has tokens of its own to compute) that is not a
        group leader about to fork samples nor a beam, and whose proposals pay off."""
        group = seq.group
        if group is not None and (group.pending or self._excluded(seq)):
            return False  # its row forks the group's samples / belongs to a beam search
        rec = self._records.get(seq)
        cfg = self.config
        return rec is None or rec.proposed < cfg.probe_tokens or rec.accepted >= cfg.min_acceptance * rec.proposed

    # --- after scheduling ----------------------------------------------------------------
    def fit(self, batch: ScheduledBatch) -> None:
        """Keep only the proposals the scheduler gave slots to (a tight token budget may cut
        them short; a preempted sequence keeps none)."""
        if not self._pending:
            return
        scheduled = {id(s): n for s, n in zip(batch.seqs, batch.num_tokens)}
        kept = []
        for seq in self._pending:
            n = scheduled.get(id(seq), 0) if seq.status is Status.RUNNING else 0
            keep = max(0, min(seq.num_spec_tokens, n - 1))
            self._drop(seq, seq.num_spec_tokens - keep)
            if keep:
                kept.append(seq)
        self._pending = kept

    def withdraw(self) -> None:
        """The forward failed: no proposal was verified."""
        for seq in self._pending:
            self._drop(seq, seq.num_spec_tokens)
        self._pending = []

    @staticmethod
    def _drop(seq: Sequence, count: int) -> None:
        if count:
            del seq.token_ids[-count:]
            seq.num_spec_tokens -= count

    # --- after the forward ---------------------------------------------------------------
    def verify(self, batch: ScheduledBatch, sample_idx: list[int], logits: torch.Tensor) -> tuple[
            list[int], torch.Tensor, list[RequestOutput]]:
        """Accept or reject every proposal of this step, roll back the rejected slots, and
        report the new tokens. Returns the sample indices and logits rows (one each) of the
        other sequences, for the ordinary sampler."""
        if not self._pending:
            return sample_idx, logits, []
        keep_idx, keep_rows, outputs, row = [], [], [], 0
        for i in sample_idx:
            seq = batch.seqs[i]
            width = 1 + seq.num_spec_tokens
            if seq.num_spec_tokens:
                outputs.append(self._verify_one(seq, logits[row:row + width]))
            else:
                keep_idx.append(i)
                keep_rows.append(row)
            row += width
        self._pending = []
        return keep_idx, logits[keep_rows], outputs

    def _verify_one(self, seq: Sequence, rows: torch.Tensor) -> RequestOutput:
        k = seq.num_spec_tokens
        draft = seq.token_ids[-k:]
        accepted = 0
        for j in range(k + 1):
            # one row at a time, with the engine's own sampler: each emitted token is one draw
            # of the request's generator, as without speculation
            (token,) = sample_batch(rows[j:j + 1], [seq.params], [generator_for(seq)])
            if j == k or token != draft[j]:
                break
            accepted += 1
        rec = self._records.setdefault(seq, _Record())
        rec.proposed += k
        rec.accepted += accepted
        self.proposed_tokens += k
        self.accepted_tokens += accepted
        self.verify_steps += 1
        self._drop(seq, k)
        seq.num_computed_tokens -= k - accepted  # the rejected tokens' slots are void
        self.host.rollback(seq, seq.num_computed_tokens)
        return self._emit(seq, draft[:accepted] + [token])

    def _emit(self, seq: Sequence, tokens: list[int]) -> RequestOutput:
        """Append the step's tokens one by one (EOS, a stop string or the length limit may end
        the request midway) and report them in one output."""
        for n, token in enumerate(tokens, start=1):
            reason = self.host.append_token(seq, token)
            if reason:
                seq.num_computed_tokens = min(seq.num_computed_tokens, seq.num_tokens)
                return self.host.end(seq, reason, tokens[:n])
        return self.host.output(seq, tokens)

    # --- observation ---------------------------------------------------------------------
    def stats(self) -> dict:
        p, a, steps = self.proposed_tokens, self.accepted_tokens, self.verify_steps
        return {
            "spec_proposed_tokens": p,
            "spec_accepted_tokens": a,
            "spec_acceptance_rate": a / p if p else 0.0,
            "spec_tokens_per_step": (a + steps) / steps if steps else 0.0,  # per verifying sequence
        }
