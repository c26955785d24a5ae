"""Who a request is from, as a FastAPI dependency.

Without keys, a request's tenant is its client's address (and the server must be bound to a
loopback address: `config.check_bind`). With keys, every request needs
`Authorization: Bearer KEY` and its tenant is the key's. Keys are compared in constant time.
"""
from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from fastapi import Request

from chatpager.serve.config import ServeConfig
from chatpager.serve.errors import APIError


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str


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
