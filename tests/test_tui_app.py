"""The chatpager app, driven with Pilot on the real engine and a tiny random-weight model."""
from __future__ import annotations

import io
import json
import os
import signal
import threading
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from rich.console import Console

from chatpager import SamplingParams
from chatpager.tui.app import ChatpagerApp
from chatpager.engine_args import EngineArgs
from chatpager.tui.config import AppConfig
from chatpager.tui.screens.confirm import ConfirmScreen
from chatpager.tui.screens.help import HelpScreen
from chatpager.tui.screens.pick_reply import PickReplyScreen
from chatpager.tui.screens.prompt_picker import PromptPicker
from chatpager.tui.screens.rename import RenameScreen
from chatpager.tui.screens.search import SearchResults
from chatpager.tui.store import Store
from chatpager.tui.widgets.block_map import BlockMap
from chatpager.tui.widgets.chat_message import ChatMessage
from chatpager.tui.widgets.chat_view import ChatView
from chatpager.tui.widgets.prompt_input import PromptInput
from chatpager.tui.widgets.session_list import SessionList
from chatpager.tui.widgets.slash_hints import SlashHints
from tui_support import until

SIZE = (160, 45)
SHORT = SamplingParams(temperature=0.8, max_tokens=6)
ENDLESS = SamplingParams(temperature=0.8, max_tokens=4000, ignore_eos=True)


@pytest.fixture(scope="module")
def model(tiny_model_factory) -> str:
    """Byte-level tokens: the shipped prompts need a context longer than the default 1024."""
    return tiny_model_factory("llama", max_position_embeddings=8192)


def make_app(model: str, data_dir: Path, app_class=ChatpagerApp, num_blocks: int = 1024,
             max_model_len: int | None = None, engine_options: dict | None = None, **settings) -> ChatpagerApp:
    settings = {"params": SHORT, "refresh_interval": 0.05, "engine_process": False} | settings
    engine = EngineArgs(model=model, num_blocks=num_blocks, max_model_len=max_model_len, **(engine_options or {}))
    app = app_class(AppConfig(engine=engine, data_dir=data_dir, **settings))
    app.notices = []  # every notification's text, for assertions
    notify = app.notify

    def recording_notify(message, **kwargs):
        app.notices.append(str(message))
        return notify(message, **kwargs)

    app.notify = recording_notify
    return app


@asynccontextmanager
async def running(app: ChatpagerApp):
    """Run the app headless; yields its pilot once the sessions are on screen."""
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.main.query_one(SessionList).options)
        yield pilot



async def loaded(pilot) -> None:
    await until(pilot, lambda: pilot.app.engine.snapshot is not None)


async def say(pilot, text: str) -> None:
    """Type a message (or slash command) into the input and press Enter."""
    pilot.app.main.query_one(PromptInput).text = text
    await pilot.press("enter")
    await pilot.pause()


