"""The step-level engine: requests in, one continuous-batching step at a time, outputs out.

`add_request` validates and queues; `step` schedules, runs the model once, samples, and
reports every request that changed; `abort` frees a request's blocks at once; `fork` shares
every block of a live request with a new one. Not thread-safe: one thread owns an engine
(the TUI's EngineLoop, a benchmark, a test).
"""
from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import replace

import torch

from chatpager.engine.block_manager import BlockManager
from chatpager.engine.block_pool import BlockPool
from chatpager.engine.config import EngineConfig
from chatpager.engine.kv_cache import KVCache
from chatpager.engine.model_runner import ModelRunner
from chatpager.engine.outputs import CacheSnapshot, RequestOutput, SequenceView
from chatpager.engine.sampler import sample
from chatpager.engine.sampling_params import SamplingParams
from chatpager.engine.scheduler import Scheduler
from chatpager.engine.sequence import Sequence, Status
from chatpager.errors import RequestError

RATE_WINDOW_S = 2.0  # decode tokens/s is averaged over this many recent seconds


class LLMEngine:
    def __init__(self, runner: ModelRunner, tokenizer, eos_token_ids: set[int], config: EngineConfig,
                 max_model_len: int, max_num_batched_tokens: int, model_info: dict) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.config = config
        self.max_model_len = max_model_len
        self.model_info = model_info
        self.runner = runner
        kv: KVCache = runner.kv_cache
        self.pool = BlockPool(kv.data.shape[2], config.enable_prefix_caching)
        self.block_manager = BlockManager(self.pool, config.block_size, model_key=model_info.get("name"))
        self.scheduler = Scheduler(self.block_manager, kv, config.max_num_seqs, max_num_batched_tokens,
                                   config.preemption_mode)
        self.vocab_size = runner.model.config.vocab_size
        self.seqs: dict[str, Sequence] = {}
        self._pending_forks: dict[str, int] = {}  # request id -> parallel samples still to fork
        self._finished_out: list[RequestOutput] = []  # aborts, reported by the next step
        self._ids = itertools.count()
        self._step_count = 0
        self._rate: deque[tuple[float, int]] = deque()
        self._recent_cow: deque[tuple[int, int]] = deque(maxlen=32)

    # --- requests ------------------------------------------------------------------------
    @property
    def pool_tokens(self) -> int:
        return self.pool.num_blocks * self.config.block_size

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, cache_salt: str | None = None) -> str:
        """Queue a request. Requests with different `cache_salt`s never share cached blocks
        (tenant isolation); None is a salt of its own, shared by all unsalted requests."""
        params = params or SamplingParams()
        token_ids = self._tokenize(prompt)
        if cache_salt is not None and not isinstance(cache_salt, str):
            raise RequestError(f"cache_salt must be a string, got {type(cache_salt).__name__}")
        request_id = self._new_id(request_id)
        seq = Sequence(request_id, token_ids, params, max_len=min(self.max_model_len, self.pool_tokens),
                       cache_salt=cache_salt)
        self.seqs[request_id] = seq
        if params.n > 1:
            self._pending_forks[request_id] = params.n - 1
        self.scheduler.add(seq)
        return request_id

    def _tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            token_ids = self.tokenizer.encode(prompt) if prompt else []
        else:
            token_ids = [int(t) for t in prompt]
        n = len(token_ids)
        if n == 0:
            raise RequestError("empty prompt: nothing to generate from")
        if n >= self.max_model_len:
            raise RequestError(f"prompt has {n} tokens; the model's context is {self.max_model_len} "
                               f"and at least one must be left to generate")
        if n + 1 > self.pool_tokens:
            bs = self.config.block_size
            raise RequestError(f"prompt needs {-(-(n + 1) // bs)} blocks but the whole KV pool has "
                               f"{self.pool.num_blocks}; use a larger pool or a shorter prompt")
        bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise RequestError(f"token ids out of the vocabulary (size {self.vocab_size}): {bad[:5]}")
        return token_ids

    def _new_id(self, request_id: str | None) -> str:
        if request_id is None:
            request_id = f"req-{next(self._ids)}"
            while request_id in self.seqs:
                request_id = f"req-{next(self._ids)}"
        elif request_id in self.seqs:
            raise RequestError(f"request id {request_id!r} is already in use")
        return request_id

    def abort(self, request_id: str) -> None:
        seq = self.seqs.get(request_id)
        if seq is None or seq.is_finished:
            return
        self._finish(seq, "abort")
        self._finished_out.append(self._output(seq, []))
        del self.seqs[request_id]

    def fork(self, request_id: str, new_request_id: str | None = None,
             params: SamplingParams | None = None) -> str:
        """A new request continuing from `request_id`'s tokens, sharing every block it holds.
        Its output starts with the parent's output so far; `max_tokens` counts from the fork."""
        parent = self.seqs.get(request_id)
        if parent is None or parent.is_finished:
            raise RequestError(f"cannot fork {request_id!r}: no such live request")
        child_id = self._new_id(new_request_id)
        child = self._fork_seq(parent, child_id, params or replace(parent.params, n=1))
        if parent.status is Status.RUNNING:
            self.block_manager.fork(parent, child)
            self.scheduler.add_running(child)
        else:  # not in the pool now: the child recomputes, hitting the parent's cached blocks
            child.num_computed_tokens = 0
            self.scheduler.add(child)
        return child_id

    def _fork_seq(self, parent: Sequence, child_id: str, params: SamplingParams) -> Sequence:
        child = Sequence(child_id, parent.token_ids[:parent.num_prompt_tokens], params,
                         parent.max_len, parent_id=parent.request_id, cache_salt=parent.cache_salt)
        child.token_ids = list(parent.token_ids)
        child.max_output_tokens = len(parent.output_token_ids) + params.max_tokens
        child.num_computed_tokens = parent.num_computed_tokens
        child.num_cached_tokens = parent.num_cached_tokens
        child.block_hashes = list(parent.block_hashes)
        child.status = parent.status if parent.status is Status.RUNNING else Status.WAITING
        child.admitted = parent.admitted
        child.detok.text = parent.detok.text
        child.detok.prefix_offset = parent.detok.prefix_offset
        child.detok.read_offset = parent.detok.read_offset
        self.seqs[child_id] = child
        return child

    def has_unfinished(self) -> bool:
        return bool(self._finished_out) or any(not s.is_finished for s in self.seqs.values())

    # --- the step ------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        outputs, self._finished_out = self._finished_out, []
        batch = self.scheduler.schedule()
        self._step_count += 1
        if not batch:
            return outputs
        self._recent_cow.extend(batch.copies)
        try:
            sample_idx, logits = self.runner.run(batch)
        except Exception as exc:  # e.g. out of device memory: fail these requests, keep serving
            for seq in batch.seqs:
                seq.error = f"{type(exc).__name__}: {exc}"
                self._finish(seq, "error")
                outputs.append(self._output(seq, []))
                self.seqs.pop(seq.request_id, None)
            return outputs
        for seq, n in zip(batch.seqs, batch.num_tokens):
            seq.num_computed_tokens += n
            self.block_manager.cache_full_blocks(seq)
        new_tokens = 0
        for row, i in enumerate(sample_idx):
            seq = batch.seqs[i]
            for s in self._spawn_samples(seq):
                outputs.append(self._append_token(s, sample(logits[row], s.params, s.generator)))
                new_tokens += 1
            outputs.append(self._append_token(seq, sample(logits[row], seq.params, seq.generator)))
            new_tokens += 1
        self._record_rate(new_tokens)
        return outputs

    def _spawn_samples(self, seq: Sequence) -> list[Sequence]:
        """Parallel samples (n > 1): fork the siblings right after the prompt's prefill."""
        count = self._pending_forks.pop(seq.request_id, 0)
        children = []
        for k in range(1, count + 1):
            seed = None if seq.params.seed is None else seq.params.seed + k
            params = replace(seq.params, n=1, seed=seed)
            children.append(self.seqs[self.fork(seq.request_id, f"{seq.request_id}.{k}", params)])
        return children

    def _append_token(self, seq: Sequence, token: int) -> RequestOutput:
        seq.token_ids.append(token)
        delta = seq.detok.update(self.tokenizer, seq.output_token_ids)
        reason = self._finish_reason(seq, token, delta)
        if reason:
            self._finish(seq, reason)
            del self.seqs[seq.request_id]
        return self._output(seq, [token])

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

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        seq.swapped_kv = None
        self._pending_forks.pop(seq.request_id, None)
        self.block_manager.free(seq)

    def _output(self, seq: Sequence, new: list[int]) -> RequestOutput:
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

    def _record_rate(self, tokens: int) -> None:
        now = time.monotonic()
        self._rate.append((now, tokens))
        while self._rate and now - self._rate[0][0] > RATE_WINDOW_S:
            self._rate.popleft()

    def _decode_rate(self) -> float:
        """Tokens per second over the last RATE_WINDOW_S seconds; 0 once the engine is idle."""
        now = time.monotonic()
        recent = [(t, n) for t, n in self._rate if now - t <= RATE_WINDOW_S]
        if len(recent) < 2 or now - recent[-1][0] > RATE_WINDOW_S / 2:
            return 0.0
        return sum(n for _, n in recent[1:]) / (recent[-1][0] - recent[0][0])

    # --- observation ---------------------------------------------------------------------
    def stats(self) -> dict:
        pool, bm, bs = self.pool, self.block_manager, self.config.block_size
        live = [s for s in self.seqs.values() if s.blocks]
        filled: dict[int, int] = {}
        for s in live:
            for i, b in enumerate(s.blocks):
                n = min(bs, max(0, s.num_computed_tokens - i * bs))
                filled[b.block_id] = max(filled.get(b.block_id, 0), n)
        logical = sum(len(s.blocks) for s in live)
        held = pool.num_blocks - pool.num_free
        rate = self._decode_rate()
        q = bm.prefix_query_tokens
        return {
            "num_blocks": pool.num_blocks,
            "block_size": bs,
            "free_blocks": pool.num_free,
            "cached_blocks": pool.num_cached_free(),
            "used_blocks": held,
            "shared_blocks": sum(1 for b in pool.blocks if b.ref_cnt > 1),
            "prefix_query_tokens": q,
            "prefix_hit_tokens": bm.prefix_hit_tokens,
            "prefix_hit_rate": bm.prefix_hit_tokens / q if q else 0.0,
            "evictions": pool.evictions,
            "preemptions": self.scheduler.preemptions,
            "cow_copies": bm.cow_copies,
            "kv_utilization": sum(filled.values()) / (len(filled) * bs) if filled else 0.0,
            "sharing_ratio": logical / held if held else 1.0,
            "running": sum(1 for s in self.scheduler.running if not s.is_finished),
            "waiting": sum(1 for s in self.scheduler.waiting if not s.is_finished),
            "swapped": sum(1 for s in self.scheduler.swapped if not s.is_finished),
            "decode_tokens_per_s": rate,
            "steps": self._step_count,
        }

    def snapshot(self) -> CacheSnapshot:
        views = tuple(
            SequenceView(
                request_id=s.request_id, status=s.status.value, num_prompt_tokens=s.num_prompt_tokens,
                num_tokens=s.num_tokens, num_computed_tokens=s.num_computed_tokens,
                num_cached_tokens=s.num_cached_tokens, block_table=tuple(s.block_table),
                parent_id=s.parent_id,
            )
            for s in self.seqs.values()
        )
        return CacheSnapshot(
            step=self._step_count,
            block_size=self.config.block_size,
            refcounts=tuple(b.ref_cnt for b in self.pool.blocks),
            hashed=tuple(b.block_hash is not None for b in self.pool.blocks),
            free_order=tuple(b.block_id for b in self.pool.free_queue),
            sequences=views,
            stats=self.stats(),
            recent_cow=tuple(self._recent_cow),
        )
