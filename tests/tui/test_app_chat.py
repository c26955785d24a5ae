"""One conversation in the app: replies stream in and are stored, errors, long chats, regeneration,
per-session sampling, copying and recalling input."""
from __future__ import annotations

import json


from chatpager import SamplingParams
from chatpager.tui.screens.pick_reply import PickReplyScreen
from chatpager.tui.store import Store
from chatpager.tui.widgets.chat_view import ChatView
from chatpager.tui.widgets.prompt_input import PromptInput
from chatpager.tui.widgets.session_list import SessionList
from tests.tui.support import (chat_texts, ENDLESS, hold, loaded, make_app, plain, running, say, stats, step_until,
                                stored_sessions, until)


async def test_a_reply_streams_into_the_chat_and_is_stored(model, tmp_path):
    app = make_app(model, tmp_path, params=ENDLESS)
    async with running(app) as pilot:
        await loaded(pilot)
        await hold(pilot)  # stepped by the test: the reply cannot end before it is stopped
        await say(pilot, "stream please")
        view = app.main.query_one(ChatView)
        await step_until(pilot, lambda: len(view.reply_text) > 3)
        seen = view.reply_text
        await step_until(pilot, lambda: len(view.reply_text) > len(seen) + 3)
        assert view.reply_text.startswith(seen)  # appended, not replaced
        assert app.current.state == "generating" and stats(app)["used_blocks"] > 0
        await pilot.press("escape")  # stop: keeps what was generated, frees the blocks
        app.engine.release()  # the abort's output comes with the next step
        await until(pilot, lambda: not app.current.busy)
        reply = app.current.messages[-1]
        assert reply.role == "assistant" and reply.content.startswith(seen)
        assert chat_texts(app)[-1][0] == "assistant"
        await until(pilot, lambda: stats(app)["used_blocks"] == 0)
        assert stats(app)["cached_blocks"] > 0  # the history stays hittable
    stored = Store(tmp_path / "chatpager.sqlite3").load()
    assert [m.content for m in stored[0].messages] == ["stream please", reply.content]


async def test_an_error_is_shown_as_plain_text(model, tmp_path):
    app = make_app(model, tmp_path)
    async with running(app) as pilot:
        app.current.error = "bad [/] input [bold]not bold[/bold]"  # markup would raise or style
        await app._show_current()
        await pilot.pause()
        label = app.main.query_one("#chat-error")
        assert plain(label.render()).strip() == "⚠ bad [/] input [bold]not bold[/bold]"


async def test_a_long_chat_drops_its_oldest_turns_and_keeps_going(model, tmp_path):
    # byte tokens: about 400 characters; no EOS, or a reply the random model ends at once is not stored
    app = make_app(model, tmp_path, max_model_len=400, params=SamplingParams(temperature=0.8, max_tokens=6,
                                                                              ignore_eos=True))
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


STRICT_TEMPLATE = (  # as Llama 2 / Mistral templates do: roles must alternate
    "{% for message in messages %}"
    "{% if message['role'] != 'system' and (message['role'] == 'user') != (loop.index0 % 2 == 1) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant') }}"
    "{% endif %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


async def test_a_user_turn_left_without_a_reply_does_not_break_the_next(tmp_path):
    import shutil

    from chatpager.engine.model.tiny_model import make_tiny_model
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