def plain(renderable) -> str:
    console = Console(width=120, record=True, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def stats(app: ChatpagerApp) -> dict:
    return app.engine.snapshot.stats


def chat_texts(app: ChatpagerApp) -> list[tuple[str, str]]:
    return [(str(m.border_title), m.source) for m in app.main.query_one(ChatView).query(ChatMessage)]


class GatedApp(ChatpagerApp):
    """Loads its model only when `release` is set, as the default model's first start
    (it converts once) keeps the user waiting."""

    def __init__(self, config: AppConfig) -> None:
        super().__init__(config)
        self.release = threading.Event()

    def _load_llm(self, progress):
        self.release.wait(30)
        return super()._load_llm(progress)


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


async def test_a_reply_streams_into_the_chat_and_is_stored(model, tmp_path):
    app = make_app(model, tmp_path, params=ENDLESS)
    async with running(app) as pilot:
        await loaded(pilot)
        await say(pilot, "stream please")
        view = app.main.query_one(ChatView)
        await until(pilot, lambda: len(view.reply_text) > 3)
        seen = view.reply_text
        await until(pilot, lambda: len(view.reply_text) > len(seen) + 3)
        assert view.reply_text.startswith(seen)  # appended, not replaced
        assert app.current.state == "generating" and stats(app)["used_blocks"] > 0
        await pilot.press("escape")  # stop: keeps what was generated, frees the blocks
        await until(pilot, lambda: not app.current.busy)
        reply = app.current.messages[-1]
        assert reply.role == "assistant" and reply.content.startswith(seen)
        assert chat_texts(app)[-1][0] == "assistant"
        await until(pilot, lambda: stats(app)["used_blocks"] == 0)
        assert stats(app)["cached_blocks"] > 0  # the history stays hittable
    stored = Store(tmp_path / "chatpager.sqlite3").load()
    assert [m.content for m in stored[0].messages] == ["stream please", reply.content]


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


async def test_quitting_keeps_the_reply_generated_so_far(model, tmp_path):
    app = make_app(model, tmp_path, params=ENDLESS)
    async with running(app) as pilot:
        await say(pilot, "a long answer, please")
        await until(pilot, lambda: len(app.current.reply) > 3)
        partial = app.current.reply
    stored = Store(tmp_path / "chatpager.sqlite3").load()[0]
    assert stored.messages[-1].role == "assistant"
    assert stored.messages[-1].content.startswith(partial)


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


async def test_two_sessions_generate_at_the_same_time(model, tmp_path):
    # longer than ENDLESS: the tiny model decodes its 4000 tokens (~1,500 tok/s with the C attention)
    # before a busy screen lets the two starts be seen together
    app = make_app(model, tmp_path, params=SamplingParams(temperature=0.8, max_tokens=12000, ignore_eos=True))
    async with running(app) as pilot:
        await loaded(pilot)
        await say(pilot, "first")
        await say(pilot, "/new tutor")
        await say(pilot, "second")
        first, second = app.sessions.values()
        await until(pilot, lambda: first.state == second.state == "generating")
        assert stats(app)["running"] == 2
        # both prompts start with the house style: the second one's prefill hit the cache
        assert second.cached_tokens > 1000
        assert "generating" in str(app.main.query_one(SessionList).options[0].prompt)
        for session in (first, second):
            app.turns.stop(session)
        await until(pilot, lambda: not first.busy and not second.busy)


async def test_a_full_pool_preempts_and_the_session_shows_it(model, tmp_path):
    # 48 blocks of 16: 768 tokens in all. The preempted session waits while the other grows to the
    # pool's size: with 12 blocks that took ~0.1 s at the tiny model's ~1,500 tok/s (C attention),
    # shorter than the sidebar's refresh often enough to fail 1 run in 2
    app = make_app(model, tmp_path, app_class=GatedApp, num_blocks=48, params=ENDLESS)
    async with running(app) as pilot:
        await say(pilot, "/system terse")
        await say(pilot, "one")
        await say(pilot, "/new terse")
        await say(pilot, "two")
        app.release.set()  # both start together, and outgrow the pool together
        sidebar = app.main.query_one(SessionList)
        await until(pilot, lambda: "preempted" in str(sidebar.options[0].prompt)
                    + str(sidebar.options[1].prompt), timeout=120)
        assert stats(app)["preemptions"] > 0
        # each reply ends at the pool's size ("length"); neither request failed
        await until(pilot, lambda: not any(s.busy for s in app.sessions.values()))
        assert all(s.error is None and s.messages[-1].role == "assistant"
                   for s in app.sessions.values())


async def test_fork_while_streaming_shares_blocks(model, tmp_path):
    app = make_app(model, tmp_path, params=ENDLESS)
    async with running(app) as pilot:
        await loaded(pilot)
        await say(pilot, "branch me")
        await until(pilot, lambda: app.current.state == "generating")
        assert stats(app)["shared_blocks"] == 0
        source = app.current
        await pilot.press("ctrl+f")
        fork = app.current
        assert fork is not source and fork.title == "Chat 1 (fork)"
        assert [m.content for m in fork.messages] == ["branch me"]
        await until(pilot, lambda: stats(app)["shared_blocks"] > 0)
        assert stats(app)["sharing_ratio"] > 1
        branched_at = fork.reply
        await until(pilot, lambda: len(fork.reply) > len(branched_at))  # it continues on its own
        await pilot.press("escape")
        await pilot.press("ctrl+up")
        await pilot.press("escape")
        await until(pilot, lambda: not source.busy and not fork.busy)
        await until(pilot, lambda: stats(app)["used_blocks"] == 0)


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


async def test_regenerate_offers_alternatives_to_pick_from(model, tmp_path):
    # no EOS: an empty sample is not offered, and the random model may end one at once
    app = make_app(model, tmp_path, params=SamplingParams(temperature=0.8, max_tokens=6, ignore_eos=True))
    async with running(app) as pilot:
        await say(pilot, "say something")
        await until(pilot, lambda: not app.current.busy)
        cow_before = stats(app)["cow_copies"]
        await say(pilot, "/regen 3")
        await until(pilot, lambda: isinstance(app.screen, PickReplyScreen))
        alternatives = app.screen.alternatives
        assert len(alternatives) == 3
        # the three samples were forked from one prefill: their shared last block was copied
        assert stats(app)["cow_copies"] > cow_before
        await pilot.press("down", "enter")
        await until(pilot, lambda: not isinstance(app.screen, PickReplyScreen))
        # the picked alternative replaced the old reply
        assert [m.content for m in app.current.messages] == ["say something", alternatives[1]]
        await pilot.press("ctrl+r")  # three more; Escape keeps the current reply
        await until(pilot, lambda: isinstance(app.screen, PickReplyScreen))
        assert len(app.screen.alternatives) == 3
        await pilot.press("escape")
        await until(pilot, lambda: not isinstance(app.screen, PickReplyScreen))
        assert [m.content for m in app.current.messages] == ["say something", alternatives[1]]
    stored = Store(tmp_path / "chatpager.sqlite3").load()[0]
    assert [m.content for m in stored.messages] == ["say something", alternatives[1]]


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


async def test_a_request_larger_than_the_pool_is_an_error_in_its_session(model, tmp_path):
    app = make_app(model, tmp_path, num_blocks=16)  # 256 tokens: the shipped prompts don't fit
    async with running(app) as pilot:
        await say(pilot, "too big")
        await until(pilot, lambda: app.current.error is not None)
        assert "blocks" in app.current.error and not app.current.busy
        assert any("whole KV pool" in notice for notice in app.notices)
        assert "!" in str(app.main.query_one(SessionList).options[0].prompt)
        await say(pilot, "/new terse")  # the app and other sessions carry on
        await say(pilot, "hi")
        await until(pilot, lambda: not app.current.busy)
        assert app.current.error is None and app.current.messages[-1].role == "assistant"


async def test_a_model_that_fails_to_load_is_reported(tmp_path):
    app = make_app(str(tmp_path / "no-such-model"), tmp_path)
    async with running(app) as pilot:
        await until(pilot, lambda: app.model_status == "failed to load")
        await say(pilot, "anyone there?")
        await until(pilot, lambda: app.current.error is not None)
        assert "failed to load" in app.current.error
        assert any("no-such-model" in notice for notice in app.notices)


async def test_when_the_engine_process_dies_the_reply_ends_with_an_error_and_restart_brings_it_back(model, tmp_path):
    app = make_app(model, tmp_path, engine_process=True, params=ENDLESS)  # the app's default: its own process
    async with running(app) as pilot:
        await loaded(pilot)
        await say(pilot, "tell me everything")
        await until(pilot, lambda: app.current.reply)
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


async def test_swarm_tenants_share_prefixes_and_can_be_stopped(model, tmp_path):
    tenant_params = SamplingParams(temperature=0.8, max_tokens=40, ignore_eos=True)
    app = make_app(model, tmp_path, app_class=GatedApp, swarm=2, swarm_params=tenant_params)
    async with running(app) as pilot:  # started as with --swarm 2
        await say(pilot, "/swarm 1")
        tenants = [s for s in app.sessions.values() if app.swarm.is_tenant(s)]
        assert [t.title for t in tenants] == ["tenant 1", "tenant 2", "tenant 3"]
        assert len(app.main.query_one(SessionList).options) == 4
        assert {t.state for t in tenants} == {"queued"}
        app.release.set()
        await until(pilot, lambda: app.engine.snapshot and stats(app)["running"] >= 2)
        # tenants 1-3 use prompts that start with the same house style
        await until(pilot, lambda: stats(app)["prefix_hit_tokens"] > 1000)
        await say(pilot, "/swarm 0")
        await until(pilot, lambda: not any(t.busy for t in tenants))
        assert app.swarm.active == 0
        assert not any(t.stored for t in tenants)  # simulated load is not the user's data


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


async def test_a_pool_larger_than_the_map_is_drawn_in_groups(model, tmp_path):
    app = make_app(model, tmp_path, num_blocks=6000)
    async with running(app) as pilot:
        await loaded(pilot)
        await pilot.pause(0.2)
        block_map = app.main.query_one(BlockMap)
        per_cell = block_map.blocks_per_cell()
        assert per_cell > 1
        cells = len(block_map.cells())
        assert cells == -(-6000 // per_cell) <= block_map.size.width * block_map.size.height


def test_every_binding_has_an_id():
    for owner in (ChatpagerApp, PromptInput, HelpScreen, PromptPicker, PickReplyScreen,
                  RenameScreen, ConfirmScreen, SearchResults):
        assert all(binding.id for binding in owner.BINDINGS), owner


STRICT_TEMPLATE = (  # as Llama 2 / Mistral templates do: roles must alternate
    "{% for message in messages %}"
    "{% if message['role'] != 'system' and (message['role'] == 'user') != (loop.index0 % 2 == 1) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant') }}"
    "{% endif %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


async def test_a_user_turn_left_without_a_reply_does_not_break_the_next(tmp_path):
    import shutil

    from chatpager.engine.tiny_model import make_tiny_model
    from chatpager.tui.session import Message, Session

    model = make_tiny_model(tmp_path / "strict", max_position_embeddings=8192)
    config_file = model / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["chat_template"] = STRICT_TEMPLATE
    config_file.write_text(json.dumps(config))
    (model / "chat_template.jinja").unlink(missing_ok=True)
    shutil.rmtree(model / "chat_template", ignore_errors=True)
    store = Store(tmp_path / "chatpager.sqlite3")  # chatpager died before its reply began
    session = Session("s1", "Chat 1", "terse", "Be brief.",
                      [Message("user", "hi"), Message("assistant", "hello"), Message("user", "lost")])
    store.save_session(session)
    store.replace_messages(session)
    store.close()
    app = make_app(str(model), tmp_path)
    async with running(app) as pilot:
        await say(pilot, "are you there?")
        await until(pilot, lambda: not app.current.busy)
        assert app.current.error is None
        assert [m.role for m in app.current.messages] == ["user", "assistant", "user", "user",
                                                          "assistant"]


async def test_a_reply_is_checkpointed_while_it_streams(model, tmp_path):
    import sqlite3

    database = tmp_path / "chatpager.sqlite3"
    (tmp_path / "killed").mkdir()
    app = make_app(model, tmp_path, params=ENDLESS)
    async with running(app) as pilot:
        await say(pilot, "a long answer, please")
        await until(pilot, lambda: sqlite3.connect(database).execute(
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


async def test_an_error_is_shown_as_plain_text(model, tmp_path):
    app = make_app(model, tmp_path)
    async with running(app) as pilot:
        app.current.error = "bad [/] input [bold]not bold[/bold]"  # markup would raise or style
        await app._show_current()
        await pilot.pause()
        label = app.main.query_one("#chat-error")
        assert plain(label.render()).strip() == "⚠ bad [/] input [bold]not bold[/bold]"


async def test_a_long_chat_drops_its_oldest_turns_and_keeps_going(model, tmp_path):
    app = make_app(model, tmp_path, max_model_len=400)  # byte tokens: about 400 characters
    async with running(app) as pilot:
        await say(pilot, "/system terse")
        for k in range(5):
            await say(pilot, f"question {k}: " + "tell me more about paged attention. " * 2)
            await until(pilot, lambda: not app.current.busy)
            assert app.current.error is None, app.current.error
        assert [m.role for m in app.current.messages] == ["user", "assistant"] * 5
        assert app.current.window > 0 and app.current.chat()[0]["role"] == "system"
        assert any("no longer fits" in notice for notice in app.notices)
        notes = [str(n.render()) for n in app.main.query(".chat-note")]
        assert len(notes) == 1 and "not sent to the model" in notes[0]


def stored_sessions(data_dir: Path, *sessions) -> None:
    """Write sessions as an earlier run of the app would have."""
    store = Store(data_dir / "chatpager.sqlite3")
    for session in sessions:
        store.save_session(session)
        store.replace_messages(session)
    store.close()


async def test_set_changes_one_sessions_sampling_and_shows_it(model, tmp_path):
    app = make_app(model, tmp_path, params=SamplingParams(temperature=1.5, max_tokens=8, ignore_eos=True))
    async with running(app) as pilot:
        await say(pilot, "/set temperature 0")  # greedy: the same prompt, the same reply
        await say(pilot, "/set max-tokens 5")
        header = app.main.query_one("#chat-header")
        assert "temperature 0.0" in str(header.render()) and "max_tokens 5" in str(header.render())
        await say(pilot, "say it twice")
        await until(pilot, lambda: not app.current.busy)
        first = app.current.messages[-1].content
        await say(pilot, "/regen")
        await until(pilot, lambda: not app.current.busy and not app.current.choices)
        assert app.current.messages[-1].content == first
        assert app.current.tokens - app.current.cached_tokens <= 5 + 16  # 5 generated at most
        await say(pilot, "/set temperature -1")
        assert any("temperature must be >= 0" in notice for notice in app.notices)
        await say(pilot, "/set top_p default")
        await say(pilot, "/set nonsense 3")
        assert any("no setting 'nonsense'" in notice for notice in app.notices)
        await say(pilot, "/new terse")  # other sessions keep the command line's settings
        assert app.current.settings == {}
    again = make_app(model, tmp_path)
    async with running(again):
        assert next(iter(again.sessions.values())).settings == {"temperature": 0.0, "max_tokens": 5}


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


async def test_copy_the_last_reply_or_its_code_block(model, tmp_path):
    from chatpager.tui.session import Message, Session

    reply = "Run it:\n\n```sh\nmake test\n```\n\nthen\n\n```python\nprint('ok')\n```\n"
    stored_sessions(tmp_path, Session("s1", "Code", "terse", "Be brief.",
                                      [Message("user", "how?"), Message("assistant", reply)]))
    app = make_app(model, tmp_path)
    async with running(app) as pilot:
        await pilot.press("f4")
        await pilot.pause()
        assert app.clipboard == reply
        await say(pilot, "/copy code")
        assert app.clipboard == "print('ok')\n"
        assert any("Copied the last code block" in notice for notice in app.notices)


async def test_up_recalls_what_was_sent(model, tmp_path):
    app = make_app(model, tmp_path)
    async with running(app) as pilot:
        prompt = app.main.query_one(PromptInput)
        for text in ("first message", "/info"):
            await say(pilot, text)
        await until(pilot, lambda: not app.current.busy)
        await pilot.press("up")
        assert prompt.text == "/info"
        await pilot.press("up")
        assert prompt.text == "first message"
        await pilot.press("down")
        assert prompt.text == "/info"
        await pilot.press("down")
        assert prompt.text == ""
        prompt.text = "line one\nline two"  # text being written: ↑ moves the cursor
        prompt.move_cursor((1, 0))
        await pilot.press("up")
        assert prompt.text == "line one\nline two" and prompt.cursor_location == (0, 0)


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


async def test_the_guided_demo_walks_through_every_step(model, tmp_path):
    from chatpager.tui.demo import Tour

    prompts = tmp_path / "prompts"  # short prompts (byte tokens) that share a preamble
    prompts.mkdir()
    (prompts / "_base.md").write_text("You are a helpful assistant. Be exact, kind and brief. " * 2)
    for name in ("assistant", "tutor", "pirate", "critic"):
        (prompts / f"{name}.md").write_text(f"@include _base.md\n\nRole: the {name}, who answers "
                                            f"as a {name} would.")
    tenants = SamplingParams(temperature=0.8, max_tokens=40, ignore_eos=True)
    app = make_app(model, tmp_path, num_blocks=64, prompts_dir=prompts, swarm_params=tenants,
                   demo=True)  # as `chatpager --demo` starts
    async with running(app) as pilot:
        tour = app.tour
        assert isinstance(tour, Tour) and tour.index == 0
        caption = app.main.query_one("#demo-caption")
        seen = []
        for step in range(len(tour.steps)):
            await until(pilot, lambda: tour.ready(), timeout=120)
            await until(pilot, lambda: "Space / → next step" in str(caption.render())
                        or "Esc ends the tour" in str(caption.render()))
            seen.append(tour.step.title)
            if step == 1:
                assert app.current.title == "demo B" and app.current.cached_tokens > 0
            if step == 5:
                assert "vs contig" in plain(app.main.query_one("CacheStats").content)
                assert "the memory" in str(caption.render()) or "No sequence" in str(caption.render())
            if step < len(tour.steps) - 1:
                await pilot.press("space")
                assert tour.index == step + 1
        assert seen == [s.title for s in tour.steps]
        assert stats(app)["evictions"] > 0 and stats(app)["preemptions"] > 0
        await pilot.press("escape")
        await until(pilot, lambda: app.tour is None)
        assert not caption.display
        assert [s.title for s in app.sessions.values()] == ["Chat 1"]  # the tour's are gone
