"""The multi-tenant chat workload: S sessions × T turns, seeded, identical for every runner.

Each session gets a system prompt from the repository's `prompts/` folder (several of them
include the same house-style preamble, and with more sessions than prompts some sessions share
a whole prompt), and T user messages drawn from a bundled list of varied lengths. Replies are
the model's own (greedy), so the history of turn k+1 depends on the runner's reply to turn k;
with greedy decoding on both sides it is the same history.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from chatpager.prompts import load_prompts, PROMPTS_DIR

USER_MESSAGES = Path(__file__).with_name("user_messages.txt")
Message = dict[str, str]


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    sessions: int = 16
    turns: int = 5
    max_tokens: int = 48  # reply length cap R
    ignore_eos: bool = False  # True: every reply is exactly max_tokens long
    seed: int = 0
    prompts_dir: Path = PROMPTS_DIR

    def __post_init__(self) -> None:
        for name in ("sessions", "turns", "max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True, slots=True)
class Session:
    index: int
    prompt_name: str
    system_prompt: str
    user_messages: tuple[str, ...]  # one per turn

    def messages(self, turn: int, replies: list[str]) -> list[Message]:
        """The conversation sent for `turn` (0-based): system, then each earlier exchange."""
        msgs = [{"role": "system", "content": self.system_prompt}]
        for k in range(turn):
            msgs += [{"role": "user", "content": self.user_messages[k]},
                     {"role": "assistant", "content": replies[k]}]
        msgs.append({"role": "user", "content": self.user_messages[turn]})
        return msgs


def build_workload(spec: WorkloadSpec) -> list[Session]:
    prompts = load_prompts(spec.prompts_dir)
    if not prompts:
        raise ValueError(f"no system prompts (*.md) in {spec.prompts_dir}")
    messages = [m for m in USER_MESSAGES.read_text(encoding="utf-8").splitlines() if m.strip()]
    rng = random.Random(spec.seed)
    names = sorted(prompts)
    sessions = []
    for i in range(spec.sessions):
        name = names[i % len(names)] if i < len(names) else rng.choice(names)
        turns = tuple(rng.choice(messages) for _ in range(spec.turns))
        sessions.append(Session(i, name, prompts[name], turns))
    return sessions
