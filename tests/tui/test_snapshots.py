"""SVG snapshots of the main screen and the help screen (update: pytest --snapshot-update).

Deterministic on any CPU: stored sessions written beforehand, the tiny model under a fixed name,
the torch attention backend, and the screen taken once the model has loaded and before anything
is generated.
"""
from __future__ import annotations

import time

import pytest

from chatpager import SamplingParams
from chatpager.engine.model.tiny_model import make_tiny_model
from chatpager.engine_args import EngineArgs
from chatpager.prompts import load_prompts
from chatpager.tui.app import ChatpagerApp
from chatpager.tui.config import AppConfig
from chatpager.tui.session import Message, Session
from chatpager.tui.store import Store
from chatpager.tui.widgets.block_map import BlockMap
from chatpager.tui.widgets.prompt_input import PromptInput

SIZE = (150, 42)


@pytest.fixture(scope="module")
def snapshot_model(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("snapshot-model", numbered=False) / "tiny"
    return str(make_tiny_model(folder, max_position_embeddings=8192))


@pytest.fixture
def app(snapshot_model, tmp_path) -> ChatpagerApp:
    prompts = load_prompts()
    store = Store(tmp_path / "chatpager.sqlite3")
    planning = Session("s1", "Release planning", "assistant", prompts["assistant"], [
        Message("user", "What should go into the **0.2** release?"),
        Message("assistant", "Lead with the fixes users asked for:\n\n1. Faster start-up\n"
                             "2. Export to JSON\n\n```sh\nmake test\n```"),
    ])
    review = Session("s2", "Code review", "code-reviewer", prompts["code-reviewer"], [
        Message("user", "Review: `def avg(xs): return sum(xs) / len(xs)`"),
    ])
    for session in (planning, review):
        store.save_session(session)
        store.replace_messages(session)
    store.close()
    # the torch attention on every CPU: the stats line names the backend, and the C kernel's
    # `auto` choice depends on the CPU (AVX512) and the CHATPAGER_CPU_ATTENTION switch
    config = AppConfig(engine=EngineArgs(model=snapshot_model, num_blocks=512, attention="torch"), data_dir=tmp_path,
                       params=SamplingParams(max_tokens=4))
    return ChatpagerApp(config)


async def model_loaded(pilot) -> None:
    """Until the cache view shows the loaded model's pool."""
    deadline = time.monotonic() + 60
    while not any(m.snapshot for m in pilot.app.main.query(BlockMap)) or (
        "tiny" not in pilot.app.sub_title
    ):
        assert time.monotonic() < deadline
        await pilot.pause(0.05)
    pilot.app.main.query_one(PromptInput).cursor_blink = False  # a blink is a timing
    await pilot.pause()


def test_main_screen(snap_compare, app):
    assert snap_compare(app, terminal_size=SIZE, run_before=model_loaded)


def test_help_screen(snap_compare, app):
    async def open_help(pilot) -> None:
        await model_loaded(pilot)
        await pilot.press("f1")

    assert snap_compare(app, terminal_size=SIZE, run_before=open_help)
