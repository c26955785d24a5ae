"""System prompts: files in a folder, by default the `chatpager/prompts/` shipped in the package.

A prompt's name is its file name without `.md`. Files whose name starts with `_` are parts,
not prompts: a line `@include _part.md` is replaced by that part's text. Prompts that include
the same part first start with the same tokens, so their KV blocks are shared.
"""
from __future__ import annotations

from pathlib import Path

PROMPTS_DIR = Path(__file__).resolve().parent  # package data beside this module: in every install
DEFAULT_PROMPT = "assistant"
_INCLUDE = "@include "


def load_prompts(folder: Path = PROMPTS_DIR) -> dict[str, str]:
    """Every prompt in `folder`, by name, with its includes expanded; sorted by name."""
    return {
        path.stem: _expand(path).strip()
        for path in sorted(folder.glob("*.md"))
        if not path.name.startswith("_")
    }


def _expand(path: Path) -> str:
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        if line.startswith(_INCLUDE):
            lines.append(_expand(path.parent / line[len(_INCLUDE):].strip()))
        else:
            lines.append(line)
    return "".join(lines)
