"""What a runner records per turn, and the figures every runner is summarised by.

Times are seconds from the runner's start (time.perf_counter based). A turn is *submitted*
when its session's previous reply is done (or, for static batches, when the batch starts);
TTFT is first token − submitted, latency is finished − submitted.
"""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field


@dataclass(slots=True)
class TurnRecord:
    session: int
    turn: int  # 1-based
    prompt_tokens: int
    submitted: float
    first_token: float = 0.0
    finished: float = 0.0
    cached_tokens: int = 0  # prompt tokens served by the prefix cache (chatpager only)
    prompt_ids: list[int] = field(default_factory=list)
    output_ids: list[int] = field(default_factory=list)

    @property
    def ttft(self) -> float:
        return self.first_token - self.submitted

    @property
    def latency(self) -> float:
        return self.finished - self.submitted


@dataclass(slots=True)
class RunResult:
    runner: str
    wall_s: float
    turns: list[TurnRecord]
    settings: dict = field(default_factory=dict)  # batch size, sessions run, ...

    @property
    def output_tokens(self) -> int:
        return sum(len(t.output_ids) for t in self.turns)

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s if self.wall_s > 0 else 0.0

    def ttft_by_turn(self) -> dict[int, float]:
        """Mean TTFT of each turn number over the sessions that ran it."""
        by: dict[int, list[float]] = {}
        for t in self.turns:
            by.setdefault(t.turn, []).append(t.ttft)
        return {k: statistics.fmean(v) for k, v in sorted(by.items())}

    def summary(self) -> dict:
        lat = sorted(t.latency for t in self.turns)
        ttft = self.ttft_by_turn()
        return {
            "runner": self.runner,
            "sessions": len({t.session for t in self.turns}),
            "turns": len(self.turns),
            "wall_s": self.wall_s,
            "output_tokens": self.output_tokens,
            "prompt_tokens": sum(t.prompt_tokens for t in self.turns),
            "output_tokens_per_s": self.tokens_per_s,
            "ttft_s_by_turn": ttft,
            "ttft_s_mean": statistics.fmean(t.ttft for t in self.turns) if self.turns else 0.0,
            "latency_s_mean": statistics.fmean(lat) if lat else 0.0,
            "latency_s_p90": lat[min(len(lat) - 1, int(0.9 * len(lat)))] if lat else 0.0,
            **self.settings,
        }

    def to_json(self) -> dict:
        turns = [{k: v for k, v in asdict(t).items() if k != "prompt_ids"} for t in self.turns]
        return {"summary": self.summary(), "turns": turns}


def greedy_agreement(ours: RunResult, theirs: RunResult) -> dict:
    """Replies compared token for token where both runners sent the same prompt ids.

    A reply that differs changes that session's later prompts, so later turns of it are
    not comparable (counted in `skipped`)."""
    mine = {(t.session, t.turn): t for t in ours.turns}
    same = compared = skipped = 0
    first_diff: list[int] = []
    for t in theirs.turns:
        o = mine.get((t.session, t.turn))
        if o is None:
            continue
        if o.prompt_ids != t.prompt_ids:
            skipped += 1
            continue
        compared += 1
        n = min(len(o.output_ids), len(t.output_ids))
        diff = next((i for i in range(n) if o.output_ids[i] != t.output_ids[i]), None)
        if diff is None and len(o.output_ids) == len(t.output_ids):
            same += 1
        else:
            first_diff.append(n if diff is None else diff)
    return {"compared": compared, "identical": same, "skipped": skipped,
            "first_divergence_tokens": first_diff}
