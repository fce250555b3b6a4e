"""HTTP routes: `POST /v1/chat/completions` (JSON or SSE stream), `GET /v1/models`, `GET /health`.

Every error, 404 and 405 included, uses OpenAI's body `{"error": {"message", "type", "param", "code"}}`. Before
any route: the `Host` header must name this server (a DNS-rebinding page cannot read answers), `/v1/` routes need
the `--api_key` when one is set, and POST bodies must be `application/json` (a browser cannot send that
cross-site without a preflight). The body is read here, not by FastAPI, so its size is checked while it arrives
(413 naming `body`) and a stalled upload is dropped after `body_timeout` seconds. Requests with images or videos
prepare them in the media pool (launch/serving/media_pool.py); text-only requests never wait for it. A client
that disconnects is noticed within DISCONNECT_POLL_SECONDS, streaming or not, and cancels its job: the batcher
drops its row at the next decode step.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from launch.serving.batcher import Batcher, Job
from launch.serving.media_pool import MediaPool
from launch.serving.messages import APIError, ChatRequest, MediaLimits, build_prompt, parse_request
from network.generation import GenerationConfig
from network.log import logger
from network.processor import Qwen2VLProcessor

DISCONNECT_POLL_SECONDS = 0.25


@dataclass
class ServerSettings:
    model_name: str
    max_model_len: int  # prompt + completion tokens per request
    limits: MediaLimits
    max_body_bytes: int = 32 << 20
    body_timeout: float = 30.0  # seconds to receive a whole request body
    default_max_tokens: int | None = None  # for requests without max_tokens (None: max_tokens_limit)
    max_tokens_limit: int = 4096  # largest max_tokens a request may ask for
    api_key: str | None = None  # when set, /v1/ routes need `Authorization: Bearer <api_key>`
    allowed_hosts: tuple[str, ...] = ()  # Host header names accepted besides loopback ones ("*": any)
    media_workers: int = 4
    media_queue: int = 16  # media requests that may wait for a media thread before new ones get 503
    media_timeout: float = 60.0  # wall-clock seconds for one request's images and videos
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
    if asked is not None and asked > settings.max_tokens_limit:
        raise APIError(400, f"{field}: {asked} is above the server's limit of {settings.max_tokens_limit} tokens",
                       field)
    if asked is not None and asked > room:
        raise APIError(400, f"{field}: prompt ({prompt_tokens} tokens) + {field} ({asked}) exceeds the model's "
                            f"context of {settings.max_model_len} tokens", field)
    return asked or min(settings.default_max_tokens or settings.max_tokens_limit, settings.max_tokens_limit, room)


class ClientGone(Exception):
    """The client closed the connection before its request was read; there is nobody to answer."""


async def _read_body(request: Request, limit: int, timeout: float) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"body: request body is {declared} bytes, the server's limit is {limit}", "body")
    chunks, size = [], 0

    async def read() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"body: request body is over the server's limit of {limit} bytes", "body")
            chunks.append(chunk)

    try:
        await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError:
        chunks.clear()  # a stalled upload holds no memory while its 408 goes out
        raise APIError(408, f"body: the request body did not arrive within {timeout:g} s", "body",
                       "timeout_error") from None
    except ClientDisconnect:
        raise ClientGone() from None
    return b"".join(chunks)


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or address) is this machine's loopback: "localhost", 127.0.0.0/8 or ::1."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _host_name(header: str) -> str:
    """The name in a Host header, without its port ("[::1]:8000" -> "::1")."""
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.rpartition(":")[0] if header.count(":") == 1 else header


class _Gate:
    """ASGI middleware run before any route: Host check, API key, JSON content type (see the module doc)."""

    def __init__(self, app: ASGIApp, settings: ServerSettings):
        self.app, self.settings = app, settings
        self.key = settings.api_key.encode() if settings.api_key else None

    def refusal(self, scope: Scope) -> APIError | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = _host_name(headers.get("host", "")).lower()
        allowed = self.settings.allowed_hosts
        if not (is_loopback(host) or host in allowed or "*" in allowed):
            return APIError(400, f"Host header {headers.get('host', '')!r} is not a name of this server (add it "
                                 "with --allowed_hosts)", None, "invalid_host")
        if self.key is not None and scope["path"].startswith("/v1/"):
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.key):
                return APIError(401, "a valid API key is required (Authorization: Bearer <key>)", None,
                                "authentication_error")
        if scope["method"] == "POST":
            media_type = headers.get("content-type", "").partition(";")[0].strip().lower()
            if media_type != "application/json":
                return APIError(415, f"the body must be application/json, not {media_type or 'unspecified'!r}",
                                "content-type")
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal = self.refusal(scope) if scope["type"] == "http" else None
        if refusal is None:
            await self.app(scope, receive, send)
        else:
            await JSONResponse(refusal.body(), status_code=refusal.status)(scope, receive, send)


async def _watch_disconnect(request: Request, job: Job) -> None:
    """Cancel `job` once its client has gone, checked on a clock whether or not tokens are flowing."""
    while not await request.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL_SECONDS)
    job.cancelled.set()
    job.events.put_nowait(("gone",))  # the batcher sends nothing more: this ends the response's wait


def create_app(batcher: Batcher, processor: Qwen2VLProcessor, settings: ServerSettings) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        try:
            yield
        finally:  # uvicorn has drained the in-flight requests by now
            await asyncio.to_thread(batcher.stop)

    media = MediaPool(settings.media_workers, settings.media_queue, settings.media_timeout)
    # No /docs, /redoc, /openapi.json: the API is OpenAI's, and nothing is served that clients do not need.
    app = FastAPI(title="qwen2vl-ap", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_Gate, settings=settings)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        # A body refused unread (too slow, too large) would keep the connection busy: close it instead.
        headers = {"Connection": "close"} if exc.status in (408, 413) else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:  # unknown route, wrong method
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return JSONResponse(APIError(exc.status_code, message, None, kind).body(), status_code=exc.status_code,
                            headers=exc.headers)

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, exc: ClientGone) -> JSONResponse:
        logger.info("client %s closed the connection during its upload", request.client.host if request.client
                    else "?")
        return JSONResponse({}, status_code=499)  # nobody reads it

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:  # logged with its traceback
        return JSONResponse(APIError(500, "internal server error", None, "server_error").body(), status_code=500)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": settings.model_name, "running": batcher.running, "queued": batcher.queued,
                "preparing": batcher.preparing, "media_busy": media.busy, "batches": batcher.batches,
                "cancelled": batcher.cancelled}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": 0,
                                            "owned_by": "qwen2vl-ap", "max_model_len": settings.max_model_len}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        chat = parse_request(await _read_body(request, settings.max_body_bytes, settings.body_timeout))
        if chat.model not in (None, settings.model_name):
            raise APIError(404, f"model {chat.model!r} is not served here (this server has "
                                f"{settings.model_name!r})", "model", "not_found_error")
        try:
            generation = _generation_settings(chat, settings.defaults)
        except ValueError as e:
            raise APIError(400, str(e), None) from None
        batcher.preparing += 1  # only this event-loop thread writes it
        try:
            if chat.has_media():
                prompt = await media.run(build_prompt, chat, processor, settings.limits)
            else:  # only tokenising: never behind the media pool
                prompt = await asyncio.to_thread(build_prompt, chat, processor, settings.limits)
            max_tokens = _max_tokens(chat, prompt.num_tokens, settings)
            stops = [chat.stop] if isinstance(chat.stop, str) else list(chat.stop or [])
            job = Job(prompt.inputs, prompt.num_tokens, max_tokens, generation, stops, asyncio.get_running_loop())
            batcher.submit(job)
        finally:
            batcher.preparing -= 1
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        watcher = asyncio.create_task(_watch_disconnect(request, job))
        if chat.stream:
            usage = chat.stream_options is not None and chat.stream_options.include_usage
            return StreamingResponse(_stream(job, watcher, completion_id, created, settings.model_name, usage),
                                     media_type="text/event-stream")
        try:
            return await _complete(job, completion_id, created, settings.model_name)
        finally:
            watcher.cancel()

    return app


def _usage(job: Job) -> dict:
    return {"prompt_tokens": job.prompt_tokens, "completion_tokens": job.completion_tokens,
            "total_tokens": job.prompt_tokens + job.completion_tokens}


async def _complete(job: Job, completion_id: str, created: int, model: str) -> JSONResponse:
    text = []
    try:
        while True:
            event = await job.events.get()
            if event[0] == "gone":
                return JSONResponse({}, status_code=499)  # nobody reads it
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


async def _stream(job: Job, watcher: asyncio.Task, completion_id: str, created: int, model: str,
                  include_usage: bool) -> AsyncIterator[str]:
    def chunk(delta: dict, finish_reason: str | None = None, **extra) -> str:
        body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
                **extra}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            event = await job.events.get()
            if event[0] == "gone":
                return
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
        watcher.cancel()
