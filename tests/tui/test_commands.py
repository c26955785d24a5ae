"""The command table is the one source of the slash commands: run_slash reaches each command's
handler through it, and the palette, the hints and the help screen list what it says."""
from __future__ import annotations

import dataclasses
import inspect

from chatpager.tui import commands
from chatpager.tui.commands import COMMANDS, EACH_PROMPT
from chatpager.tui.screens.help import HelpScreen
from chatpager.tui.widgets.slash_hints import SlashHints
from tests.tui.support import make_app, plain, running, say, until


def test_every_command_names_a_handler_of_its_own():
    names = [command.name for command in COMMANDS]
    assert len(set(names)) == len(names) == 19
    handlers = [command.handler for command in COMMANDS]
    assert len(set(handlers)) == len(handlers)
    for handler in handlers:
        assert inspect.iscoroutinefunction(handler), handler
        assert list(inspect.signature(handler).parameters) in (["app", "argument"], ["app", "_"]), handler


async def test_run_slash_calls_the_handler_the_table_names(model, tmp_path, monkeypatch):
    calls = []

    def recorder(name):
        async def handler(app, argument):
            calls.append((name, app, argument))
        return handler

    table = tuple(dataclasses.replace(command, handler=recorder(command.name)) for command in COMMANDS)
    monkeypatch.setattr(commands, "COMMANDS", table)
    app = make_app(model, tmp_path)
    async with running(app) as pilot:
        for command in table:
            calls.clear()
            await say(pilot, f"/{command.name}  an argument ")
            assert calls == [(command.name, app, "an argument")]
        calls.clear()
        await say(pilot, "/nope at all")
        assert calls == [] and app.notices[-1] == "unknown command /nope: try /help"


async def test_the_real_handlers_act(model, tmp_path):
    app = make_app(model, tmp_path)
    async with running(app) as pilot:
        await say(pilot, "/new tutor")
        assert app.current.prompt_name == "tutor" and len(app.sessions) == 2
        await say(pilot, "/info")
        assert app.notices[-1].startswith("System prompt: tutor · 0 messages")
        await say(pilot, "/regen 9")
        assert app.notices[-1] == "/regen takes 1 to 8 alternatives"
        await say(pilot, "/swarm many")
        assert app.notices[-1] == "expected a number, got 'many'"
        await say(pilot, "/help")
        assert isinstance(app.screen, HelpScreen)


async def test_palette_help_screen_and_hints_come_from_the_table(model, tmp_path):
    app = make_app(model, tmp_path)
    async with running(app) as pilot:
        offered = [c for c in app.get_system_commands(app.screen) if c.title.startswith("/")]
        expected = []
        for command in COMMANDS:
            for entry in command.palette:
                if entry.argument == EACH_PROMPT:
                    expected += [(f"/{command.name} {name}", entry.help.format(prompt=name)) for name in app.prompts]
                else:
                    expected.append((f"/{command.name} {entry.argument}".strip(), entry.help or command.help))
        assert sorted((c.title, c.help) for c in offered) == sorted(expected)
        assert len(offered) == 17 + 2 * len(app.prompts)  # as many as before the table
        assert ("/fork", "Fork this session at its last message") in expected
        assert ("/regen 3", "Regenerate the last reply as alternatives to pick from") in expected
        assert ("/system pirate", "Use the pirate prompt in this session") in expected
        assert not any(title.startswith(("/beam", "/lora", "/search", "/restart")) for title, _ in expected)

        await next(c for c in offered if c.title == "/new tutor").callback()
        assert app.current.prompt_name == "tutor"

        await pilot.press("/", "s")
        hints = plain(app.main.query_one(SlashHints).content)
        assert [line.split()[0] for line in hints.splitlines() if line] == [
            c.signature.split()[0] for c in COMMANDS if c.name.startswith("s")]
        await pilot.press("backspace", "backspace", "f1")
        await until(pilot, lambda: isinstance(app.screen, HelpScreen))
        shown = " ".join(" ".join(plain(static.content).split()) for static in app.screen.query("Static"))
        at = [shown.index(f"{command.signature} {command.help}") for command in COMMANDS]
        assert at == sorted(at)  # every command, in the table's order

