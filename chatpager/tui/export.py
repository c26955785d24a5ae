"""Writing a session out as Markdown or JSON; an existing file is never replaced unasked."""
from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

from chatpager.tui.session import Session

FORMATS = ("md", "json")


def to_markdown(session: Session) -> str:
    parts = [f"# {session.title}\n", f"System prompt: `{session.prompt_name}`\n"]
    for message in session.messages:
        parts.append(f"## {message.role}\n\n{message.content.strip()}\n")
    return "\n".join(parts)


def to_json(session: Session) -> str:
    record = {
        "title": session.title,
        "prompt_name": session.prompt_name,
        "system": session.system,
        "messages": [{"role": m.role, "content": m.content} for m in session.messages],
    }
    return json.dumps(record, indent=2, ensure_ascii=False) + "\n"


def default_path(session: Session, fmt: str) -> Path:
    """A file named after the session in the current folder, one that does not exist yet."""
    slug = re.sub(r"[^a-z0-9]+", "-", session.title.lower()).strip("-") or "chat"
    path = Path.cwd() / f"{slug}.{fmt}"
    for k in itertools.count(2):
        if not path.exists():
            return path
        path = path.with_name(f"{slug}-{k}.{fmt}")
    raise AssertionError("unreachable")


def export(session: Session, fmt: str = "md", path: Path | None = None,
           overwrite: bool = False) -> Path:
    """Write the session; returns the path written. An existing file is only replaced with
    `overwrite` (FileExistsError otherwise): exporting never overwrites silently."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}: use one of {', '.join(FORMATS)}")
    path = (path or default_path(session, fmt)).expanduser()
    text = to_markdown(session) if fmt == "md" else to_json(session)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w" if overwrite else "x", encoding="utf-8") as file:
        file.write(text)
    return path
