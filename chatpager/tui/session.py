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
    interrupted: bool = False  # a reply cut short when chatpager was killed


@dataclass(slots=True)
class Session:
    id: str
    title: str
    prompt_name: str
    system: str
    messages: list[Message] = field(default_factory=list)
    stored: bool = True  # swarm tenants are simulated load, not the user's data
    remote: str | None = None  # the tenant, for a remote (HTTP) tenant's session: read-only
    settings: dict[str, float | str] = field(default_factory=dict)  # sampling overrides (/set), "lora" (/lora)
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
    window: int = 0  # messages before this one no longer fit the context and are not sent
    revision: int = 0  # bumped when messages change other than by appending

    @property
    def busy(self) -> bool:
        return self.request_id is not None

    def drop_oldest_turn(self) -> bool:
        """Move the window past the oldest exchange still sent, to the next user message;
        False when there is none to drop (only the latest user message is left)."""
        later = [i for i in range(self.window + 1, len(self.messages))
                 if self.messages[i].role == "user"]
        if not later:
            return False
        self.window = later[0]
        self.revision += 1
        return True

    def chat(self) -> list[dict[str, str]]:
        """The conversation as chat-template messages, system prompt first.

        Turns alternate: a user message left without a reply (a crash, a rejected or failed
        turn) is merged with the next one, as many chat templates reject two in a row. Messages
        before `window` (dropped when the history outgrew the context) are left out."""
        turns = [{"role": "system", "content": self.system}] if self.system else []
        for message in self.messages[self.window:]:
            if turns and turns[-1]["role"] == message.role:
                turns[-1] = {"role": message.role,
                             "content": f"{turns[-1]['content']}\n\n{message.content}"}
            else:
                turns.append({"role": message.role, "content": message.content})
        return turns
