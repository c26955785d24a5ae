"""What a server is started with: the command line's serving options, as one record, and
the checks made before it starts (keys file, bind address). No web framework is imported
here: the TUI parses `--serve` options before anything heavy loads.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from chatpager.errors import ChatpagerError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
SINGLE_KEY_TENANT = "default"  # the tenant of --api-key KEY


@dataclass(frozen=True, slots=True)
class ServeConfig:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT  # 0: any free port
    api_keys: dict[str, str] = field(default_factory=dict)  # key -> tenant; empty: no auth
    isolate_tenants: bool = False  # salt each tenant's prefix-cache entries with its name
    max_waiting: int | None = None  # requests waiting for the engine before 429; None: no bound
    served_model_name: str | None = None  # None: the loaded model's name

    def __post_init__(self) -> None:
        if self.max_waiting is not None and self.max_waiting < 1:
            raise ValueError(f"max_waiting must be at least 1, got {self.max_waiting}")


def load_api_keys(path: Path) -> dict[str, str]:
    """key -> tenant, from `tenant: key` lines (blank lines and # comments skipped)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ChatpagerError(f"cannot read the API keys file {path}: {exc.strerror}") from None
    keys: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        tenant, sep, key = (part.strip() for part in line.partition(":"))
        if not sep or not tenant or not key:
            raise ChatpagerError(f"{path}:{number}: expected 'tenant: key'")
        if key in keys:
            raise ChatpagerError(f"{path}:{number}: this key is already given to {keys[key]!r}")
        keys[key] = tenant
    if not keys:
        raise ChatpagerError(f"{path} holds no 'tenant: key' lines")
    return keys


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(config: ServeConfig) -> None:
    """Refuse to serve other machines without keys."""
    if not config.api_keys and not is_loopback(config.host):
        raise ChatpagerError(
            f"refusing to listen on {config.host} without API keys: anyone who can reach it could "
            f"use the model and read timing of others' cached prompts. Give --api-key KEY or "
            f"--api-keys FILE, or bind 127.0.0.1")
