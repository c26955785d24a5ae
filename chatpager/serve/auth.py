"""Tenants and keys: who a request is from, as a FastAPI dependency.

Without keys, a request's tenant is its client's address (and the server must be bound to a
loopback address: `check_bind`). With keys (`--api-key KEY`, or `--api-keys FILE` of
`tenant: key` lines), every request needs `Authorization: Bearer KEY` and its tenant is the
key's. Keys are compared in constant time.
"""
from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from fastapi import Request

from chatpager.errors import ChatpagerError
from chatpager.serve.config import ServeConfig
from chatpager.serve.errors import APIError

SINGLE_KEY_TENANT = "default"


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str


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


def tenant_dependency(config: ServeConfig) -> Callable[[Request], Awaitable[Tenant]]:
    async def tenant(request: Request) -> Tenant:
        if not config.api_keys:
            return Tenant(request.client.host if request.client else "local")
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        found = None
        for key, name in config.api_keys.items():  # every key compared: no early exit to time
            if hmac.compare_digest(key.encode(), token.strip().encode()):
                found = name
        if scheme.lower() != "bearer" or found is None:
            raise APIError(401, "a valid API key is required: Authorization: Bearer KEY",
                           "invalid_api_key")
        return Tenant(found)

    return tenant
