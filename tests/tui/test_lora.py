"""The TUI's per-session LoRA choice, driven with Pilot: /lora lists, picks and clears the
adapter; the session's header shows it; its turns are submitted under it; it is stored."""
from __future__ import annotations

import pytest

from chatpager.tui.app import ChatpagerApp
from chatpager.tui.store import Store
from tests.engine.model.test_lora import ADAPTERS, make_adapter
from tests.tui.support import loaded, make_app, running, say, until


@pytest.fixture(scope="module")
def model(tiny_model_factory) -> str:
    return tiny_model_factory("llama", max_position_embeddings=8192)  # test_tui_app's model


@pytest.fixture(scope="module")
def adapters(model, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tui-loras")
    return {name: make_adapter(model, root / name, **spec) for name, spec in ADAPTERS.items()}


def lora_app(model: str, adapters: dict[str, str], data_dir) -> ChatpagerApp:
    return make_app(model, data_dir, engine_options={"lora_adapters": adapters})


def header(app: ChatpagerApp) -> str:
    return str(app.main.query_one("#chat-header").render())


async def test_lora_command_picks_lists_and_clears_the_sessions_adapter(model, adapters, tmp_path):
    app = lora_app(model, adapters, tmp_path)
    async with running(app) as pilot:
        await loaded(pilot)
        submitted = []
        submit = app.engine.submit

        def recording_submit(request_id, prompt, params, **kwargs):
            submitted.append(getattr(params, "lora", None))
            return submit(request_id, prompt, params, **kwargs)

        app.engine.submit = recording_submit
        await say(pilot, "/lora")
        assert "LoRA adapters: a, b" in app.notices[-1] and "uses: none" in app.notices[-1]
        await say(pilot, "/lora b")
        assert app.current.settings["lora"] == "b"
        await until(pilot, lambda: "lora b" in header(app))
        await say(pilot, "hello adapter")
        await until(pilot, lambda: not app.current.busy and len(app.current.messages) == 2)
        assert submitted == ["b"] and app.current.error is None
        await say(pilot, "/lora zzz")
        assert "no LoRA adapter 'zzz'; loaded: a, b" in app.notices[-1]
        await say(pilot, "/beam 2")
        assert "beam search runs on the base model only" in app.notices[-1]
        store = Store(app.config.database)
        stored = {s.id: s for s in store.load()}
        store.close()
        assert stored[app.current.id].settings["lora"] == "b"  # kept across restarts
        await say(pilot, "/lora none")
        assert "lora" not in app.current.settings
        await until(pilot, lambda: "lora" not in header(app))
        await say(pilot, "and now the base")
        await until(pilot, lambda: not app.current.busy and len(app.current.messages) == 4)
        assert submitted == ["b", None]
