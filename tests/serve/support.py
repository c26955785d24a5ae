"""Helpers for the server tests: a real server on an ephemeral loopback port, clients, and
its engine held (`EngineLoop.hold`) where a test must see a state the engine would pass."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families

from chatpager.engine.loop.client import EngineLoop
from chatpager.serve.config import ServeConfig
from chatpager.serve.server import ServerThread


@dataclass
class Running:
    engine: EngineLoop
    server: ServerThread
    llm: list  # the loaded LLM, once loaded (the test may reach it to break it on purpose)

    @property
    def base_url(self) -> str:
        return self.server.url + "/v1"

    def client(self, api_key: str = "unused", **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=api_key, max_retries=0, **kwargs)

    def async_client(self, api_key: str = "unused") -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.base_url, api_key=api_key, max_retries=0)

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics by name (labels folded in as name{k=v})."""
        text = httpx.get(self.server.url + "/metrics").text
        samples = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return samples

    @contextmanager
    def holding(self, steps: int = 0) -> Iterator[None]:
        """Within the block the engine takes at most `steps` more steps, then holds; it is
        released after the block whatever happens (the server is shared by a module's tests)."""
        self.engine.hold(steps)
        try:
            yield
        finally:
            self.engine.release()

    def step(self, steps: int = 0) -> int:
        """Held: take `steps` more steps (none: just apply the commands made so far) and hold
        again; the engine's step count then."""
        self.engine.hold(steps)
        wait_for(lambda: self.engine.held)
        return self.engine.snapshot.stats["steps"]

    def wait_idle(self, timeout: float = 30.0) -> dict:
        """The engine's stats once no block is held by a sequence."""
        return wait_for(lambda: (s := self.engine.snapshot.stats)["used_blocks"] == 0 and s, timeout)


def wait_for(condition: Callable[[], object], timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)
    return value


@contextmanager
def serving(model: str | None, config: ServeConfig = ServeConfig(port=0), wait: bool = True,
            load_gate=None, **llm_kwargs) -> Iterator[Running]:
    """A server on its own EngineLoop; `load_gate` (an Event) holds the model load back."""
    from chatpager import LLM

    loaded: list = []

    def load(progress):
        if load_gate is not None:
            load_gate.wait()
        loaded.append(LLM(model=model, progress=progress, **llm_kwargs))
        return loaded[0]

    engine = EngineLoop(load, snapshot_interval=0.02)
    engine.start()
    if wait:
        wait_for(lambda: engine.ready, timeout=60)
    server = ServerThread(engine, config).start()
    try:
        yield Running(engine, server, loaded)
    finally:
        server.stop()
        engine.close()
