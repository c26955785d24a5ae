"""`chatpager --serve`: a remote tenant's requests, made over HTTP with the openai client,
appear in the TUI's sidebar as one read-only session per conversation, its blocks drawn in
the block map — driven with Pilot on a tiny random-weight model."""
from __future__ import annotations


import openai
import pytest

from chatpager.engine_args import EngineArgs
from chatpager.omp_policy import threads_beside_a_front_end
from chatpager.serve.config import ServeConfig
from chatpager.tui.app import ChatpagerApp
from chatpager.tui.config import AppConfig
from chatpager.tui.screens.help import HelpScreen
from chatpager.tui.widgets.block_map import BlockMap
from chatpager.tui.widgets.prompt_input import PromptInput
from chatpager.tui.widgets.session_list import SessionList
from tests.tui.support import hold, step_until, until

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



def remote_sessions(app: ChatpagerApp) -> list:
    return [s for s in app.sessions.values() if s.remote is not None]


async def test_a_remote_tenant_shows_in_the_sidebar_and_the_block_map(app):
    async with app.run_test(size=(160, 45)) as pilot:
        await until(pilot, lambda: app.engine.snapshot is not None and app.server is not None)
        # the app's default: the engine in a process of its own, a core left to the app
        assert app.engine.model_info["threads"] == threads_beside_a_front_end()
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

        # second turn, streamed: the same session, its blocks in the block map. The engine is
        # stepped by the test, then held: the reply goes on however long the looking takes
        messages += [{"role": "assistant", "content": first.choices[0].message.content},
                     {"role": "user", "content": "And a second one?"}]
        await hold(pilot)
        stream = await client.chat.completions.create(model=model, messages=messages, stream=True,
                                                      max_tokens=4000, extra_body={"ignore_eos": True})
        await anext(stream)
        await step_until(pilot, lambda: tenant.state == "generating")
        assert remote_sessions(app) == [tenant]  # one conversation, one session
        sidebar = app.main.query_one(SessionList)
        assert any("⇄ 127.0.0.1" in str(option.prompt) for option in sidebar.options)
        await app.switch_to(tenant.id)
        block_map = app.main.query_one(BlockMap)
        await until(pilot, lambda: block_map.focus_blocks)
        [view] = [v for v in block_map.snapshot.sequences if v.request_id == tenant.request_id]
        assert block_map.focus_blocks == set(view.block_table)  # drawn solid: this tenant's
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
        app.engine.release()
        await stream.close()
        await until(pilot, lambda: not tenant.busy and not app.engine.snapshot.sequences)
        assert tenant.messages[-1].role == "assistant"


# -- how remote requests are grouped into sessions (no model needed) -------------------------
from chatpager import SamplingParams  # noqa: E402
from chatpager.engine.loop.client import Accepted, EngineLoop  # noqa: E402
from chatpager.engine.outputs import RequestOutput  # noqa: E402
from chatpager.prompts import load_prompts  # noqa: E402
from chatpager.serve.bridge import RemoteRequest  # noqa: E402
from chatpager.tui.remote import RemoteTenants  # noqa: E402
from chatpager.tui.sessions import Sessions  # noqa: E402
from chatpager.tui.store import Store  # noqa: E402
from chatpager.tui.turns import Turns  # noqa: E402


class Host:
    """Remote tenants on real sessions and turns, fed events by hand (the engine never runs)."""

    def __init__(self, tmp_path, max_sessions: int = 64) -> None:
        self.sessions = Sessions(Store(tmp_path / "db.sqlite3"), load_prompts())
        self.turns = Turns(self.sessions, EngineLoop(lambda progress: None), SamplingParams())
        self.remote = RemoteTenants(self.sessions, self.turns, max_sessions)
        self.serial = 0

    def request(self, tenant: str, *messages: tuple[str, str], reply: str = "ok", keep=None):
        """A request accepted and answered; the session it went to."""
        self.serial += 1
        rid = f"chatcmpl-{self.serial}"
        self.remote.apply([Accepted(rid, RemoteRequest(tenant, "m", messages))], keep=keep)
        session = next(s for s in self.sessions.values() if s.request_id == rid)
        self.turns.apply([RequestOutput(rid, (1,), (2,), (2,), reply, True, "stop")])
        assert not session.busy and session.messages[-1].content == reply
        return session


def test_one_conversation_is_one_session_and_others_get_their_own(tmp_path):
    host = Host(tmp_path)
    system = ("system", "Shared house style.")
    a1 = host.request("10.0.0.1", system, ("user", "I am A"), reply="hello A")
    b1 = host.request("10.0.0.1", system, ("user", "I am B"), reply="hello B")
    assert a1 is not b1 and (a1.title, b1.title) == ("⇄ 10.0.0.1", "⇄ 10.0.0.1 #2")
    a2 = host.request("10.0.0.1", system, ("user", "I am A"), ("assistant", "hello A"),
                      ("user", "again"), reply="A again")
    assert a2 is a1 and [m.content for m in a1.messages] == ["I am A", "hello A", "again", "A again"]
    other = host.request("10.0.0.2", system, ("user", "I am A"), ("assistant", "hello A"),
                         ("user", "again"), reply="x")
    assert other is not a1 and other.remote == "10.0.0.2"
    assert a1.system == "Shared house style." and not a1.stored


def test_a_completion_continues_when_its_prompt_extends_the_last_one(tmp_path):
    host = Host(tmp_path)
    first = host.request("t", ("prompt", "Once upon"), reply=" a time")
    again = host.request("t", ("prompt", "Once upon a time, there"), reply=" was")
    assert again is first
    fresh = host.request("t", ("prompt", "Another story"), reply="...")
    assert fresh is not first


def test_the_oldest_idle_remote_sessions_go_first_never_the_one_on_screen(tmp_path):
    host = Host(tmp_path, max_sessions=2)
    oldest = host.request("t", ("user", "one"))
    host.request("t", ("user", "two"), keep=oldest.id)
    host.request("t", ("user", "three"), keep=oldest.id)
    remaining = [s.messages[0].content for s in host.sessions.values() if s.remote]
    assert remaining == ["one", "three"]  # "two" went: "one" is on screen
