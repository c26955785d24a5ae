"""The chatpager app: many chat sessions on one engine, and its KV cache on show.

The engine runs in an EngineLoop, whose core has a process of its own (`AppConfig.engine_process`):
the app's layout and rendering then never hold the engine's GIL. The app drains its events when
woken (one coalesced EngineActivity message per burst) and pulls the latest CacheSnapshot on a
timer; nothing here waits on the engine.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path

from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.screen import Screen

from chatpager.engine.loop.client import EngineFailed, EngineLoop, Loaded, LoadFailed, LoadProgress, ProgressFn
from chatpager.engine.loop.core import load_llm
from chatpager.logs import LOG_NAME
from chatpager.omp_policy import threads_beside_a_front_end
from chatpager.prompts import DEFAULT_PROMPT, load_prompts
from chatpager.tui import commands
from chatpager.tui.config import AppConfig
from chatpager.tui.demo import Tour
from chatpager.tui.handlers import REGENERATE_ALTERNATIVES
from chatpager.tui.messages import EngineActivity, PromptSubmitted, SessionSelected
from chatpager.tui.remote import connect_hint, RemoteTenants
from chatpager.tui.screens.confirm import ConfirmScreen
from chatpager.tui.screens.help import HelpScreen
from chatpager.tui.screens.main import MainScreen
from chatpager.tui.screens.pick_reply import PickReplyScreen
from chatpager.tui.screens.prompt_picker import PromptPicker
from chatpager.tui.screens.rename import RenameScreen
from chatpager.tui.session import Session
from chatpager.tui.sessions import Sessions, UserError
from chatpager.tui.store import Store
from chatpager.tui.swarm import load_turns, Swarm
from chatpager.tui.turns import Turns
from chatpager.tui.widgets.cache_stats import runtime_label
from chatpager.tui.widgets.prompt_input import PromptInput

DRAIN_INTERVAL = 0.1  # seconds: engine events are applied in batches at most this often


class ChatpagerApp(App, inherit_bindings=False):
    TITLE = "chatpager"
    CSS_PATH = Path(__file__).with_name("app.tcss")  # also for subclasses elsewhere
    BINDINGS = [
        Binding("ctrl+n", "new_session", "New", id="session.new",
                tooltip="New session: choose a system prompt from prompts/"),
        Binding("ctrl+f", "fork", "Fork", priority=True, id="session.fork",
                tooltip="Fork this session at its last message (a reply being generated "
                        "is forked too, sharing every block)"),
        Binding("escape", "stop", "Stop", id="chat.stop",
                tooltip="Stop the reply: keeps what was generated, frees its blocks"),
        Binding("ctrl+r", "regenerate", "Regen ×3", id="chat.regenerate",
                tooltip="Regenerate the last reply as three alternatives, then pick one"),
        Binding("ctrl+up,alt+up", "switch(-1)", "Prev", key_display="^↑", id="session.previous",
                tooltip="Previous session"),
        Binding("ctrl+down,alt+down", "switch(1)", "Next", key_display="^↓", id="session.next",
                tooltip="Next session"),
        Binding("f4", "copy_reply", "Copy", show=False, id="chat.copy",
                tooltip="Copy the last reply to the clipboard (/copy code: its code block)"),
        Binding("space,right", "demo_next", "Next step", show=False, id="demo.next",
                tooltip="In the demo (/demo): the next step"),
        Binding("f2", "rename", "Rename", id="session.rename", tooltip="Rename this session"),
        Binding("f8", "delete", "Delete", id="session.delete",
                tooltip="Delete this session and its messages"),
        Binding("f1,question_mark", "help", "Help", key_display="F1", id="app.help",
                tooltip="This help"),
        Binding("ctrl+p", "command_palette", "Commands", id="app.palette",
                tooltip="Command palette: every slash command, searchable"),
        Binding("ctrl+q", "quit", "Quit", priority=True, id="app.quit",
                tooltip="Quit (conversations are already saved)"),
    ]

    def __init__(self, config: AppConfig) -> None:
        super().__init__()
        self.config = config
        self.prompts = load_prompts(config.prompts_dir)
        # a --prompts-dir of one's own may have no "assistant": its first prompt then
        self.default_prompt = DEFAULT_PROMPT if DEFAULT_PROMPT in self.prompts else next(iter(self.prompts))
        self.store = Store(config.database)
        self.engine = self._make_engine()
        self.sessions = Sessions(self.store, self.prompts)
        self.turns = Turns(self.sessions, self.engine, config.params)
        self.swarm = Swarm(self.sessions, self.turns, load_turns(), config.swarm_params)
        self.remote = RemoteTenants(self.sessions, self.turns)
        self.server = None  # the HTTP server (ServerThread) of --serve, once listening
        self.current_id: str = ""
        self.tour: Tour | None = None  # the guided demo, while it runs
        self._tour_focus: Session | None = None  # the tour's session last switched to
        self.model_status = "loading…"
        self._picking = False
        self._last_drain = 0.0
        self._drain_pending = False
        self.main = MainScreen(list(self.prompts))

    # -- lifetime -----------------------------------------------------------------------------
    def notify(self, message: str, *, markup: bool = False, **options) -> None:
        """Notifications carry model output, paths and titles: not markup unless asked."""
        super().notify(message, markup=markup, **options)

    def get_default_screen(self) -> Screen:
        return self.main

    async def on_ready(self) -> None:
        sessions = self.sessions
        self.current_id = next(reversed(sessions)) if sessions else sessions.create(self.default_prompt).id
        self.sub_title = self.model_status
        self.engine.start()
        if self.config.serve is not None:
            self._start_server()
        if self.config.swarm:
            self.swarm.spawn(self.config.swarm)
        if self.config.demo:
            self.start_tour()
        # On the screen, not the app: it stops with the screen's widgets when the app closes.
        self.main.set_interval(self.config.refresh_interval, self._refresh_cache)
        await self._show_current()
        self._refresh_cache()

    def on_unmount(self) -> None:
        if self.server is not None:
            self.server.stop()
        self.engine.close(timeout=2.0)
        self.turns.close()
        self.store.close()

    def _start_server(self) -> None:
        """`--serve`: the OpenAI-compatible server on this app's engine, on its own thread."""
        from chatpager.serve.server import ServerThread  # FastAPI loads only when serving

        try:
            self.server = ServerThread(self.engine, self.config.serve).start()
        except (OSError, TimeoutError) as error:
            self.notify(f"cannot serve on port {self.config.serve.port}: {error}",
                        title="Server", severity="error", timeout=15)
            return
        self.title = f"chatpager · serving {self.server.url}/v1"

    def _make_engine(self) -> EngineLoop:
        def wake() -> None:
            self.post_message(EngineActivity())

        if self.config.engine_process:  # leaving a core to this app's own thread
            load = partial(load_llm, self.config.engine.llm_kwargs(), threads=threads_beside_a_front_end())
            return EngineLoop(load, wake, process=True, output_path=self.config.data_dir / LOG_NAME)
        return EngineLoop(self._load_llm, wake)

    def _load_llm(self, progress: ProgressFn):
        """The loader of an engine on a thread of this process (torch loads on that thread)."""
        return load_llm(self.config.engine.llm_kwargs(), progress)

    @property
    def current(self) -> Session:
        return self.sessions[self.current_id]

    # -- engine events --------------------------------------------------------------------------
    async def on_engine_activity(self, _: EngineActivity) -> None:
        # Each batch costs a Markdown append: apply a few a second, not one per engine step,
        # so the app's own thread stays light (it shares the machine with the engine).
        if self._drain_pending:
            return
        delay = self._last_drain + DRAIN_INTERVAL - time.monotonic()
        if delay > 0:
            self._drain_pending = True
            self.set_timer(delay, self._apply_engine_events)
        else:
            await self._apply_engine_events()

    async def _apply_engine_events(self) -> None:
        self._drain_pending = False
        self._last_drain = time.monotonic()
        events = self.engine.drain()
        for event in events:
            if isinstance(event, LoadProgress):
                percent = "" if event.fraction is None else f" {100 * event.fraction:.0f}%"
                self.set_model_status(f"loading: {event.stage}{percent}")
            elif isinstance(event, Loaded):
                info = event.model_info
                self.set_model_status(
                    f"{info['name']} · {runtime_label(info)}"
                )
            elif isinstance(event, LoadFailed):
                self.set_model_status("failed to load")
                self.notify(event.message, title="Model load failed", severity="error", timeout=15)
            elif isinstance(event, EngineFailed) and not self.engine.ready and self.engine.model_info:
                self.set_model_status("engine stopped: /restart starts it again")  # given up, or its process died
        self.remote.apply(events, keep=self.current_id)  # before turns: outputs find their turn
        changes = self.turns.apply(events)
        for notice in changes.notices:
            title = self.sessions[notice.session_id].title
            self.notify(notice.message, title=title, severity=notice.severity, timeout=8)
        self.swarm.advance(changes.finished)
        if self.current_id in changes.sessions:
            await self._show_chat()  # the sidebar follows on the next refresh

    def set_model_status(self, status: str) -> None:
        self.model_status = status
        self.sub_title = status

    def _refresh_cache(self) -> None:
        snapshot = self.engine.snapshot
        if snapshot is not None:
            self.turns.observe(snapshot)
        demo = None
        if self.tour is not None:
            demo = (self.tour.caption(), self.tour.highlight())
            focus = self.tour.focus
            if focus is not None and focus is not self._tour_focus and focus.id in self.sessions:
                self._tour_focus = focus  # follow the tour once per step, then the user's choice
                self.call_later(self.switch_to, focus.id)
        self.main.show_cache(snapshot, self.current, self.model_status, self.engine.model_info,
                             self.turns.contiguous_need(snapshot), demo)
        self._refresh_sidebar()

    def _refresh_sidebar(self) -> None:
        self.main.show_sessions(list(self.sessions.values()), self.current_id)

    async def _show_current(self) -> None:
        await self._show_chat()
        self._refresh_sidebar()

    async def _show_chat(self) -> None:
        session = self.current
        await self.main.show_chat(session)
        if session.choices and not self._picking:
            self._picking = True
            self.push_screen(PickReplyScreen(session.choices), partial(self._picked, session))

    # -- input ------------------------------------------------------------------------------------
    async def on_prompt_submitted(self, message: PromptSubmitted) -> None:
        if message.text.startswith("/"):
            await self.run_slash(message.text)
        else:
            await self._attempt(lambda: self.turns.send(self.current, message.text))

    async def on_session_selected(self, message: SessionSelected) -> None:
        await self.switch_to(message.session_id)
        self.main.focus_input()

    async def _attempt(self, action: Callable[[], object]) -> None:
        """Run a user's request; what cannot be done is said in a notification."""
        try:
            action()
        except (UserError, ValueError, OSError) as error:
            self.notify(str(error), severity="warning")
        await self._show_current()

    async def run_slash(self, text: str) -> None:
        """Run `/name argument` by the handler the command table names for it."""
        try:
            command, argument = commands.parse(text)
            await command.handler(self, argument)
        except (UserError, ValueError, OSError) as error:
            self.notify(str(error), severity="warning")
        await self._show_current()

    # -- the guided demo --------------------------------------------------------------------------
    def start_tour(self) -> None:
        if self.tour is not None:
            self.tour.end()
        self.tour = Tour(self.sessions, self.turns, self.swarm, lambda: self.engine.snapshot)
        self.tour.next()
        self.main.set_focus(None)  # Space and → now drive the tour, not the input

    def action_demo_next(self) -> None:
        if self.tour is not None and not self.tour.next():
            self.call_later(self.end_tour)

    async def end_tour(self) -> None:
        if self.tour is None:
            return
        self.tour.end()
        self.tour, self._tour_focus = None, None
        if self.current_id not in self.sessions:
            ids = list(self.sessions)
            await self.switch_to(ids[-1] if ids else self.sessions.create(self.default_prompt).id)
        self._refresh_cache()
        self.main.focus_input()

    # -- actions ----------------------------------------------------------------------------------
    def action_new_session(self) -> None:
        async def chosen(name: str | None) -> None:
            if name:
                await self.switch_to(self.sessions.create(name).id)

        self.push_screen(PromptPicker(self.prompts), chosen)

    async def action_fork(self) -> None:
        fork = self.turns.fork(self.current)
        await self.switch_to(fork.id)
        self.notify(f"Forked into {fork.title}: its next turn reuses the shared prefix blocks")

    def action_stop(self) -> None:
        if self.tour is not None:
            self.call_later(self.end_tour)
            return
        session = self.current
        if self.swarm.is_tenant(session):
            self.swarm.stop(session)
        else:
            self.turns.stop(session)

    async def action_copy_reply(self) -> None:
        await self.run_slash("/copy")

    async def action_regenerate(self) -> None:
        await self._attempt(
            lambda: self.turns.regenerate(self.current, REGENERATE_ALTERNATIVES)
        )

    async def action_switch(self, offset: int) -> None:
        ids = list(self.sessions)
        index = (ids.index(self.current_id) + offset) % len(ids)
        await self.switch_to(ids[index])

    def action_rename(self) -> None:
        session = self.current

        def renamed(title: str | None) -> None:
            if title:
                self.sessions.rename(session, title)
                self.call_later(self._show_current)

        self.push_screen(RenameScreen(session.title), renamed)

    def action_delete(self) -> None:
        session = self.current

        async def confirmed(yes: bool | None) -> None:
            if not yes:
                return
            ids = list(self.sessions)
            index = ids.index(session.id)
            if self.swarm.is_tenant(session):
                self.swarm.stop(session)
            self.turns.delete(session)
            ids.remove(session.id)
            target = ids[min(index, len(ids) - 1)] if ids else self.sessions.create(self.default_prompt).id
            await self.switch_to(target)

        self.push_screen(ConfirmScreen(f"Delete {session.title!r} and its messages?"), confirmed)

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            hint = None
            if self.server is not None:
                info = self.engine.model_info or {}
                hint = connect_hint(self.server.url, info.get("name", "MODEL"))
            self.push_screen(HelpScreen(self.help_sections(), hint))

    def help_sections(self) -> list[tuple[str, list[Binding]]]:
        return [("Keys", list(self.BINDINGS)), ("In the message input", list(PromptInput.BINDINGS))]

    async def switch_to(self, session_id: str) -> None:
        self.current_id = session_id
        await self._show_current()
        self._refresh_cache()

    def _picked(self, session: Session, index: int | None) -> None:
        self._picking = False
        if session.id in self.sessions and session.choices:
            self.turns.pick(session, index)
        self.call_later(self._show_current)

    # -- command palette ----------------------------------------------------------------------
    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        for text, help in commands.palette(list(self.prompts)):
            yield SystemCommand(text, help, partial(self.run_slash, text))

