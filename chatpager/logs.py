"""Logging for front ends: the engine logs through module loggers (`chatpager.*`, e.g. a failed
forward with its traceback); the TUI and `serve` call `configure_file_logging` once at start
so those records land in a file under the data directory instead of the terminal.

Invariants: calling it again with the same path adds no second handler; records of level
`level` and above from every `chatpager.*` logger reach the file, tracebacks included; the
root logger and other libraries' loggers are left alone.
"""
from __future__ import annotations

import logging
import logging.handlers
import os
from pathlib import Path

LOG_NAME = "chatpager.log"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(threadName)s] %(message)s"
MAX_BYTES = 5 * 2**20  # rotate at 5 MiB, keeping three old files
BACKUPS = 3


def configure_file_logging(path: str | os.PathLike, level: int = logging.INFO) -> logging.Handler:
    """Send chatpager's log records to `path` (parent folders created); returns the handler."""
    path = Path(path).expanduser().resolve()
    logger = logging.getLogger("chatpager")
    for handler in logger.handlers:
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename) == path:
            return handler
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.handlers.RotatingFileHandler(path, maxBytes=MAX_BYTES, backupCount=BACKUPS,
                                                   encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.setLevel(level)
    logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > level:
        logger.setLevel(level)
    return handler


def default_log_path() -> Path:
    """Where `serve` logs when no data directory is given: the user's log directory."""
    import platformdirs

    return Path(platformdirs.user_log_dir("chatpager", appauthor=False)) / LOG_NAME
