"""`chatpager --serve`: a remote tenant's requests, made over HTTP with the openai client,
appear in the TUI's sidebar as one read-only session per conversation, its blocks drawn in
the block map — driven with Pilot on a tiny random-weight model."""
from __future__ import annotations

import time

import openai
import pytest

from chatpager.engine_args import EngineArgs
from chatpager.serve.config import ServeConfig
from chatpager.tui.app import ChatpagerApp
from chatpager.tui.config import AppConfig
from chatpager.tui.screens.help import HelpScreen
from chatpager.tui.widgets.block_map import BlockMap
from chatpager.tui.widgets.prompt_input import PromptInput
from chatpager.tui.widgets.session_list import SessionList

SYSTEM = {"role": "system", "content": "You are a remote tenant's assistant."}


@pytest.fixture
def app(tiny_model_factory, tmp_path) -> ChatpagerApp:
    model = tiny_model_factory("llama", max_position_embeddings=8192)
    config = AppConfig(engine=EngineArgs(model=model, num_blocks=1024), data_dir=tmp_path,
                       refresh_interval=0.05, serve=ServeConfig(port=0))
    app = ChatpagerApp(config)
    app.notices = []
    notify = app.notify
    app.notify = lambda message, **kw: (app.notices.append(str(message)), notify(message, **kw))
    return app


async def until(pilot, condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await pilot.pause(0.05)


def remote_sessions(app: ChatpagerApp) -> list:
    return [s for s in app.sessions.values() if s.remote is not None]


async def test_a_remote_tenant_shows_in_the_sidebar_and_the_block_map(app):
    async with app.run_test(size=(160, 45)) as pilot:
        await until(pilot, lambda: app.engine.snapshot is not None and app.server is not None)
        url = app.server.url
        assert app.title == f"chatpager · serving {url}/v1"
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="-", max_retries=0)
        model = (await client.models.list()).data[0].id

        # first turn: a short reply; the conversation becomes a tenant session
        messages = [SYSTEM, {"role": "user", "content": "First question?"}]
        first = await client.chat.completions.create(model=model, messages=messages, max_tokens=4,
                                                     extra_body={"ignore_eos": True})
        await until(pilot, lambda: remote_sessions(app) and not remote_sessions(app)[0].busy)
        [tenant] = remote_sessions(app)
        assert tenant.title == "⇄ 127.0.0.1" and tenant.prompt_name == model
        assert [m.content for m in tenant.messages] == ["First question?", first.choices[0].message.content]

        # second turn, streamed and endless: the same session, its blocks in the block map
        messages += [{"role": "assistant", "content": first.choices[0].message.content},
                     {"role": "user", "content": "And a second one?"}]
        stream = await client.chat.completions.create(model=model, messages=messages, stream=True,
                                                      max_tokens=4000, extra_body={"ignore_eos": True})
        await anext(stream)
        await until(pilot, lambda: tenant.state == "generating")
        assert remote_sessions(app) == [tenant]  # one conversation, one session
        sidebar = app.main.query_one(SessionList)
        assert any("⇄ 127.0.0.1" in str(option.prompt) for option in sidebar.options)
        await app._switch_to(tenant.id)
        block_map = app.main.query_one(BlockMap)
        await until(pilot, lambda: block_map.focus_blocks)
        [view] = [v for v in app.engine.snapshot.sequences if v.request_id == tenant.request_id]
        assert block_map.focus_blocks <= set(view.block_table) | set(block_map.focus_blocks)
        assert set(view.block_table) & block_map.focus_blocks
        assert tenant.cached_tokens > 0  # the first turn's prompt blocks were hits

        # read-only here: typing into it is refused, with a reason
        app.main.query_one(PromptInput).text = "let me in"
        await pilot.press("enter")
        await until(pilot, lambda: any("read-only" in n for n in app.notices))

        # the help screen says how to connect
        await pilot.press("f1")
        await until(pilot, lambda: isinstance(app.screen, HelpScreen))
        assert f"curl {url}/v1/chat/completions" in app.screen.hint
        await pilot.press("escape")

        # the client goes away: its request is aborted, the session ends its turn
        await stream.close()
        await until(pilot, lambda: not tenant.busy and not app.engine.snapshot.sequences)
        assert tenant.messages[-1].role == "assistant"
