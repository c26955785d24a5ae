"""The main screen: sessions on the left, the chat in the middle, the KV cache on the right.

It only shows what it is given (sessions, the current session, a CacheSnapshot); the app
decides what that is. It stays at the bottom of the screen stack, so the app can update it
while a dialog is open. The hints and completion under the input come from the command table,
through this screen: the widgets know no commands (widgets load no torch, and the table's
handlers name the app).
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import partial

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Header, Static

from chatpager.engine.outputs import CacheSnapshot
from chatpager.tui import commands
from chatpager.tui.messages import PromptSubmitted
from chatpager.tui.session import Session
from chatpager.tui.widgets.block_map import BlockMap
from chatpager.tui.widgets.block_table import BlockTable
from chatpager.tui.widgets.cache_stats import CacheStats
from chatpager.tui.widgets.chat_view import ChatView
from chatpager.tui.widgets.legend import Legend
from chatpager.tui.widgets.prompt_input import PromptInput
from chatpager.tui.widgets.session_list import SessionList
from chatpager.tui.widgets.slash_hints import SlashHints


def idle_note(session: Session) -> str:
    last = (
        f" Last turn: {session.cached_tokens} of its {session.tokens} tokens were cache hits."
        if session.tokens
        else ""
    )
    return (
        f"{session.title} is {session.state} and holds no blocks. Its next turn sends the "
        f"whole history again; the full blocks still in the prefix cache are reused, only "
        f"the rest is computed.{last}"
    )


class MainScreen(Screen):
    def __init__(self, prompt_names: Sequence[str]) -> None:
        super().__init__()
        self.prompt_names = list(prompt_names)
        self._cache_shown: tuple = ()  # what show_cache last drew from
        self._demo_caption: str | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="main"):
            yield SessionList(id="sessions")
            with Vertical(id="chat"):
                yield ChatView(id="chat-view")
                yield SlashHints(id="slash-hints")
                yield PromptInput(partial(commands.suggest, prompt_names=self.prompt_names), id="prompt")
            with Vertical(id="cache"):
                yield Static(id="demo-caption", markup=False)
                yield Static("KV cache — block map", classes="panel-title")
                yield BlockMap(id="block-map")
                yield Legend(id="legend")
                yield CacheStats(id="cache-stats")
                yield Static("Block table: logical→physical ×refs hit/miss", classes="panel-title")
                with VerticalScroll(id="block-table-scroll"):
                    yield BlockTable(id="block-table")
        yield Footer()

    def on_mount(self) -> None:
        self.focus_input()

    def focus_input(self) -> None:
        self.query_one(PromptInput).focus()

    def show_sessions(self, sessions: Sequence[Session], current_id: str) -> None:
        self.query_one(SessionList).show(sessions, current_id)

    async def show_chat(self, session: Session) -> None:
        await self.query_one(ChatView).sync(session)

    def show_cache(
        self,
        snapshot: CacheSnapshot | None,
        session: Session,
        model_status: str,
        model_info: dict | None,
        contiguous: tuple[int, int] | None = None,
        demo: tuple[str, set[int]] | None = None,
    ) -> None:
        """The block map, counters and block table, with `session`'s blocks highlighted;
        before the model has loaded, its status. `demo`: the tour's caption and the blocks
        it points at (highlighted instead)."""
        self._show_demo(demo[0] if demo else None)
        shown = (snapshot, session.id, session.state, session.tokens, session.title, model_status,
                 demo)
        if shown == self._cache_shown:  # nothing new: leave the widgets (and the screen) alone
            return
        self._cache_shown = shown
        stats = self.query_one(CacheStats)
        if snapshot is None or model_info is None:
            stats.show_status(model_status)
            return
        views = [
            view
            for view in snapshot.sequences
            if session.request_id and view.request_id.split(".")[0] == session.request_id
        ]
        block_map = self.query_one(BlockMap)
        focus = demo[1] if demo else {block for view in views for block in view.held_blocks}
        block_map.show(snapshot, focus)
        stats.show(snapshot.stats, model_info, contiguous)
        self.query_one(BlockTable).show(
            views, snapshot.refcounts, snapshot.block_size, block_map.copied_blocks,
            idle_note(session),
        )
        self.query_one(ChatView).show_state(session)

    def _show_demo(self, caption: str | None) -> None:
        if caption != self._demo_caption:
            self._demo_caption = caption
            label = self.query_one("#demo-caption", Static)
            label.update(caption or "")
            label.display = caption is not None

    def on_text_area_changed(self, event: PromptInput.Changed) -> None:
        self._show_hints(event.text_area.text)

    def on_prompt_submitted(self, _: PromptSubmitted) -> None:
        self._show_hints("")  # the message goes on to the app

    def _show_hints(self, text: str) -> None:
        hints = [(command.signature, command.help) for command in commands.matching(text)]
        self.query_one(SlashHints).show(hints)
