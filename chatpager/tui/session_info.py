"""What /info and /copy say about a session: its use of the KV cache, and text to copy."""
from __future__ import annotations

import re

from chatpager.engine.outputs import CacheSnapshot
from chatpager.tui.session import Session
from chatpager.tui.sessions import UserError

_CODE_BLOCK = re.compile(r"^```[^\n]*\n(.*?)^```", re.DOTALL | re.MULTILINE)


def describe(session: Session, snapshot: CacheSnapshot | None) -> str:
    """Messages, the last turn's tokens and prefix-cache hits, the blocks held now."""
    lines = [f"System prompt: {session.prompt_name} · {len(session.messages)} messages"]
    if session.window:
        lines.append(f"{session.window} oldest messages no longer fit the context: not sent")
    if session.tokens:
        share = 100 * session.cached_tokens / session.tokens
        lines.append(f"Last turn: {session.tokens} tokens, {session.cached_tokens} of them "
                     f"prefix-cache hits ({share:.0f}%)")
    views = [] if snapshot is None or session.request_id is None else [
        view for view in snapshot.sequences if view.request_id.split(".")[0] == session.request_id]
    blocks = {block for view in views for block in view.held_blocks}
    if blocks:
        shared = sum(1 for block in blocks if snapshot.refcounts[block] > 1)
        lines.append(f"Holds {len(blocks)} blocks now, {shared} shared with other sequences")
    else:
        lines.append("Holds no blocks now (idle): its history waits in the prefix cache")
    if session.settings:
        lines.append("Settings: " + settings_text(session))
    return "\n".join(lines)


def settings_text(session: Session) -> str:
    return ", ".join(f"{name} {value}" for name, value in sorted(session.settings.items()))


def to_copy(session: Session, what: str) -> tuple[str, str]:
    """(what was taken, its text): the last reply, or with what="code" its last code block."""
    replies = [m.content for m in session.messages if m.role == "assistant"]
    if not replies:
        raise UserError("there is no reply to copy yet")
    if what == "":
        return "the last reply", replies[-1]
    if what != "code":
        raise UserError("usage: /copy, or /copy code for the last code block")
    for reply in reversed(replies):
        blocks = _CODE_BLOCK.findall(reply)
        if blocks:
            return "the last code block", blocks[-1]
    raise UserError("no reply has a code block")
