"""Sessions in the app: create, switch, rename, delete, search, export, fork an idle session."""
from __future__ import annotations

import json


from chatpager.tui.screens.confirm import ConfirmScreen
from chatpager.tui.screens.prompt_picker import PromptPicker
from chatpager.tui.screens.search import SearchResults
from chatpager.tui.widgets.session_list import SessionList
from tests.tui.support import make_app, running, say, stored_sessions, until


async def test_create_switch_and_delete_sessions(model, tmp_path):
    app = make_app(model, tmp_path)
    async with running(app) as pilot:
        await pilot.press("ctrl+n")
        await until(pilot, lambda: isinstance(app.screen, PromptPicker))
        names = list(app.prompts)
        await pilot.press(*["down"] * names.index("pirate"), "enter")
        await until(pilot, lambda: app.current.prompt_name == "pirate")
        assert app.current.system.startswith("You are Captain Byte")
        sidebar = app.main.query_one(SessionList)
        assert len(sidebar.options) == 2 and sidebar.highlighted == 1
        await pilot.press("ctrl+up")
        assert app.current.title == "Chat 1"
        await pilot.press("ctrl+down")
        await pilot.press("f8")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await until(pilot, lambda: len(app.sessions) == 1)
        assert app.current.title == "Chat 1" and len(sidebar.options) == 1


async def test_rename_delete_and_info_commands(model, tmp_path):
    app = make_app(model, tmp_path)
    async with running(app) as pilot:
        await say(pilot, "what is a block table?")
        await until(pilot, lambda: not app.current.busy)
        await say(pilot, "/rename Block tables")
        assert app.current.title == "Block tables"
        assert "Block tables" in str(app.main.query_one("#chat-header").render())
        await say(pilot, "/info")
        info = app.notices[-1]
        assert "2 messages" in info and f"Last turn: {app.current.tokens} tokens" in info
        assert "prefix-cache hits" in info and "Holds no blocks now" in info
        await say(pilot, "/new terse")
        await say(pilot, "/delete")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await until(pilot, lambda: len(app.sessions) == 1)
        assert app.current.title == "Block tables"


async def test_search_finds_sessions_and_switches_to_one(model, tmp_path):
    from chatpager.tui.session import Message, Session

    stored_sessions(
        tmp_path,
        Session("s1", "Release planning", "terse", "Be brief.", [Message("user", "What goes in 0.2?")]),
        Session("s2", "Paging", "terse", "Be brief.",
                [Message("user", "How do block tables work?"), Message("assistant", "They map...")]),
        Session("s3", "Cooking", "terse", "Be brief.", [Message("user", "Soup recipes with tables")]),
    )
    app = make_app(model, tmp_path)
    async with running(app) as pilot:
        assert app.current.title == "Cooking"
        await say(pilot, "/search TABLE")
        await until(pilot, lambda: isinstance(app.screen, SearchResults))
        options = app.screen.query_one("OptionList")
        assert [options.get_option_at_index(i).id for i in range(options.option_count)] == ["s2", "s3"]
        await pilot.press("enter")
        await until(pilot, lambda: app.current.title == "Paging")
        await say(pilot, "/search nowhere-to-be-found")
        assert any("no session mentions" in notice for notice in app.notices)


async def test_export_writes_markdown_and_json(model, tmp_path):
    app = make_app(model, tmp_path)
    async with running(app) as pilot:
        await say(pilot, "export this")
        await until(pilot, lambda: not app.current.busy)
        await say(pilot, f"/export md {tmp_path / 'chat.md'}")
        await say(pilot, f"/export json {tmp_path / 'out' / 'chat.json'}")
    markdown = (tmp_path / "chat.md").read_text()
    assert markdown.startswith("# Chat 1") and "export this" in markdown
    record = json.loads((tmp_path / "out" / "chat.json").read_text())
    assert record["prompt_name"] == "assistant"
    assert [m["role"] for m in record["messages"]] == ["user", "assistant"]
    assert any("chat.json" in notice for notice in app.notices)


async def test_export_never_overwrites_silently(model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "chat.md"
    target.write_text("my notes")
    app = make_app(model, tmp_path)
    async with running(app) as pilot:
        await say(pilot, "/export")  # no path: a new file beside the others
        await say(pilot, "/export")
        assert sorted(p.name for p in tmp_path.glob("chat-1*.md")) == ["chat-1-2.md", "chat-1.md"]
        await say(pilot, f"/export md {target}")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("n")
        await until(pilot, lambda: not isinstance(app.screen, ConfirmScreen))
        assert target.read_text() == "my notes"
        await say(pilot, f"/export md {target}")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await until(pilot, lambda: target.read_text().startswith("# Chat 1"))


async def test_fork_of_an_idle_session_reuses_its_prefix(model, tmp_path):
    app = make_app(model, tmp_path)
    async with running(app) as pilot:
        await say(pilot, "a question")
        await until(pilot, lambda: not app.current.busy)
        await say(pilot, "/fork")
        fork = app.current
        assert [m.role for m in fork.messages] == ["user", "assistant"]
        await say(pilot, "a follow-up")
        await until(pilot, lambda: not fork.busy)
        source = next(iter(app.sessions.values()))
        # every full block of the source's turn (prompt and reply) was a prefix hit
        assert fork.cached_tokens >= (source.tokens // 16 - 1) * 16
