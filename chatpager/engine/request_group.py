"""A request group: the n parallel samples of one prompt (later: beams), owned together.

Invariants:
- Every member exists, with its request id (`<id>`, `<id>.1` ... `<id>.<n-1>`), from the moment
  the request is added: the leader is scheduled, the others wait in `pending` until the
  leader's prompt has been prefilled and then fork its blocks. Nothing is created later, so
  nothing can be forgotten: aborting or failing the group reaches every member, forked or
  not, and each reports exactly once (its `finish_reason` is set once; a finished member is
  skipped).
- Aborting the leader ends the whole group; aborting a sample ends only that sample.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from chatpager.engine.sequence import Sequence


@dataclass(slots=True, eq=False)
class RequestGroup:
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
