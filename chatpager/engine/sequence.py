"""One request's tokens, block table and progress. A Sequence never allocates: the
BlockManager fills its block table and the Scheduler moves it between states.

With a sliding window, the table's leading entries may be null (None in `blocks`, NULL_BLOCK
in `block_table`): blocks wholly before the window of every query still to come, released
(see BlockManager.release_outside_window). Nulls are always one leading run, of length
`num_null_blocks`, and lie before every position a step writes.
"""
from __future__ import annotations

import enum
from typing import TYPE_CHECKING

import torch

from chatpager.engine.block_pool import Block
from chatpager.engine.detokenizer import Detokenizer
from chatpager.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from chatpager.engine.request_group import RequestGroup

NULL_BLOCK = -1  # a released table entry, as the attention kernels see it (never read there)


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED = "swapped"
    FINISHED = "finished"


class Sequence:
    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 max_len: int, parent_id: str | None = None, cache_salt: str | None = None) -> None:
        self.request_id = request_id
        self.parent_id = parent_id
        self.cache_salt = cache_salt  # tenant isolation: only equal salts share cached blocks
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.max_len = max_len  # total tokens this sequence may reach (model and pool limits)
        self.max_output_tokens = params.max_tokens  # a fork adds the tokens it inherits
        self.status = Status.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens served by the prefix cache at first admission
        self.blocks: list[Block | None] = []  # None: released, outside the sliding window
        self.num_null_blocks = 0  # the leading run of None in `blocks`
        self.block_hashes: list[bytes] = []  # key chain of the leading full blocks of token_ids
        self.num_registered_blocks = 0  # leading blocks of the table already recorded in the pool
        self.num_spec_tokens = 0  # trailing tokens proposed for verification: only inside a step
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.swapped_kv: torch.Tensor | None = None  # host copy while swapped out
        self.generator: torch.Generator | None = None
        if params.seed is not None:
            self.generator = torch.Generator().manual_seed(params.seed)
        self.detok = Detokenizer()
        self.admitted = False
        self.group: RequestGroup | None = None  # set for the members of an n > 1 request

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def block_table(self) -> list[int]:
        return [NULL_BLOCK if b is None else b.block_id for b in self.blocks]

