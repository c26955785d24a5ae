"""Slash commands typed in the prompt: the table, parsing and completion."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from chatpager.tui.sessions import UserError


@dataclass(frozen=True, slots=True)
class SlashCommand:
    name: str
    usage: str
    help: str
    completes_prompt: bool = False  # its argument is a prompt name

    @property
    def signature(self) -> str:
        return f"/{self.name} {self.usage}".strip()


COMMANDS: tuple[SlashCommand, ...] = (
    SlashCommand("new", "[prompt]", "Start a session with a system prompt from prompts/", True),
    SlashCommand("fork", "", "Fork this session at its last message"),
    SlashCommand("system", "<name|text>", "Set this session's system prompt", True),
    SlashCommand("regen", "[n]", "Regenerate the last reply; n > 1 gives alternatives"),
    SlashCommand("beam", "[k]", "Beam search the last reply; k beams to pick from"),
    SlashCommand("stop", "", "Stop the reply being generated"),
    SlashCommand("set", "[name value|default]",
                 "This session's sampling: temperature, top_p, top_k, max_tokens"),
    SlashCommand("lora", "[name|none]", "This session's LoRA adapter (none: the base model); alone: list them"),
    SlashCommand("rename", "[title]", "Rename this session"),
    SlashCommand("delete", "", "Delete this session and its messages"),
    SlashCommand("info", "", "This session's tokens, blocks and prefix-cache hits"),
    SlashCommand("copy", "[code]", "Copy the last reply (or its last code block) to the clipboard"),
    SlashCommand("search", "<text>", "Find sessions that mention the text"),
    SlashCommand("clear", "", "Clear this session's messages"),
    SlashCommand("export", "[md|json] [path]", "Write this session to a file (asks before replacing one)"),
    SlashCommand("swarm", "N", "Start N simulated tenants (0 stops them)"),
    SlashCommand("demo", "", "Guided tour of paging: Space / → next step, Esc leaves"),
    SlashCommand("restart", "", "Start the engine again after it stopped (its cache starts empty)"),
    SlashCommand("help", "", "Show keys and commands"),
)
_BY_NAME = {command.name: command for command in COMMANDS}


def parse(text: str) -> tuple[SlashCommand, str]:
    """Split `/name argument...`; raises UserError for an unknown command."""
    name, _, argument = text.strip()[1:].partition(" ")
    command = _BY_NAME.get(name)
    if command is None:
        raise UserError(f"unknown command /{name}: try /help")
    return command, argument.strip()


def matching(text: str) -> list[SlashCommand]:
    """Commands whose name starts with what is typed, while the name is being typed."""
    if not text.startswith("/") or " " in text or "\n" in text:
        return []
    return [command for command in COMMANDS if command.name.startswith(text[1:])]


def suggest(text: str, prompt_names: Sequence[str]) -> str:
    """What completes `text`: the rest of a command name, or of a prompt name after
    /new or /system; "" when there is nothing unambiguous to add."""
    commands = matching(text)
    if commands:
        return f"{commands[0].name[len(text) - 1:]} " if len(commands) == 1 else ""
    name, space, word = text[1:].partition(" ")
    command = _BY_NAME.get(name)
    if not text.startswith("/") or not space or command is None or not command.completes_prompt:
        return ""
    names = [p for p in prompt_names if p.startswith(word)]
    return names[0][len(word):] if len(names) == 1 else ""
