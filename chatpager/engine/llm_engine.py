"""The step-level engine: requests in, one continuous-batching step at a time, outputs out.

`add_request` validates and queues (InputProcessor); `step` is the core loop — schedule, run
the model once, sample, advance — and reports every request that changed (OutputProcessor);
`abort` frees a request's blocks at once; `fork` shares every block of a live request with a
new one; `stats` / `snapshot` observe (stats.py).
Invariants: every request reports `finished` exactly once (finished requests leave `seqs` at
once); a request group (n > 1) is aborted or failed as a whole. A failed forward fails the
requests of that batch (logged with its traceback) and the engine keeps serving. Not
thread-safe: one thread owns an engine (the EngineLoop, a benchmark, a test).
"""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import replace

from chatpager.engine.config import EngineConfig
from chatpager.engine.core.block_manager import BlockManager
from chatpager.engine.core.block_pool import BlockPool
from chatpager.engine.core.request import Sequence, Status
from chatpager.engine.core.scheduler import ScheduledBatch, Scheduler
from chatpager.engine.decoding.beam_search import BeamSearcher
from chatpager.engine.decoding.sampler import generator_for, sample_batch
from chatpager.engine.decoding.spec_decode import SpecDecoder, SpeculativeConfig
from chatpager.engine.input_processor import InputProcessor
from chatpager.engine.model.kv_cache import KVCache
from chatpager.engine.model.runner import ModelRunner
from chatpager.engine.output_processor import OutputProcessor
from chatpager.engine.outputs import CacheSnapshot, RequestOutput
from chatpager.engine.sampling_params import BeamSearchParams, SamplingParams
from chatpager.engine.stats import cache_snapshot, DecodeRate, engine_stats
from chatpager.errors import RequestError

log = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, runner: ModelRunner, tokenizer, eos_token_ids: set[int], config: EngineConfig,
                 max_model_len: int, max_num_batched_tokens: int, model_info: dict,
                 speculative: SpeculativeConfig | None = None) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.config = config
        self.max_model_len = max_model_len
        self.model_info = model_info
        self.runner = runner
        kv: KVCache = runner.kv_cache
        self.pool = BlockPool(kv.data.shape[2], config.enable_prefix_caching)
        self.block_manager = BlockManager(self.pool, config.block_size, model_key=model_info.get("name"),
                                          sliding_window=runner.model.config.uniform_sliding_window)
        self.scheduler = Scheduler(self.block_manager, kv, config.max_num_seqs, max_num_batched_tokens,
                                   config.preemption_mode)
        self.inputs = InputProcessor(tokenizer, runner.model.config.vocab_size, max_model_len,
                                     config.block_size, self.pool.num_blocks,
                                     lora_names=runner.lora.names if runner.lora else frozenset())
        bound = self.block_manager.max_blocks_held(max_num_batched_tokens)
        self.inputs.window_fits_pool = bound is not None and bound <= self.pool.num_blocks
        self.outputs = OutputProcessor(tokenizer, eos_token_ids)
        self.seqs: dict[str, Sequence] = {}  # every live request, group samples not yet forked included
        self._finished_out: list[RequestOutput] = []  # aborts, reported by the next step
        self.step_count = 0
        self.decode_rate = DecodeRate()
        self.recent_cow: deque[tuple[int, int]] = deque(maxlen=32)
        host = DecodingHost(self)
        self.beams = BeamSearcher(host)  # beam groups: advanced from their logits, not sampled
        # n-gram proposals, verified in the forward; never for a beam's slots
        self.spec = SpecDecoder(host, speculative, excluded=self.beams.owns)

    # --- requests ------------------------------------------------------------------------
    @property
    def pool_tokens(self) -> int:
        return self.inputs.pool_tokens

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, cache_salt: str | None = None) -> str:
        """Queue a request; returns its id (its samples, for n > 1, are `<id>.1` ...).
        Requests with different `cache_salt`s never share cached blocks (tenant isolation);
        None is a salt of its own, shared by all unsalted requests."""
        members = self.inputs.make_request(prompt, params, request_id, cache_salt, self.seqs)
        for seq in members:
            self.seqs[seq.request_id] = seq
        self.scheduler.add(members[0])  # samples wait in the group until the prompt is prefilled
        return members[0].request_id

    def add_beam_search(self, prompt: str | list[int], params: BeamSearchParams, request_id: str | None = None,
                        cache_salt: str | None = None) -> str:
        """Queue a beam search (beam_search.py); it reports once, under the returned id, when it
        ends: `samples` are its sequences best first (`beams.results[id]` has their scores)."""
        return self.beams.add(prompt, params, request_id, cache_salt)

    def abort(self, request_id: str) -> None:
        """End a request now (a group's leader ends the whole group); reported by the next step.
        An unknown or finished id is a no-op."""
        seq = self.seqs.get(request_id)
        if seq is None or seq.is_finished:
            return
        group = seq.group
        for member in group.live_members() if group and group.leader is seq else [seq]:
            self._finished_out.append(self._end(member, "abort"))

    def fork(self, request_id: str, new_request_id: str | None = None,
             params: SamplingParams | None = None) -> str:
        """A new request continuing from `request_id`'s tokens, sharing every block it holds.
        Its output starts with the parent's output so far; `max_tokens` counts from the fork."""
        parent = self.seqs.get(request_id)
        if parent is None or parent.is_finished:
            raise RequestError(f"cannot fork {request_id!r}: no such live request")
        child = self.inputs.fork_request(parent, self.inputs.new_id(new_request_id, self.seqs), params)
        self.seqs[child.request_id] = child
        self._attach(parent, child)
        return child.request_id

    def _attach(self, parent: Sequence, child: Sequence) -> None:
        """Schedule a child that `Sequence.continue_from` made a copy of `parent`: running beside it on
        shared blocks if max_num_seqs leaves room, else queued to recompute (hitting the
        parent's cached blocks)."""
        if parent.status is Status.RUNNING and self.scheduler.has_room():
            self.block_manager.fork(parent, child)
            self.scheduler.add_running(child)
        else:
            child.status = Status.WAITING
            child.num_computed_tokens = 0
            self.scheduler.add(child)

    def has_unfinished(self) -> bool:
        return bool(self._finished_out) or any(not s.is_finished for s in self.seqs.values())

    # --- the step ------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        outputs, self._finished_out = self._finished_out, []
        self.block_manager.end_step(computed=False)  # no-op, unless the last step raised midway
        self.spec.propose(self.scheduler.running)
        batch = self.scheduler.schedule()
        self.spec.fit(batch)
        self.step_count += 1
        if not batch:
            return outputs
        self.recent_cow.extend(batch.copies)
        try:
            sample_idx, logits = self.runner.run(batch)
        except Exception as exc:  # e.g. out of device memory: fail these requests, keep serving
            log.exception("forward failed for %d sequences: %s", len(batch), [s.request_id for s in batch.seqs])
            self.block_manager.end_step(computed=False)
            self.spec.withdraw()
            outputs.extend(self._fail(batch, f"{type(exc).__name__}: {exc}"))
            return outputs
        self.block_manager.end_step(computed=True)
        for seq, n in zip(batch.seqs, batch.num_tokens):
            seq.num_computed_tokens += n
        sample_idx, logits, verified = self.spec.verify(batch, sample_idx, logits)
        outputs.extend(verified)
        rows = [(row, s) for row, i in enumerate(sample_idx) for s in self._with_new_samples(batch.seqs[i])]
        rows, searched = self.beams.take_rows(rows, logits)
        outputs.extend(searched)
        tokens = sample_batch(logits[[row for row, _ in rows]], [s.params for _, s in rows],
                              [generator_for(s) for _, s in rows]) if rows else []
        outputs.extend(self._emit(s, token) for (_, s), token in zip(rows, tokens))
        self.decode_rate.record(len(tokens) + sum(len(o.new_token_ids) for o in verified))
        return outputs

    def _with_new_samples(self, seq: Sequence) -> list[Sequence]:
        """`seq`, preceded by the group samples that fork from it now that its prompt is
        prefilled (each takes its first token from the same logits row)."""
        group = seq.group
        if group is None or group.leader is not seq or not group.pending:
            return [seq]
        samples = group.take_pending()
        for sample_seq in samples:
            sample_seq.continue_from(seq)
            self._attach(seq, sample_seq)
        return [*samples, seq]

    def _emit(self, seq: Sequence, token: int) -> RequestOutput:
        reason = self.outputs.append_token(seq, token)
        if reason:
            return self._end(seq, reason, new=[token])
        return self.outputs.output(seq, [token])

    def _fail(self, batch: ScheduledBatch, error: str) -> list[RequestOutput]:
        """End every request of a failed batch, and every member of their groups."""
        victims: dict[str, Sequence] = {}
        for seq in batch.seqs:
            for member in seq.group.members if seq.group else [seq]:
                victims[member.request_id] = member
        ended = []
        for seq in victims.values():
            if not seq.is_finished:
                seq.error = error
                ended.append(self._end(seq, "error"))
        return ended

    def _end(self, seq: Sequence, reason: str, new: list[int] | None = None) -> RequestOutput:
        """Finish `seq` (exactly once), free its blocks, and build its last output."""
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        seq.swapped_kv = None
        self.block_manager.free(seq, keep_tail=reason != "error")
        self.seqs.pop(seq.request_id, None)
        return self.outputs.output(seq, new or [])

    # --- observation ---------------------------------------------------------------------
    def stats(self) -> dict:
        return engine_stats(self)

    def snapshot(self) -> CacheSnapshot:
        return cache_snapshot(self)


