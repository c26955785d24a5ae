"""The app's life: the UI before the model, sessions restored, a model that fails to load, the engine's
process dying and restarting, quitting mid-reply, replies checkpointed while they stream."""
from __future__ import annotations

import os
import signal

from chatpager import SamplingParams
from chatpager.tui.screens.rename import RenameScreen
from chatpager.tui.store import Store
from chatpager.tui.widgets.chat_message import ChatMessage
from chatpager.tui.widgets.chat_view import ChatView
from chatpager.tui.widgets.session_list import SessionList
from tests.tui.support import (chat_texts, decoding, ENDLESS, GatedApp, hold, loaded, make_app, running, say, step_until,
                                until)


async def test_ui_shows_before_the_model_and_queues_what_is_typed(model, tmp_path):
    app = make_app(model, tmp_path, app_class=GatedApp)
    async with running(app) as pilot:
        assert app.engine.snapshot is None and app.model_status == "loading…"
        assert len(app.main.query_one(SessionList).options) == 1
        await say(pilot, "hello while loading")
        await pilot.pause(0.2)
        assert app.current.state == "queued"
        app.release.set()
        await until(pilot, lambda: not app.current.busy)
        assert [m.role for m in app.current.messages] == ["user", "assistant"]
        assert "llama" in app.model_status and "cpu" in app.model_status


async def test_sessions_are_restored_after_a_restart(model, tmp_path):
    app = make_app(model, tmp_path)
    async with running(app) as pilot:
        await say(pilot, "remember me")
        await until(pilot, lambda: not app.current.busy)
        await say(pilot, "/new terse")
        await pilot.press("f2")
        await until(pilot, lambda: isinstance(app.screen, RenameScreen))
        await pilot.press(*"Second", "enter")
        before = [(s.title, s.prompt_name, len(s.messages)) for s in app.sessions.values()]
    assert before == [("Chat 1", "assistant", 2), ("Second", "terse", 0)]

    again = make_app(model, tmp_path)
    async with running(again) as pilot:
        after = [(s.title, s.prompt_name, len(s.messages)) for s in again.sessions.values()]
        assert after == before
        await pilot.press("ctrl+up")
        assert again.current.title == "Chat 1"
        assert chat_texts(again)[0] == ("you", "remember me")


async def test_a_model_that_fails_to_load_is_reported(tmp_path):
    app = make_app(str(tmp_path / "no-such-model"), tmp_path)
    async with running(app) as pilot:
        await until(pilot, lambda: app.model_status == "failed to load")
        await say(pilot, "anyone there?")
        await until(pilot, lambda: app.current.error is not None)
        assert "failed to load" in app.current.error
        assert any("no-such-model" in notice for notice in app.notices)


async def test_when_the_engine_process_dies_the_reply_ends_with_an_error_and_restart_brings_it_back(model, tmp_path):
    reply = SamplingParams(temperature=0.8, max_tokens=48, ignore_eos=True)
    app = make_app(model, tmp_path, engine_process=True, params=reply)  # the app's default: its own process
    async with running(app) as pilot:
        await loaded(pilot)
        await hold(pilot)
        await say(pilot, "tell me everything")
        await step_until(pilot, lambda: decoding(app, app.current))  # and held there: it cannot end before the kill
        os.kill(app.engine._host._process.pid, signal.SIGKILL)
        await until(pilot, lambda: app.current.error is not None and not app.current.busy)
        assert "engine process exited" in app.current.error
        assert app.model_status == "engine stopped: /restart starts it again"
        await say(pilot, "still there?")  # answered at once, not queued forever
        await until(pilot, lambda: not app.current.busy and "exited" in (app.current.error or ""))
        await say(pilot, "/restart")
        await until(pilot, lambda: app.engine.ready and app.model_status.startswith(app.engine.model_info["name"]))
        await say(pilot, "and now?")
        await until(pilot, lambda: not app.current.busy and app.current.messages[-1].role == "assistant")
        assert app.current.messages[-1].content and app.current.error is None
        await say(pilot, "/restart")  # a running engine is left alone
        await until(pilot, lambda: any("nothing to restart" in n for n in app.notices))


async def test_quitting_keeps_the_reply_generated_so_far(model, tmp_path):
    app = make_app(model, tmp_path, params=ENDLESS)
    async with running(app) as pilot:
        await hold(pilot)
        await say(pilot, "a long answer, please")
        await step_until(pilot, lambda: len(app.current.reply) > 3)
        assert app.current.busy  # held: quitting comes mid-reply
        partial = app.current.reply
    stored = Store(tmp_path / "chatpager.sqlite3").load()[0]
    assert stored.messages[-1].role == "assistant"
    assert stored.messages[-1].content.startswith(partial)


async def test_a_reply_is_checkpointed_while_it_streams(model, tmp_path):
    import sqlite3

    database = tmp_path / "chatpager.sqlite3"
    (tmp_path / "killed").mkdir()
    app = make_app(model, tmp_path, params=ENDLESS)
    async with running(app) as pilot:
        await hold(pilot)
        await say(pilot, "a long answer, please")
        # a step at a time until the checkpoint (once a second) lands: the reply cannot end first
        await step_until(pilot, lambda: sqlite3.connect(database).execute(
            "SELECT count(*) FROM messages WHERE status = 'streaming'").fetchone()[0] == 1)
        # the file as kill -9 would leave it now, taken as SQLite's backup (a consistent copy)
        with sqlite3.connect(tmp_path / "killed" / "chatpager.sqlite3") as killed:
            sqlite3.connect(database).backup(killed)
        streamed = app.current.reply
    restarted = make_app(model, tmp_path / "killed")
    async with running(restarted) as pilot:
        reply = restarted.current.messages[-1]
        assert reply.role == "assistant" and reply.interrupted
        assert reply.content and streamed.startswith(reply.content)
        shown = restarted.main.query_one(ChatView).query(ChatMessage).last()
        assert "interrupted" in str(shown.border_subtitle)
