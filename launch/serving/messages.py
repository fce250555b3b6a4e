"""OpenAI chat-completions requests -> the processor's input, with every limit checked.

Content parts: `{"type": "text", "text"}`, `{"type": "image_url", "image_url": {"url"}}` (also qwen-vl-utils'
`{"type": "image", "image": url}`), and videos as Qwen-VL clients send them: `{"type": "video_url",
"video_url": {"url"}}` (a video file) or `{"type": "video", "video": url | [frame urls]}` (a file or a frame
list). A url is a local path, `file://...`, `data:<mime>;base64,...`, or http(s) when the server allows remote
media. Every problem is an `APIError` whose `param` names the field, e.g. `messages[0].content[1].image_url`.
"""
from __future__ import annotations

import base64
import binascii
import io
import os
import tempfile
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any, Literal, Union

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from network.processor import Qwen2VLProcessor
from network.video import load_video


class APIError(Exception):
    """An OpenAI-style error response: HTTP status, message, and the request field it is about."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


# ---- request schema ---------------------------------------------------------------------------------------
class _Schema(BaseModel):
    # strict: `"5"` is not a number and `"yes"` not a boolean; forbid: a field this server does not know is an
    # error, never silently ignored.
    model_config = ConfigDict(extra="forbid", strict=True)


class MediaURL(_Schema):
    url: str
    detail: str | None = None


class ContentPart(_Schema):
    type: Literal["text", "image_url", "image", "video_url", "video"]
    text: str | None = None
    image_url: Union[MediaURL, str, None] = None
    image: str | None = None
    video_url: Union[MediaURL, str, None] = None
    video: Union[str, list[str], None] = None


class Message(_Schema):
    role: Literal["system", "user", "assistant"]
    content: Union[str, list[ContentPart]]


class StreamOptions(_Schema):
    include_usage: bool = False


MAX_STOP_CHARS = 256  # per stop string; the decode loop checks every stop string at every token


class ChatRequest(_Schema):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)  # -1 (vLLM) or 0: no top-k
    repetition_penalty: float | None = Field(default=None, gt=0)
    stop: Union[str, list[str], None] = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(default=None, ge=0, lt=2**64)  # numpy's generator refuses negative seeds
    logprobs: bool | None = None
    user: str | None = None  # an end-user id for the client's own records; it changes no answer
    # OpenAI parameters this server does not implement: accepted only at their no-op values (`_unsupported`).
    top_logprobs: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Union[str, dict[str, Any], None] = None

    def has_media(self) -> bool:
        """Whether any message carries an image or a video (their preparation runs in the media pool)."""
        return any(isinstance(m.content, list) and any(part.type != "text" for part in m.content)
                   for m in self.messages)


def _unsupported(request: ChatRequest) -> str | None:
    """The first parameter set to a value that would change the answer in a way this server cannot honour."""
    no_op = {"logprobs": request.logprobs in (None, False), "top_logprobs": not request.top_logprobs,
             "frequency_penalty": not request.frequency_penalty, "presence_penalty": not request.presence_penalty,
             "logit_bias": not request.logit_bias, "tools": not request.tools,
             "tool_choice": request.tool_choice in (None, "none", "auto"),
             "response_format": request.response_format in (None, {"type": "text"})}
    return next((name for name, ok in no_op.items() if not ok), None)


def parse_request(body: bytes) -> ChatRequest:
    """The validated request; schema problems are a 400 naming the first bad field."""
    try:
        request = ChatRequest.model_validate_json(body)
    except ValidationError as e:
        first = e.errors()[0]
        param = _dotted(first["loc"]) or "body"
        raise APIError(400, f"{param}: {first['msg']}", param) from None
    if request.n != 1:
        raise APIError(400, f"n={request.n}: only n=1 is supported", "n")
    unsupported = _unsupported(request)
    if unsupported:
        raise APIError(400, f"{unsupported}: not supported by this server (leave it out)", unsupported)
    stops = [request.stop] if isinstance(request.stop, str) else request.stop or []
    if len(stops) > 4 or any(not s for s in stops):
        raise APIError(400, "stop: at most 4 non-empty strings", "stop")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise APIError(400, f"stop: each stop string may have at most {MAX_STOP_CHARS} characters", "stop")
    return request


_SCHEMA_NAMES = {"MediaURL", "ContentPart", "Message", "StreamOptions", "str", "int", "float", "bool", "dict"}


def _dotted(loc: tuple) -> str:
    """Pydantic's error location as the request field, without the union-branch labels it inserts
    (`str`, `list[ContentPart]`, `MediaURL`, `function-...`)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not (part in _SCHEMA_NAMES or "[" in part or part.startswith("function-")):
            out += f".{part}" if out else str(part)
    return out


# ---- media --------------------------------------------------------------------------------------------------
@dataclass
class MediaLimits:
    max_images: int = 8  # images per request
    max_videos: int = 2  # videos per request
    max_image_pixels: int = 4096 * 4096  # decoded size of one image or video frame, before resizing
    max_video_frames: int = 64  # frames sampled from one video
    allow_remote: bool = False
    media_dir: str | None = None  # when set, local paths must lie inside it
    remote_timeout: float = 10.0
    max_remote_bytes: int = 64 << 20


