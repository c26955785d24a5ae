"""The slash commands: one table, and what is built from it.

Each `Command` names its handler (an `async def handler(app, argument)` of handlers.py), its
usage and help, and its entries in the command palette. From `COMMANDS`, and nothing else, come:
`ChatpagerApp.run_slash` (through `parse`, which hands the argument to the command's handler),
the hints and Tab completion under the message input (`matching`, `suggest`, which the main
screen hands to its widgets), the command palette (`palette`) and the help screen's command
table. Hints and the help screen list the commands in the table's order.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from chatpager.tui import handlers
from chatpager.tui.handlers import DEMO_TENANTS, Handler, REGENERATE_ALTERNATIVES
from chatpager.tui.sessions import UserError

EACH_PROMPT = "{prompt}"  # a palette entry's argument: one entry per system prompt, named in its help


@dataclass(frozen=True, slots=True)
class PaletteEntry:
    """`/name argument` in the command palette, with its own help or else the command's."""
    argument: str = ""
    help: str | None = None


@dataclass(frozen=True, slots=True)
class Command:
    name: str
    usage: str
    help: str
    handler: Handler
    palette: tuple[PaletteEntry, ...] = (PaletteEntry(),)  # () keeps it out of the palette
    completes_prompt: bool = False  # its argument is a prompt name

    @property
    def signature(self) -> str:
        return f"/{self.name} {self.usage}".strip()


COMMANDS: tuple[Command, ...] = (
    Command("new", "[prompt]", "Start a session with a system prompt from prompts/", handlers.new,
            completes_prompt=True,
            palette=(PaletteEntry(EACH_PROMPT, "New session with the {prompt} prompt"),)),
    Command("fork", "", "Fork this session at its last message", handlers.fork),
    Command("system", "<name|text>", "Set this session's system prompt", handlers.system,
            completes_prompt=True,
            palette=(PaletteEntry(EACH_PROMPT, "Use the {prompt} prompt in this session"),)),
    Command("regen", "[n]", "Regenerate the last reply; n > 1 gives alternatives", handlers.regen,
            palette=(PaletteEntry("", "Regenerate the last reply"),
                     PaletteEntry(str(REGENERATE_ALTERNATIVES),
                                  "Regenerate the last reply as alternatives to pick from"))),
    Command("beam", "[k]", "Beam search the last reply; k beams to pick from", handlers.beam,
            palette=()),
    Command("stop", "", "Stop the reply being generated", handlers.stop),
    Command("set", "[name value|default]",
            "This session's sampling: temperature, top_p, top_k, max_tokens", handlers.set_sampling,
            palette=(PaletteEntry("temperature 0", "Greedy replies in this session"),)),
    Command("lora", "[name|none]",
            "This session's LoRA adapter (none: the base model); alone: list them", handlers.lora,
            palette=()),
    Command("rename", "[title]", "Rename this session", handlers.rename),
    Command("delete", "", "Delete this session and its messages", handlers.delete),
    Command("info", "", "This session's tokens, blocks and prefix-cache hits", handlers.info),
    Command("copy", "[code]", "Copy the last reply (or its last code block) to the clipboard",
            handlers.copy,
            palette=(PaletteEntry("", "Copy the last reply to the clipboard"),
                     PaletteEntry("code", "Copy the last code block to the clipboard"))),
    Command("search", "<text>", "Find sessions that mention the text", handlers.search,
            palette=()),
    Command("clear", "", "Clear this session's messages", handlers.clear),
    Command("export", "[md|json] [path]", "Write this session to a file (asks before replacing one)",
            handlers.export_session,
            palette=(PaletteEntry("md", "Write this session as Markdown (in the current folder)"),
                     PaletteEntry("json", "Write this session as JSON (in the current folder)"))),
    Command("swarm", "N", "Start N simulated tenants (0 stops them)", handlers.swarm,
            palette=(PaletteEntry(str(DEMO_TENANTS),
                                  "Start simulated tenants: watch sharing, eviction and preemption"),
                     PaletteEntry("0", "Stop every simulated tenant"))),
    Command("demo", "", "Guided tour of paging: Space / → next step, Esc leaves", handlers.demo),
    Command("restart", "", "Start the engine again after it stopped (its cache starts empty)",
            handlers.restart, palette=()),
    Command("help", "", "Show keys and commands", handlers.show_help),
)


def find(name: str) -> Command | None:
    """The command called `name` (no slash), or None."""
    return next((command for command in COMMANDS if command.name == name), None)


def parse(text: str) -> tuple[Command, str]:
    """Split `/name argument...`; raises UserError for an unknown command."""
    name, _, argument = text.strip()[1:].partition(" ")
    command = find(name)
    if command is None:
        raise UserError(f"unknown command /{name}: try /help")
    return command, argument.strip()


def matching(text: str) -> list[Command]:
    """Commands whose name starts with what is typed, while the name is being typed."""
    if not text.startswith("/") or " " in text or "\n" in text:
        return []
    return [command for command in COMMANDS if command.name.startswith(text[1:])]


def suggest(text: str, prompt_names: Sequence[str]) -> str:
    """What completes `text`: the rest of a command name, or of a prompt name after
    /new or /system; "" when there is nothing unambiguous to add."""
    matches = matching(text)
    if matches:
        return f"{matches[0].name[len(text) - 1:]} " if len(matches) == 1 else ""
    name, space, word = text[1:].partition(" ")
    command = find(name)
    if not text.startswith("/") or not space or command is None or not command.completes_prompt:
        return ""
    names = [p for p in prompt_names if p.startswith(word)]
    return names[0][len(word):] if len(names) == 1 else ""


def palette(prompt_names: Sequence[str]) -> list[tuple[str, str]]:
    """The command palette's entries, (what it runs, help), in the table's order."""
    entries = []
    for command in COMMANDS:
        for entry in command.palette:
            if entry.argument == EACH_PROMPT:
                entries += [(f"/{command.name} {name}", entry.help.format(prompt=name))
                            for name in prompt_names]
            else:
                entries.append((f"/{command.name} {entry.argument}".strip(), entry.help or command.help))
    return entries
