"""What a server is started with: the command line's serving options, as one record."""
from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


@dataclass(frozen=True, slots=True)
class ServeConfig:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT  # 0: any free port
    api_keys: dict[str, str] = field(default_factory=dict)  # key -> tenant; empty: no auth
    isolate_tenants: bool = False  # salt each tenant's prefix-cache entries with its name
    max_waiting: int | None = None  # requests waiting for the engine before 429; None: no bound
    served_model_name: str | None = None  # None: the loaded model's name

    def __post_init__(self) -> None:
        if self.max_waiting is not None and self.max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {self.max_waiting}")
