"""A chat session: what is stored (title, system prompt, messages) and what is live.

The live part (request, streamed reply, state, token counts) describes the engine's work for
this session and is never stored. `Sessions` writes the stored part, `Turns` the live part.
"""
from __future__ import annotations

from dataclasses import dataclass, field

IDLE, QUEUED, GENERATING, PREEMPTED = "idle", "queued", "generating", "preempted"


@dataclass(slots=True)
class Message:
    role: str  # "user" | "assistant"
    content: str


@dataclass(slots=True)
class Session:
    id: str
    title: str
    prompt_name: str
    system: str
    messages: list[Message] = field(default_factory=list)
    stored: bool = True  # swarm tenants are simulated load, not the user's data
    # live state
    request_id: str | None = None  # the reply being generated
    reply: str = ""  # its text so far
    state: str = IDLE
    tokens: int | None = None  # prompt + generated tokens of the latest request
    cached_tokens: int = 0  # of those, prompt tokens served from the prefix cache
    samples: dict[str, str] = field(default_factory=dict)  # regen n > 1: request id -> text
    choices: list[str] = field(default_factory=list)  # finished alternatives to pick from
    replaced: str | None = None  # the reply a regeneration replaces, until it is settled
    error: str | None = None  # last error, shown in the chat until the next turn
    revision: int = 0  # bumped when messages change other than by appending

    @property
    def busy(self) -> bool:
        return self.request_id is not None

    def chat(self) -> list[dict[str, str]]:
        """The conversation as chat-template messages, system prompt first."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + [{"role": m.role, "content": m.content} for m in self.messages]
