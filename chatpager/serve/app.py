"""The FastAPI app: routes, the tenant dependency, error handlers, and the bridge's lifetime.

Routes only parse, authenticate and hand over to the serving modules; nothing here touches
the engine (the EngineLoop is reached through the bridge).
"""
from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse

from chatpager.engine.loop.client import EngineLoop
from chatpager.serve.auth import Tenant, tenant_dependency
from chatpager.serve.bridge import EngineBridge
from chatpager.serve.config import ServeConfig
from chatpager.serve.errors import error_body, install_error_handlers
from chatpager.serve.metrics import ServerMetrics
from chatpager.serve.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from chatpager.serve.serving import json_response, ServeContext
from chatpager.serve.serving_chat import create_chat_completion
from chatpager.serve.serving_completions import create_completion

PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


def create_app(engine: EngineLoop, config: ServeConfig) -> FastAPI:
    """An app serving `engine` (started by the caller; it may still be loading)."""
    ctx = ServeContext(EngineBridge(engine, config.max_waiting), ServerMetrics(engine), config)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        ctx.bridge.attach()
        yield

    app = FastAPI(title="chatpager", summary="OpenAI-compatible API on chatpager's paged engine",
                  lifespan=lifespan)
    app.state.ctx = ctx
    install_error_handlers(app)
    tenant = Depends(tenant_dependency(config))

    @app.get("/health")
    async def health() -> Response:
        if engine.ready:
            return JSONResponse({"status": "ok"})
        status = "loading" if engine.is_alive() and engine.model_info is None else "unavailable"
        return JSONResponse(error_body(503, f"the engine is {status}").model_dump(), 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(ctx.metrics.render(), media_type=PROMETHEUS_TEXT)

    @app.get("/v1/models", dependencies=[tenant])
    async def models() -> Response:
        name = ctx.model_name
        cards = [ModelCard(id=name), *(ModelCard(id=a, parent=name) for a in ctx.lora_adapters)] if name else []
        return json_response(ModelList(data=cards))

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request, who: Tenant = tenant) -> Response:
        return await create_chat_completion(req, request, who, ctx)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request, who: Tenant = tenant) -> Response:
        return await create_completion(req, request, who, ctx)

    return app
