"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with its status.

Handlers are installed on the app, so routes raise `APIError` (or let FastAPI's validation
raise) and every failure leaves the server in one shape. Statuses: 400 bad input (malformed
JSON, missing or invalid fields, a prompt the engine cannot hold), 401 bad key, 404 unknown
model or route, 429 too many requests waiting, 500 the engine failed, 503 not ready.
"""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from chatpager.serve.protocol import ErrorInfo, ErrorResponse

log = logging.getLogger("chatpager.serve")

TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
         405: "invalid_request_error", 429: "requests", 500: "server_error", 503: "server_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param

    def body(self) -> ErrorResponse:
        return error_body(self.status, self.message, self.code, self.param)


def error_body(status: int, message: str, code: str | None = None,
               param: str | None = None) -> ErrorResponse:
    kind = TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return ErrorResponse(error=ErrorInfo(message=message, type=kind, param=param, code=code))


def _response(status: int, body: ErrorResponse, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return _response(exc.status, exc.body(), headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        where = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = ".".join(where) or None
        message = first.get("msg", "invalid request")
        if param:
            message = f"{param}: {message}"
        return _response(400, error_body(400, message, "invalid_value", param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _response(exc.status_code, error_body(exc.status_code, str(exc.detail)))

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error serving a request")
        return _response(500, error_body(500, f"internal error: {type(exc).__name__}: {exc}"))
