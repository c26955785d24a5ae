"""POST /v1/chat/completions: OpenAI chat requests as engine requests, and back.

The messages are rendered with the model's chat template in the engine's core (the same
`encode_chat` that `LLM.chat` uses), so a greedy reply equals `LLM.chat`'s for them.
"""
from __future__ import annotations

import time

from fastapi import Request, Response
from fastapi.responses import StreamingResponse

from chatpager.serve.auth import Tenant
from chatpager.serve.protocol import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion,
                                      ChatCompletionChunk, ChatCompletionRequest, Delta, Usage)
from chatpager.serve.serving import (CLIENT_GONE, ChoiceDelta, ServeContext, check_fields, completed,
                                     json_response, sampling_params, streamed)


async def create_chat_completion(req: ChatCompletionRequest, request: Request, tenant: Tenant,
                                 ctx: ServeContext) -> Response:
    check_fields(req)
    params = sampling_params(req, req.max_completion_tokens or req.max_tokens)
    messages = req.chat()
    gen = await ctx.start(req, tenant, messages, params,
                    tuple((m["role"], m["content"]) for m in messages), "chatcmpl")
    model, created = req.model, int(time.time())
    if not req.stream:
        if not await completed(request, gen):
            return Response(status_code=CLIENT_GONE)
        choices = [ChatChoice(index=c.index, message=AssistantMessage(content=c.text),
                              finish_reason=c.finish_reason) for c in gen.choices.values()]
        return json_response(ChatCompletion(id=gen.request_id, created=created, model=model,
                                            choices=choices, usage=gen.usage()))

    def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=gen.request_id, created=created, model=model,
                                   choices=choices, usage=usage)

    def deltas(batch: list[ChoiceDelta]) -> ChatCompletionChunk:
        return chunk([ChatChunkChoice(index=d.index, delta=Delta(content=d.text or None),
                                      finish_reason=d.finish_reason) for d in batch])

    first = chunk([ChatChunkChoice(index=i, delta=Delta(role="assistant", content=""))
                   for i in range(req.n)])
    usage = (lambda u: chunk([], u)) if req.include_usage else None
    return StreamingResponse(streamed(gen, deltas, usage, first), media_type="text/event-stream")

