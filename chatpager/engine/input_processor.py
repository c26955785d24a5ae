"""Input processing: from what a caller passes to `add_request` / `fork` to Sequences.

Validates and tokenizes prompts (clear `RequestError`s for anything that can never be
served), hands out request ids (unique among live requests), builds the Sequence, and fans a
request with n > 1 out into a RequestGroup whose samples exist from the start. Touches no
blocks: the BlockManager and the Scheduler take it from here.
"""
from __future__ import annotations

import itertools
from collections.abc import Container
from dataclasses import replace

from chatpager.engine.core.request import RequestGroup, Sequence
from chatpager.engine.sampling_params import SamplingParams
from chatpager.errors import PromptTooLong, RequestError


class InputProcessor:
    # Set by the engine when a sliding window bounds the blocks one sequence holds at a time
    # and that bound fits the pool: then the pool limits no prompt's or sequence's length.
    window_fits_pool = False

    def __init__(self, tokenizer, vocab_size: int, max_model_len: int, block_size: int,
                 num_blocks: int, lora_names: frozenset[str] = frozenset()) -> None:
        self.tokenizer = tokenizer
        self.lora_names = lora_names  # the adapters a request may name (SamplingParams.lora)
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.num_blocks = num_blocks
        self._ids = itertools.count()

    @property
    def pool_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            token_ids = self.tokenizer.encode(prompt) if prompt else []
        else:
            token_ids = [int(t) for t in prompt]
        n = len(token_ids)
        if n == 0:
            raise RequestError("empty prompt: nothing to generate from")
        if n >= self.max_model_len:
            raise PromptTooLong(f"prompt has {n} tokens; the model's context is {self.max_model_len} "
                               f"and at least one must be left to generate")
        if n + 1 > self.pool_tokens and not self.window_fits_pool:
            bs = self.block_size
            raise PromptTooLong(f"prompt needs {-(-(n + 1) // bs)} blocks but the whole KV pool has "
                               f"{self.num_blocks}; use a larger pool or a shorter prompt")
        bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise RequestError(f"token ids out of the vocabulary (size {self.vocab_size}): {bad[:5]}")
        return token_ids

    def check_lora(self, params: SamplingParams) -> None:
        if params.lora is not None and params.lora not in self.lora_names:
            loaded = ", ".join(sorted(self.lora_names)) or "none"
            raise RequestError(f"unknown LoRA adapter {params.lora!r}; loaded adapters: {loaded}")

    def new_id(self, request_id: str | None, taken: Container[str]) -> str:
        if request_id is None:
            request_id = f"req-{next(self._ids)}"
            while request_id in taken:
                request_id = f"req-{next(self._ids)}"
        elif request_id in taken:
            raise RequestError(f"request id {request_id!r} is already in use")
        return request_id

    def make_request(self, prompt: str | list[int], params: SamplingParams | None, request_id: str | None,
                     cache_salt: str | None, taken: Container[str]) -> list[Sequence]:
        """The sequences of a new request: its own, then its parallel samples (n > 1)."""
        params = params or SamplingParams()
        self.check_lora(params)
        token_ids = self.tokenize(prompt)
        if cache_salt is not None and not isinstance(cache_salt, str):
            raise RequestError(f"cache_salt must be a string, got {type(cache_salt).__name__}")
        request_id = self.new_id(request_id, taken)
        sample_ids = [f"{request_id}.{k}" for k in range(1, params.n)]
        clash = [i for i in sample_ids if i in taken]
        if clash:
            raise RequestError(f"request id {clash[0]!r} (a sample of {request_id!r}) is already in use")
        max_len = self.max_model_len if self.window_fits_pool else min(self.max_model_len, self.pool_tokens)
        leader = Sequence(request_id, token_ids, params, max_len=max_len, cache_salt=cache_salt)
        if params.n == 1:
            return [leader]
        group = RequestGroup(leader)
        for k, sample_id in enumerate(sample_ids, start=1):
            seed = None if params.seed is None else params.seed + k
            sample = Sequence(sample_id, token_ids, replace(params, n=1, seed=seed), max_len=max_len,
                              parent_id=request_id, cache_salt=cache_salt)
            group.samples.append(sample)
        group.pending = list(group.samples)
        for seq in group.members:
            seq.group = group
        return group.members

    def fork_request(self, parent: Sequence, child_id: str, params: SamplingParams | None) -> Sequence:
        """A new request continuing from `parent`'s tokens; its output starts with the parent's
        output so far and `max_tokens` counts from the fork. It shares the parent's K/V, so it
        runs under the parent's LoRA adapter: `params` naming another one is refused."""
        if params is not None and params.lora not in (None, parent.params.lora):
            raise RequestError(f"a fork continues under its parent's LoRA adapter "
                               f"({parent.params.lora!r}), not {params.lora!r}")
        params = replace(parent.params, n=1) if params is None else replace(params, lora=parent.params.lora)
        child = Sequence(child_id, parent.token_ids[:parent.num_prompt_tokens], params, parent.max_len,
                         parent_id=parent.request_id, cache_salt=parent.cache_salt)
        child.continue_from(parent)
        child.max_output_tokens = len(parent.output_token_ids) + params.max_tokens
        return child

