"""The chat pane: a session's messages, and its reply streamed in as it is generated.

The reply is appended through a MarkdownStream (only the new text is parsed), never
re-rendered whole per token. The pane follows the bottom until the user scrolls up.
"""
from __future__ import annotations

from textual.containers import VerticalScroll
from textual.widgets import Markdown, Static
from textual.widgets.markdown import MarkdownStream

from chatpager.tui.session import Session
from chatpager.tui.session_info import settings_text
from chatpager.tui.widgets.chat_message import ChatMessage, printable


class ChatView(VerticalScroll):
    def __init__(self, id: str | None = None) -> None:
        super().__init__(id=id)
        self._shown: tuple[str, int] | None = None  # (session id, revision) on screen
        self._count = 0  # the session's messages mounted
        self._reply: ChatMessage | None = None  # the reply being streamed
        self._stream: MarkdownStream | None = None
        self._written = ""  # what has been written to the stream
        self._error = ""  # the error line shown

    def on_mount(self) -> None:
        self.anchor()

    @property
    def reply_text(self) -> str:
        """The streamed reply as shown so far ("" when none)."""
        return self._written

    async def sync(self, session: Session) -> None:
        """Bring the pane up to date with `session`, appending only what is new."""
        if self._shown != (session.id, session.revision):
            await self._reset(session)
        for index, message in enumerate(session.messages[self._count:], self._count):
            if index == session.window > 0:
                note = (f"— the {index} messages above no longer fit the context: "
                        f"they are kept, but not sent to the model —")
                await self.mount(Static(note, classes="chat-note", markup=False),
                                 before="#chat-error")
            if message.role == "assistant" and self._reply is not None:
                await self._write(message.content)
                await self._end_reply()
            else:
                await self.mount(ChatMessage(message.role, message.content, message.interrupted),
                                 before="#chat-error")
            self._count += 1
        if session.busy:
            if self._reply is None:
                self._reply = ChatMessage("assistant")
                await self.mount(self._reply, before="#chat-error")
            await self._write(session.reply)
        elif self._reply is not None:
            await self._end_reply()
        self.show_state(session)
        error = f"⚠ {session.error}" if session.error else ""
        if error != self._error:
            self._error = error
            label = self.query_one("#chat-error", Static)
            label.update(error)
            label.display = bool(error)

    def show_state(self, session: Session) -> None:
        """Label the reply being generated with its state (queued, generating, preempted)."""
        if self._reply is not None and self._shown == (session.id, session.revision):
            samples = len(session.samples)
            alternatives = f" · 1 of {samples} alternatives" if samples > 1 else ""
            self._reply.border_subtitle = session.state + alternatives

    async def _reset(self, session: Session) -> None:
        await self._end_reply()
        await self.remove_children()
        self._shown = (session.id, session.revision)
        self._count = 0
        self._error = ""
        header = f"{session.title} — system prompt: {session.prompt_name}"
        if session.settings:
            header += " · " + settings_text(session)
        await self.mount(Static(header, id="chat-header", markup=False),
                         Static(id="chat-error", markup=False))  # errors quote any text

    async def _write(self, text: str) -> None:
        assert self._reply is not None
        if text == self._written:
            return
        # The stream starts with the first text: a reply that ends before it has none to stop.
        if self._stream is None:
            self._stream = Markdown.get_stream(self._reply)
        if text.startswith(self._written):
            await self._stream.write(printable(text[len(self._written):]))
        else:  # the text was cut back (a stop string): render it again, once
            await self._stream.stop()
            await self._reply.update(printable(text))
            self._stream = Markdown.get_stream(self._reply)
        self._written = text

    async def _end_reply(self) -> None:
        if self._stream is not None:
            await self._stream.stop()
        if self._reply is not None:
            self._reply.border_subtitle = ""
            if not self._written:
                await self._reply.remove()
        self._reply, self._stream, self._written = None, None, ""