@dataclass
class Prompt:
    """A request turned into processor inputs (batch 1) plus its token count."""
    inputs: dict[str, np.ndarray]
    num_tokens: int


def _fetch(url: str, param: str, limits: MediaLimits) -> bytes | str:
    """Bytes (data: / http URLs) or a checked local path."""
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if not header.endswith(";base64"):
            raise APIError(400, f"{param}: data URLs must be base64 (data:<mime>;base64,...)", param)
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise APIError(400, f"{param}: invalid base64 data ({e})", param) from None
    scheme = urllib.parse.urlparse(url).scheme
    if scheme in ("http", "https"):
        if not limits.allow_remote:
            raise APIError(400, f"{param}: remote media URLs are disabled on this server "
                                "(start it with --allow_remote_media)", param)
        try:
            with urllib.request.urlopen(url, timeout=limits.remote_timeout) as response:
                data = response.read(limits.max_remote_bytes + 1)
        except OSError as e:
            raise APIError(400, f"{param}: cannot fetch {url!r}: {e}", param) from None
        if len(data) > limits.max_remote_bytes:
            raise APIError(413, f"{param}: remote file larger than {limits.max_remote_bytes} bytes", param)
        return data
    path = urllib.parse.unquote(urllib.parse.urlparse(url).path) if scheme == "file" else url
    if scheme not in ("", "file"):
        raise APIError(400, f"{param}: unsupported URL scheme {scheme!r}", param)
    path = os.path.realpath(path)
    if limits.media_dir and os.path.commonpath([path, os.path.realpath(limits.media_dir)]) != os.path.realpath(
            limits.media_dir):
        raise APIError(403, f"{param}: local files outside the server's --media_dir are not readable", param)
    if not os.path.exists(path):
        raise APIError(400, f"{param}: file not found: {url}", param)
    return path


def _image(url: str, param: str, limits: MediaLimits) -> Image.Image:
    source = _fetch(url, param, limits)
    try:
        image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        pixels = image.width * image.height
        if pixels > limits.max_image_pixels:  # checked from the header, before decoding
            raise APIError(400, f"{param}: image is {image.width}x{image.height} = {pixels} pixels, above the "
                                f"server's limit of {limits.max_image_pixels}", param)
        image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise APIError(400, f"{param}: cannot decode image: {e}", param) from None
    return image


def _video(source: str | list[str], param: str, limits: MediaLimits) -> list[np.ndarray]:
    try:
        if isinstance(source, list):
            frames = load_video([_image(u, f"{param}[{i}]", limits) for i, u in enumerate(source)],
                                max_frames=limits.max_video_frames)
        else:
            data = _fetch(source, param, limits)
            if isinstance(data, bytes):  # PyAV reads files: spill data/remote videos to a temporary one
                with tempfile.NamedTemporaryFile(suffix=".video") as f:
                    f.write(data)
                    f.flush()
                    frames = load_video(f.name, max_frames=limits.max_video_frames)
            else:
                frames = load_video(data, max_frames=limits.max_video_frames)
    except (OSError, ValueError) as e:
        raise APIError(400, f"{param}: cannot read video: {e}", param) from None
    h, w = frames[0].shape[:2]
    if h * w > limits.max_image_pixels:
        raise APIError(400, f"{param}: video frames are {w}x{h} = {h * w} pixels, above the server's limit of "
                            f"{limits.max_image_pixels}", param)
    return frames


def build_prompt(request: ChatRequest, processor: Qwen2VLProcessor, limits: MediaLimits) -> Prompt:
    """Chat-template text with one vision span per image/video, the decoded media, and the processor output."""
    messages, images, videos = [], [], []
    for i, message in enumerate(request.messages):
        content = message.content
        if isinstance(content, str):
            messages.append({"role": message.role, "content": content})
            continue
        parts = []
        for j, part in enumerate(content):
            param = f"messages[{i}].content[{j}]"
            if part.type == "text":
                if part.text is None:
                    raise APIError(400, f"{param}.text: missing", f"{param}.text")
                parts.append({"type": "text", "text": part.text})
                continue
            if message.role != "user":
                raise APIError(400, f"{param}: images and videos belong in user messages", param)
            kind = "image" if part.type in ("image_url", "image") else "video"
            source = getattr(part, part.type)  # the field named like the part type holds the media
            source = source.url if isinstance(source, MediaURL) else source
            field = f"{param}.{part.type}"
            if not source:
                raise APIError(400, f"{field}: missing", field)
            found, limit = (images, limits.max_images) if kind == "image" else (videos, limits.max_videos)
            if len(found) == limit:
                raise APIError(400, f"{param}: more than {limit} {kind}s in one request", param)
            found.append(_image(source, field, limits) if kind == "image" else _video(source, field, limits))
            parts.append({"type": kind})
        messages.append({"role": message.role, "content": parts})
    if messages[-1]["role"] == "assistant":
        raise APIError(400, "messages: the last message must not be the assistant's", "messages")
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    try:
        inputs = processor(text, images=images or None, videos=videos or None)
    except (OSError, ValueError) as e:
        raise APIError(400, f"messages: cannot prepare the media: {e}", "messages") from None
    return Prompt(inputs, int(inputs["input_ids"].shape[1]))
