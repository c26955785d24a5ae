"""What the Pilot tests share: an app on a tiny model, running headless, typing into it,
waiting on a condition between Textual's message rounds, and holding the app's engine
(`EngineLoop.hold`) so that a state lasting only as long as the engine takes stays to be seen."""
from __future__ import annotations

import io
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path

from rich.console import Console

from chatpager import SamplingParams
from chatpager.engine_args import EngineArgs
from chatpager.tui.app import ChatpagerApp
from chatpager.tui.config import AppConfig
from chatpager.tui.store import Store
from chatpager.tui.widgets.chat_message import ChatMessage
from chatpager.tui.widgets.chat_view import ChatView
from chatpager.tui.widgets.prompt_input import PromptInput
from chatpager.tui.widgets.session_list import SessionList

# Generous: a loaded CI machine can take tens of seconds to load a model or start a server;
# a condition that holds returns at once, so only a real hang pays the whole wait.
TIMEOUT_S = 90.0


async def until(pilot, condition, timeout: float = TIMEOUT_S, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await pilot.pause(interval)


async def hold(pilot, steps: int = 0) -> None:
    """Hold the app's engine after `steps` more steps; returns once it holds (the commands
    sent before are applied, and its snapshot is the held one)."""
    engine = pilot.app.engine
    engine.hold(steps)
    await until(pilot, lambda: engine.held, interval=0.005)


async def step_until(pilot, condition, steps: int = 1, limit: int = 1000) -> None:
    """Step the held engine `steps` at a time until `condition()`; it stays held there. With
    `steps` shorter than the state it waits for, that state cannot be stepped over."""
    for _ in range(0, limit, steps):
        if condition():
            return
        await hold(pilot, steps)
    assert condition(), f"condition not met in {limit} engine steps"


def decoding(app: ChatpagerApp, *sessions) -> bool:
    """The engine's snapshot has every one of `sessions` running, with tokens generated."""
    views = {v.request_id: v for v in app.engine.snapshot.sequences}
    return all((v := views.get(s.request_id)) is not None and v.status == "running"
               and v.num_tokens > v.num_prompt_tokens for s in sessions)


SIZE = (160, 45)
SHORT = SamplingParams(temperature=0.8, max_tokens=6, ignore_eos=True)  # a random model may pick EOS first
ENDLESS = SamplingParams(temperature=0.8, max_tokens=4000, ignore_eos=True)


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


def stored_sessions(data_dir: Path, *sessions) -> None:
    """Write sessions as an earlier run of the app would have."""
    store = Store(data_dir / "chatpager.sqlite3")
    for session in sessions:
        store.save_session(session)
        store.replace_messages(session)
    store.close()
