"""What each slash command does: `async def handler(app, argument)`, named by the command table.

A handler acts on the app through its public parts (sessions, turns, engine, swarm, its actions)
and raises UserError (or ValueError, OSError) for what cannot be done; `ChatpagerApp.run_slash`
turns that into a warning and redraws the current session after every command.
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from chatpager.errors import ChatpagerError
from chatpager.tui.export import export, FORMATS
from chatpager.tui.screens.confirm import ConfirmScreen
from chatpager.tui.screens.search import SearchResults
from chatpager.tui.session_info import describe, settings_text, to_copy
from chatpager.tui.sessions import SETTINGS, UserError

if TYPE_CHECKING:  # for annotations only: the app imports the command table, not the other way
    from chatpager.tui.app import ChatpagerApp

Handler = Callable[["ChatpagerApp", str], Awaitable[None]]
REGENERATE_ALTERNATIVES = 3  # what the regenerate key asks for; /regen n for any n
MAX_ALTERNATIVES = 8
DEMO_TENANTS = 8  # what /swarm starts without a count


async def new(app: ChatpagerApp, argument: str) -> None:
    if not argument:
        app.action_new_session()
        return
    if argument not in app.prompts:
        raise UserError(f"no prompt named {argument!r}; prompts: {', '.join(app.prompts)}")
    await app.switch_to(app.sessions.create(argument).id)


async def fork(app: ChatpagerApp, _: str) -> None:
    await app.action_fork()


async def system(app: ChatpagerApp, argument: str) -> None:
    if not argument:
        raise UserError(f"usage: /system <name|text>; prompts: {', '.join(app.prompts)}")
    app.sessions.set_system(app.current, argument)
    app.notify(f"System prompt: {app.current.prompt_name} (used from the next turn)")


async def regen(app: ChatpagerApp, argument: str) -> None:
    n = _count(argument, default=1)
    if not 1 <= n <= MAX_ALTERNATIVES:
        raise UserError(f"/regen takes 1 to {MAX_ALTERNATIVES} alternatives")
    app.turns.regenerate(app.current, n)


async def beam(app: ChatpagerApp, argument: str) -> None:
    k = _count(argument, default=REGENERATE_ALTERNATIVES)
    if not 2 <= k <= MAX_ALTERNATIVES:
        raise UserError(f"/beam takes 2 to {MAX_ALTERNATIVES} beams")
    app.turns.beam(app.current, k)


async def stop(app: ChatpagerApp, _: str) -> None:
    app.action_stop()


async def set_sampling(app: ChatpagerApp, argument: str) -> None:
    session = app.current
    name, _, value = argument.partition(" ")
    if not value.strip():
        current = settings_text(session) or "none (the command line's)"
        raise UserError(f"usage: /set NAME VALUE, or /set NAME default; names: "
                        f"{', '.join(SETTINGS)}. {session.title}'s settings: {current}")
    app.sessions.set_setting(session, name, value.strip(), app.turns.params)
    app.notify(f"{session.title}: {settings_text(session) or 'default settings'} from the next turn")


async def lora(app: ChatpagerApp, argument: str) -> None:
    session, info = app.current, app.engine.model_info
    if info is None:
        raise UserError("the model is still loading")
    loaded = info.get("lora_adapters", [])
    current = session.settings.get("lora", "none (the base model)")
    if not argument:
        listed = ", ".join(loaded) or "none (start chatpager with --lora NAME=PATH)"
        app.notify(f"LoRA adapters: {listed}. {session.title} uses: {current}")
        return
    if argument != "none" and argument not in loaded:
        raise UserError(f"no LoRA adapter {argument!r}; loaded: {', '.join(loaded) or 'none'}")
    app.sessions.set_lora(session, None if argument == "none" else argument)
    app.notify(f"{session.title}: LoRA adapter {argument} from the next turn")


async def rename(app: ChatpagerApp, argument: str) -> None:
    if argument:
        app.sessions.rename(app.current, argument)
    else:
        app.action_rename()


async def delete(app: ChatpagerApp, _: str) -> None:
    app.action_delete()


async def info(app: ChatpagerApp, _: str) -> None:
    app.notify(describe(app.current, app.engine.snapshot), title=app.current.title, timeout=20)


async def copy(app: ChatpagerApp, argument: str) -> None:
    what, text = to_copy(app.current, argument)
    app.copy_to_clipboard(text)
    app.notify(f"Copied {what} ({len(text)} characters) to the clipboard")


async def search(app: ChatpagerApp, argument: str) -> None:
    if not argument:
        raise UserError("usage: /search TEXT")
    found = app.sessions.search(argument)
    if not found:
        raise UserError(f"no session mentions {argument!r}")

    async def chosen(session_id: str | None) -> None:
        if session_id in app.sessions:
            await app.switch_to(session_id)

    app.push_screen(SearchResults(argument, found), chosen)


async def clear(app: ChatpagerApp, _: str) -> None:
    app.sessions.clear(app.current)


async def export_session(app: ChatpagerApp, argument: str) -> None:
    words = argument.split(maxsplit=1)
    fmt = words.pop(0) if words and words[0] in FORMATS else "md"
    session, path = app.current, Path(words[0]) if words else None
    try:
        app.notify(f"Exported to {export(session, fmt, path)}")
    except FileExistsError:
        def answered(replace: bool | None) -> None:
            if replace:
                app.notify(f"Exported to {export(session, fmt, path, overwrite=True)}")

        app.push_screen(ConfirmScreen(f"{path} exists. Replace it?"), answered)


async def swarm(app: ChatpagerApp, argument: str) -> None:
    count = _count(argument, default=DEMO_TENANTS)
    if count <= 0:
        app.swarm.stop_all()
        app.notify("Swarm stopped")
        return
    app.swarm.spawn(count)
    app.notify(f"{count} tenants started: watch the block map")


async def demo(app: ChatpagerApp, _: str) -> None:
    app.start_tour()


async def restart(app: ChatpagerApp, _: str) -> None:
    try:
        app.engine.restart()
    except ChatpagerError as error:
        raise UserError(str(error)) from None
    app.set_model_status("loading…")
    app.notify("Engine restarting: the model loads again, with an empty cache")


async def show_help(app: ChatpagerApp, _: str) -> None:
    app.action_help()


def _count(argument: str, default: int) -> int:
    if not argument:
        return default
    if not argument.isdigit():
        raise UserError(f"expected a number, got {argument!r}")
    return int(argument)
