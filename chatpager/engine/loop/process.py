"""The host that runs an EngineLoop's core in a process of its own (vLLM v1's EngineCore split).

Why: a client's own Python work (the TUI laying out a streaming reply, an HTTP server parsing
requests) keeps its thread busy while replies stream. On a thread of that process, the engine's
Python glue between its C kernels waits on the GIL each time; in its own process it never does.
Measured in BENCHMARKS.md ("The same chat in the TUI").

How:
- The core's process is started with "spawn", never "fork" (the client has threads running);
  the loader is pickled to it (`core.load_llm` with the LLM's arguments pickles).
- One duplex pipe. Commands go down, read at once by a thread of the core's process into the
  core's queue, so a client never blocks on a sender's buffer while the model loads. The core's
  reports (events, state, snapshots) come up as one message each, in the order it made them,
  and a reader thread of the client's process hands them to the client's `Report`.
- The core's process ignores SIGINT (Ctrl+C in a terminal reaches the whole process group; the
  client decides when to stop) and stops when told, or when the pipe closes because the client
  is gone.
- Its `chatpager.*` log records come up the pipe too, at the client's level, and are handled by
  the client's loggers: one process writes the log file (two would each rotate it). Its stdout
  and stderr (C and Python output alike) go to `output_path` when one is given: the terminal
  belongs to the client.
- If the core's process ends without being told to, the client hears `lost(why)` once.
"""
from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import queue
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from chatpager.engine.loop.core import EngineCore, Report
from chatpager.engine.loop.protocol import Close, Command, Event, ProgressFn
from chatpager.engine.outputs import CacheSnapshot

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    from chatpager.engine.llm import LLM


class CoreProcess:
    def __init__(self, load: Callable[[ProgressFn], LLM], report: Report, snapshot_interval: float,
                 lost: Callable[[str], None], output_path: Path | None = None) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, self._core_conn = context.Pipe()
        level = logging.getLogger("chatpager").getEffectiveLevel()
        self._process = context.Process(target=_core_main, name="chatpager-engine", daemon=True,
                                         args=(self._core_conn, load, snapshot_interval, level, output_path))
        self._report = report
        self._lost = lost
        self._send_lock = threading.Lock()  # any thread may send
        self._reader = threading.Thread(target=self._read, name="chatpager-engine-reader", daemon=True)
        self._started = False
        self._closing = False

    def start(self) -> None:
        with _stderr_with_a_descriptor():
            self._process.start()
        self._core_conn.close()  # the core's process holds its end: EOF comes when it exits
        self._started = True
        self._reader.start()

    def send(self, command: Command) -> bool:
        """False when the core's process is gone."""
        with self._send_lock:
            try:
                self._conn.send(command)
            except (OSError, ValueError):  # a broken pipe, or closed here
                return False
        return True

    def is_alive(self) -> bool:
        return self._started and self._process.is_alive()

    def close(self, timeout: float) -> None:
        """Stop after the commands already sent; a core still busy after `timeout` is terminated."""
        self._closing = True
        self.send(Close())
        if self._started:
            self._process.join(timeout)
            if self._process.is_alive():
                self._process.terminate()
                self._process.join(1.0)
            self._reader.join(1.0)
        self._conn.close()

    def _read(self) -> None:
        while True:
            try:
                kind, *args = self._conn.recv()
            except (EOFError, OSError):
                break
            except Exception:  # a message that does not unpickle: nothing after it can be trusted
                log.exception("unreadable message from the engine process; stopping it")
                self._process.terminate()
                break
            try:
                if kind == "log":
                    logging.getLogger(args[0].name).handle(args[0])
                else:
                    getattr(self._report, kind)(*args)
            except Exception:  # a client's callback failed: the next report still comes through
                log.exception("handling the engine's %r report failed", kind)
        self._process.join(5.0)
        if not self._closing:
            self._lost(f"the engine process exited (code {self._process.exitcode})")


@contextlib.contextmanager
def _stderr_with_a_descriptor():
    """multiprocessing hands sys.stderr's descriptor to its resource tracker when it starts one,
    and fails on -1, which is what a front end's stand-in may return (Textual's, while the app
    runs): the process starts with the real stderr in place."""
    saved = sys.stderr
    try:
        replace = saved.fileno() < 0
    except (AttributeError, OSError, ValueError):  # no descriptor at all: multiprocessing skips it
        replace = False
    if replace:
        sys.stderr = sys.__stderr__
    try:
        yield
    finally:
        sys.stderr = saved


class _PipeReport:
    """The core's `Report`, and its log records, as messages up the pipe: (kind, *arguments)."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()  # the core reports, any thread may log

    def _send(self, message: tuple) -> None:
        with self._lock:
            self._conn.send(message)

    def events(self, events: Sequence[Event]) -> None:
        self._send(("events", list(events)))

    def state(self, model_info: dict | None, unusable: str | None) -> None:
        self._send(("state", model_info, unusable))

    def snapshot(self, snapshot: CacheSnapshot) -> None:
        self._send(("snapshot", snapshot))

    def log(self, record: logging.LogRecord) -> None:
        self._send(("log", record))


class _PipeLogHandler(logging.Handler):
    """Hands each record to the client: its message formatted here (its arguments may not pickle)."""

    def __init__(self, report: _PipeReport) -> None:
        super().__init__()
        self._report = report

    def emit(self, record: logging.LogRecord) -> None:
        try:
            record.msg, record.args = record.getMessage(), None
            if record.exc_info:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
                record.exc_info = None
            self._report.log(record)
        except (OSError, EOFError):  # the client is gone
            pass


def _core_main(conn: Connection, load: Callable[[ProgressFn], LLM], snapshot_interval: float,
               log_level: int, output_path: Path | None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if output_path is not None:
        with open(output_path, "a", encoding="utf-8") as out:  # C and Python output alike, not the terminal
            os.dup2(out.fileno(), 1)
            os.dup2(out.fileno(), 2)
    report = _PipeReport(conn)
    logger = logging.getLogger("chatpager")
    logger.setLevel(log_level)
    logger.addHandler(_PipeLogHandler(report))
    logger.propagate = False
    commands: queue.SimpleQueue = queue.SimpleQueue()

    def receive() -> None:
        while True:
            try:
                command = conn.recv()
            except (EOFError, OSError):  # the client is gone
                command = Close()
            commands.put(command)
            if isinstance(command, Close):
                return

    threading.Thread(target=receive, name="chatpager-commands", daemon=True).start()
    try:
        EngineCore(load, commands, report, snapshot_interval).run()
    except (BrokenPipeError, EOFError):  # the client left while the core reported
        pass
