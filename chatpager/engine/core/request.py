"""What a request is: a Sequence (one request's tokens, block table and progress) and the
RequestGroup that owns the members of an n > 1 request or a beam search. A Sequence never
allocates: the BlockManager fills its block table and the Scheduler moves it between states.
No tensors here (core/ is pure bookkeeping): a swapped-out sequence holds its host copy as an
opaque handle of the KV store (`scheduler.SwapSpace`), and a seeded request's random stream
is made by the sampler at its first draw (`decoding.sampler.generator_for`).

With a sliding window, the table's leading entries may be null (None in `blocks`, NULL_BLOCK
in `block_table`): blocks wholly before the window of every query still to come, released
(see BlockManager.release_outside_window). Nulls are always one leading run, of length
`num_null_blocks`, and lie before every position a step writes.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from chatpager.engine.core.block_pool import Block
from chatpager.engine.detokenizer import Detokenizer
from chatpager.engine.sampling_params import SamplingParams

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
        self.swapped_kv: object | None = None  # the KV store's host copy while swapped out
        self.generator: object | None = None  # a seeded request's random stream: the sampler's
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

    def continue_from(self, parent: Sequence) -> None:
        """Carry on from where `parent` is now (tokens, progress, text so far)."""
        self.token_ids = list(parent.token_ids)
        self.num_computed_tokens = parent.num_computed_tokens
        self.num_cached_tokens = parent.num_cached_tokens
        self.block_hashes = list(parent.block_hashes)
        self.status = parent.status if parent.status is Status.RUNNING else Status.WAITING
        self.admitted = parent.admitted
        self.detok = parent.detok.copy()


@dataclass(slots=True, eq=False)
class RequestGroup:
    """The n parallel samples of one prompt, or the slots of a beam search
    (decoding/beam_search.py), owned together.

    Invariants:
    - Every member exists, with its request id (`<id>`, `<id>.1` ... `<id>.<n-1>`), from the
      moment the request is added: the leader is scheduled, the others wait in `pending` until
      the leader's prompt has been prefilled and then fork its blocks. Nothing is created later,
      so nothing can be forgotten: aborting or failing the group reaches every member, forked
      or not, and each reports exactly once (its `finish_reason` is set once; a finished member
      is skipped).
    - Aborting the leader ends the whole group; aborting a sample ends only that sample.
    """

    leader: Sequence
    pending: list[Sequence] = field(default_factory=list)  # samples still to fork from the leader
    samples: list[Sequence] = field(default_factory=list)  # every member but the leader, in order

    @property
    def members(self) -> list[Sequence]:
        return [self.leader, *self.samples]

    def live_members(self) -> list[Sequence]:
        return [m for m in self.members if not m.is_finished]

    def take_pending(self) -> list[Sequence]:
        """The samples to fork now (the leader's prompt is prefilled); each is handed out once."""
        pending, self.pending = self.pending, []
        return [s for s in pending if not s.is_finished]
