"""POST /v1/completions: one prompt (text or token ids) as an engine request, and back."""
from __future__ import annotations

import time

from fastapi import Request, Response
from fastapi.responses import StreamingResponse

from chatpager.serve.auth import Tenant
from chatpager.serve.errors import APIError
from chatpager.serve.protocol import Completion, CompletionChoice, CompletionRequest, Usage
from chatpager.serve.serving import (CLIENT_GONE, ChoiceDelta, ServeContext, check_fields, completed,
                                     json_response, sampling_params, streamed)


def single_prompt(prompt: str | list) -> str | list[int]:
    """The request's one prompt; a one-element batch is unwrapped."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise APIError(400, f"one prompt per request, got {len(prompt)}", "invalid_value", "prompt")
        prompt = prompt[0]
    if not prompt:
        raise APIError(400, "the prompt is empty", "invalid_value", "prompt")
    return prompt


async def create_completion(req: CompletionRequest, request: Request, tenant: Tenant,
                            ctx: ServeContext) -> Response:
    check_fields(req)
    prompt = single_prompt(req.prompt)
    shown = prompt if isinstance(prompt, str) else f"[{len(prompt)} token ids]"
    gen = await ctx.start(req, tenant, prompt, sampling_params(req, req.max_tokens),
                    (("prompt", shown),), "cmpl")
    model, created = req.model, int(time.time())

    def completion(choices: list[CompletionChoice], usage: Usage | None = None) -> Completion:
        return Completion(id=gen.request_id, created=created, model=model, choices=choices,
                          usage=usage)

    if not req.stream:
        if not await completed(request, gen):
            return Response(status_code=CLIENT_GONE)
        choices = [CompletionChoice(index=c.index, text=c.text, finish_reason=c.finish_reason)
                   for c in gen.choices.values()]
        return json_response(completion(choices, gen.usage()))

    def deltas(batch: list[ChoiceDelta]) -> Completion:
        return completion([CompletionChoice(index=d.index, text=d.text, finish_reason=d.finish_reason)
                           for d in batch])

    usage = (lambda u: completion([], u)) if req.include_usage else None
    return StreamingResponse(streamed(gen, deltas, usage), media_type="text/event-stream")
