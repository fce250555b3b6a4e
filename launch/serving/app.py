"""HTTP routes: `POST /v1/chat/completions` (JSON or SSE stream), `GET /v1/models`, `GET /health`.

Errors use OpenAI's body `{"error": {"message", "type", "param", "code"}}`. The body is read here, not by
FastAPI, so its size is checked while it arrives (413 naming `body`). Media decoding and preprocessing run in a
worker thread, so a large image does not stall other connections. A client that disconnects cancels its job:
the batcher drops its row at the next decode step.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from launch.serving.batcher import Batcher, Job
from launch.serving.messages import APIError, ChatRequest, MediaLimits, build_prompt, parse_request
from network.generation import GenerationConfig
from network.processor import Qwen2VLProcessor

DISCONNECT_POLL_SECONDS = 0.5


@dataclass
class ServerSettings:
    model_name: str
    max_model_len: int  # prompt + completion tokens per request
    limits: MediaLimits
    max_body_bytes: int = 32 << 20
    default_max_tokens: int = 512
    # Sampling settings of requests that leave them out.
    defaults: GenerationConfig = field(default_factory=GenerationConfig)


def _generation_settings(request: ChatRequest, defaults: GenerationConfig) -> GenerationConfig:
    def pick(value, default):
        return default if value is None else value

    top_k = pick(request.top_k, defaults.top_k)
    return GenerationConfig(temperature=pick(request.temperature, defaults.temperature),
                            top_p=pick(request.top_p, defaults.top_p), top_k=max(top_k, 0),
                            repetition_penalty=pick(request.repetition_penalty, defaults.repetition_penalty),
                            seed=request.seed)


def _max_tokens(request: ChatRequest, prompt_tokens: int, settings: ServerSettings) -> int:
    room = settings.max_model_len - prompt_tokens
    if room < 1:
        raise APIError(400, f"messages: the prompt is {prompt_tokens} tokens, the model's context is "
                            f"{settings.max_model_len}", "messages")
    asked = request.max_completion_tokens or request.max_tokens
    field = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
    if asked is not None and asked > room:
        raise APIError(400, f"{field}: prompt ({prompt_tokens} tokens) + {field} ({asked}) exceeds the model's "
                            f"context of {settings.max_model_len} tokens", field)
    return asked or min(settings.default_max_tokens, room)


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"body: request body is {declared} bytes, the server's limit is {limit}", "body")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"body: request body is over the server's limit of {limit} bytes", "body")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(batcher: Batcher, processor: Qwen2VLProcessor, settings: ServerSettings) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        try:
            yield
        finally:  # uvicorn has drained the in-flight requests by now
            await asyncio.to_thread(batcher.stop)

    app = FastAPI(title="qwen2vl-ap", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": settings.model_name, "running": batcher.running, "queued": batcher.queued,
                "batches": batcher.batches, "cancelled": batcher.cancelled}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": 0,
                                            "owned_by": "qwen2vl-ap", "max_model_len": settings.max_model_len}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        chat = parse_request(await _read_body(request, settings.max_body_bytes))
        if chat.model not in (None, settings.model_name):
            raise APIError(404, f"model {chat.model!r} is not served here (this server has "
                                f"{settings.model_name!r})", "model", "not_found_error")
        try:
            generation = _generation_settings(chat, settings.defaults)
        except ValueError as e:
            raise APIError(400, str(e), None) from None
        batcher.preparing += 1  # only this event-loop thread writes it
        try:
            prompt = await asyncio.to_thread(build_prompt, chat, processor, settings.limits)
            max_tokens = _max_tokens(chat, prompt.num_tokens, settings)
            stops = [chat.stop] if isinstance(chat.stop, str) else list(chat.stop or [])
            job = Job(prompt.inputs, prompt.num_tokens, max_tokens, generation, stops, asyncio.get_running_loop())
            batcher.submit(job)
        finally:
            batcher.preparing -= 1
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if chat.stream:
            usage = chat.stream_options is not None and chat.stream_options.include_usage
            return StreamingResponse(_stream(job, completion_id, created, settings.model_name, usage),
                                     media_type="text/event-stream")
        return await _complete(job, request, completion_id, created, settings.model_name)

    return app


def _usage(job: Job) -> dict:
    return {"prompt_tokens": job.prompt_tokens, "completion_tokens": job.completion_tokens,
            "total_tokens": job.prompt_tokens + job.completion_tokens}


async def _complete(job: Job, request: Request, completion_id: str, created: int, model: str) -> JSONResponse:
    text = []
    try:
        while True:
            try:
                event = await asyncio.wait_for(job.events.get(), DISCONNECT_POLL_SECONDS)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancelled.set()
                    return JSONResponse({}, status_code=499)
                continue
            if event[0] == "delta":
                text.append(event[1])
            elif event[0] == "error":
                raise APIError(500, event[1], None, "server_error")
            else:
                break
    except asyncio.CancelledError:
        job.cancelled.set()
        raise
    return JSONResponse({
        "id": completion_id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                     "finish_reason": event[1], "logprobs": None}],
        "usage": _usage(job),
    })


async def _stream(job: Job, completion_id: str, created: int, model: str, include_usage: bool
                  ) -> AsyncIterator[str]:
    def chunk(delta: dict, finish_reason: str | None = None, **extra) -> str:
        body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
                **extra}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            event = await job.events.get()
            if event[0] == "delta":
                yield chunk({"content": event[1]})
            elif event[0] == "error":
                yield f"data: {json.dumps(APIError(500, event[1], None, 'server_error').body())}\n\n"
                break
            else:
                yield chunk({}, event[1])
                if include_usage:
                    body = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                            "model": model, "choices": [], "usage": _usage(job)}
                    yield f"data: {json.dumps(body)}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:  # also when the client disconnected and the response task was cancelled
        job.cancelled.set()
