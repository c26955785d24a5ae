"""What the app is started with: the command line's options, as one record."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import platformdirs

from chatpager.engine.sampling_params import SamplingParams


def default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir("chatpager", appauthor=False))


@dataclass(frozen=True, slots=True)
class AppConfig:
    model: str | None = None  # None: the default model
    num_blocks: int | None = None
    block_size: int = 16
    attention: str = "auto"
    device: str = "auto"
    dtype: str = "auto"
    swarm: int = 0  # tenants to start with
    data_dir: Path = field(default_factory=default_data_dir)
    params: SamplingParams = field(
        default_factory=lambda: SamplingParams(temperature=0.7, top_p=0.9, max_tokens=512)
    )
    swarm_params: SamplingParams = field(
        default_factory=lambda: SamplingParams(temperature=0.7, top_p=0.9, max_tokens=64)
    )
    refresh_interval: float = 0.25  # seconds between refreshes of the cache view and sidebar

    @property
    def database(self) -> Path:
        return self.data_dir / "chatpager.sqlite3"
