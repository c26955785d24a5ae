"""What the app is started with: the command line's options, as one record."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import platformdirs

from chatpager.engine.sampling_params import SamplingParams
from chatpager.engine_args import EngineArgs
from chatpager.prompts import PROMPTS_DIR
from chatpager.serve.config import ServeConfig

DEFAULT_PARAMS = SamplingParams(temperature=0.7, top_p=0.9, max_tokens=512)
DEMO_NUM_BLOCKS = 96  # the pool of `chatpager --demo`: small enough to fill in a minute


def default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir("chatpager", appauthor=False))


@dataclass(frozen=True, slots=True)
class AppConfig:
    engine: EngineArgs = field(default_factory=EngineArgs)  # what LLM(...) is built with
    swarm: int = 0  # tenants to start with
    demo: bool = False  # start the guided demo
    data_dir: Path = field(default_factory=default_data_dir)
    params: SamplingParams = field(  # a session's /set overrides its own copy
        default_factory=lambda: dataclasses.replace(DEFAULT_PARAMS))
    swarm_params: SamplingParams = field(
        default_factory=lambda: SamplingParams(temperature=0.7, top_p=0.9, max_tokens=64)
    )
    prompts_dir: Path = PROMPTS_DIR
    refresh_interval: float = 0.25  # seconds between refreshes of the cache view and sidebar
    serve: ServeConfig | None = None  # --serve: the OpenAI-compatible server on this engine
    engine_process: bool = True  # the engine's core in a process of its own (False: a thread of the app's)

    @property
    def database(self) -> Path:
        return self.data_dir / "chatpager.sqlite3"
