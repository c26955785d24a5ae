"""Keys and commands: slash completion, the help screen, every binding with an id."""
from __future__ import annotations

from chatpager.tui.app import ChatpagerApp
from chatpager.tui.screens.confirm import ConfirmScreen
from chatpager.tui.screens.help import HelpScreen
from chatpager.tui.screens.pick_reply import PickReplyScreen
from chatpager.tui.screens.prompt_picker import PromptPicker
from chatpager.tui.screens.rename import RenameScreen
from chatpager.tui.screens.search import SearchResults
from chatpager.tui.widgets.prompt_input import PromptInput
from chatpager.tui.widgets.slash_hints import SlashHints
from tests.tui.support import make_app, plain, running, say


async def test_slash_commands_complete_and_help_lists_keys(model, tmp_path):
    app = make_app(model, tmp_path)
    async with running(app) as pilot:
        await pilot.press("/", "r", "e", "g")
        prompt = app.main.query_one(PromptInput)
        assert prompt.suggestion == "en "
        assert app.main.query_one(SlashHints).display
        await pilot.press("tab")
        assert prompt.text == "/regen "
        prompt.clear()
        await pilot.press(*"/system", "space", *"pir")
        assert prompt.suggestion == "ate"
        await pilot.press("tab", "enter")
        await pilot.pause()
        assert app.current.prompt_name == "pirate"
        await say(pilot, "/bogus")
        assert any("unknown command /bogus" in notice for notice in app.notices)
        await pilot.press("f1")
        assert isinstance(app.screen, HelpScreen)
        text = " ".join(plain(static.content) for static in app.screen.query("Static"))
        assert "^f" in text and "Fork" in text and "/swarm N" in text
        await pilot.press("escape")
        assert not isinstance(app.screen, HelpScreen)
        titles = [c.title for c in app.get_system_commands(app.screen)]
        assert "/fork" in titles and "/new tutor" in titles


def test_every_binding_has_an_id():
    for owner in (ChatpagerApp, PromptInput, HelpScreen, PromptPicker, PickReplyScreen,
                  RenameScreen, ConfirmScreen, SearchResults):
        assert all(binding.id for binding in owner.BINDINGS), owner
