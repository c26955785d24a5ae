"""Running the app under uvicorn: in the foreground (`chatpager serve`) or on a thread beside
another event loop (the TUI's `--serve`, tests).

`ServerThread` owns its uvicorn server: `start()` returns once it listens (port 0 picks a
free port, read back from `port`), `stop()` asks it to exit, gives open streams a moment,
and joins the thread.
"""
from __future__ import annotations

import threading
import time

import uvicorn

from chatpager.engine.loop.client import EngineLoop
from chatpager.serve.app import create_app
from chatpager.serve.config import check_bind, ServeConfig

GRACEFUL_SHUTDOWN_S = 1.0
QUIET_LOGGING = {"version": 1, "disable_existing_loggers": False,  # nothing on the terminal
                 "loggers": {name: {"handlers": [], "propagate": False, "level": "CRITICAL"}
                             for name in ("uvicorn", "uvicorn.error", "uvicorn.access")}}


def make_server(engine: EngineLoop, config: ServeConfig, quiet: bool = False) -> uvicorn.Server:
    check_bind(config)
    app = create_app(engine, config)
    kwargs = {"log_config": QUIET_LOGGING, "access_log": False} if quiet else {"log_level": "info"}
    return uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port,
                                         timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S, **kwargs))


class ServerThread:
    def __init__(self, engine: EngineLoop, config: ServeConfig, quiet: bool = True) -> None:
        self.config = config
        self.server = make_server(engine, config, quiet)
        self._thread = threading.Thread(target=self.server.run, name="chatpager-serve", daemon=True)

    def start(self, timeout: float = 10.0) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive():
                raise OSError(f"the server could not listen on {self.config.host}:{self.config.port}")
            if time.monotonic() > deadline:
                raise TimeoutError("the server did not start in time")
            time.sleep(0.01)
        return self

    @property
    def port(self) -> int:
        return self.server.servers[0].sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        host = self.config.host
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}"

    def stop(self, timeout: float = 5.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout)