class DecodingHost:
    """The EngineHost (decoding/host.py) that an LLMEngine gives its decoders: the one way they
    reach its requests, blocks and outputs."""

    def __init__(self, engine: LLMEngine) -> None:
        self._engine = engine

    @property
    def eos_token_ids(self) -> set[int]:
        return self._engine.eos_token_ids

    def decode(self, token_ids: list[int]) -> str:
        return self._engine.tokenizer.decode(token_ids, skip_special_tokens=True)

    def is_live(self, request_id: str) -> bool:
        return request_id in self._engine.seqs

    def make(self, prompt: str | list[int], params: SamplingParams, request_id: str | None,
             cache_salt: str | None) -> Sequence:
        eng = self._engine
        (seq,) = eng.inputs.make_request(prompt, replace(params, n=1), request_id, cache_salt, eng.seqs)
        return seq

    def queue(self, seq: Sequence) -> None:
        self._engine.seqs[seq.request_id] = seq
        self._engine.scheduler.add(seq)

    def attach(self, parent: Sequence, child: Sequence) -> None:
        self._engine.seqs[child.request_id] = child
        self._engine._attach(parent, child)

    def rename(self, seq: Sequence, request_id: str) -> None:
        seqs = self._engine.seqs
        seqs.pop(seq.request_id, None)
        seq.request_id = request_id
        seqs[request_id] = seq

    def release(self, seq: Sequence, reason: str | None = None) -> None:
        seq.status = Status.FINISHED
        if reason is not None:
            seq.finish_reason = reason
        self._engine.block_manager.free(seq)
        self._engine.seqs.pop(seq.request_id, None)

    def rollback(self, seq: Sequence, num_tokens: int) -> None:
        self._engine.block_manager.rollback(seq, num_tokens)

    def append_token(self, seq: Sequence, token: int) -> str | None:
        return self._engine.outputs.append_token(seq, token)

    def output(self, seq: Sequence, new_token_ids: list[int]) -> RequestOutput:
        return self._engine.outputs.output(seq, new_token_ids)

    def end(self, seq: Sequence, reason: str, new_token_ids: list[int]) -> RequestOutput:
        return self._engine._end(seq, reason, new=new_token_ids)
