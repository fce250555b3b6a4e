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
import contextlib
import http.client
import io
import ipaddress
import os
import socket
import ssl
import stat
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Literal, Union

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from network.image_processing import to_rgb
from network.processor import Qwen2VLProcessor
from network.video import FRAME_FACTOR, decode_video, frame_files, probe_video, sample_frame_indices, subsample_frames


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
    media_dir: str | None = None  # local paths are readable only below it; without it no local file is read
    remote_timeout: float = 10.0  # seconds for a whole remote fetch, redirects included
    max_remote_bytes: int = 64 << 20  # also the size cap of one local image file
    max_redirects: int = 3
    context_tokens: int | None = None  # prompts that leave no room below it are refused before decoding media


@dataclass
class Prompt:
    """A request turned into processor inputs (batch 1) plus its token count."""
    inputs: dict[str, np.ndarray]
    num_tokens: int


def _unreadable(param: str) -> APIError:
    """The one answer for media that is missing, not a regular file, unreachable or undecodable: it must not tell
    these apart (an existence or port-scan oracle) nor echo a resolved path."""
    return APIError(400, f"{param}: the media could not be read", param)


def _local_path(url: str, param: str, limits: MediaLimits) -> str:
    """Real path of a local path or file:// URL below --media_dir (relative paths are relative to it)."""
    if not limits.media_dir:
        raise APIError(400, f"{param}: local files are not readable on this server (start it with --media_dir)",
                       param)
    path = urllib.parse.unquote(urllib.parse.urlparse(url).path) if url.startswith("file:") else url
    if "\0" in path:
        raise _unreadable(param)
    root = os.path.realpath(limits.media_dir)
    path = os.path.realpath(os.path.join(root, path))
    if os.path.commonpath([path, root]) != root:
        raise APIError(403, f"{param}: local files outside the server's --media_dir are not readable", param)
    return path


def _open_regular(path: str, param: str) -> BinaryIO:
    """The file at a checked real path, if it is a regular file; opened without blocking (a FIFO or device would
    block or have side effects) and without following a symlink swapped in since the check."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        raise _unreadable(param) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise _unreadable(param)
    return os.fdopen(fd, "rb")


def _public_address(host: str, port: int) -> str | None:
    """An address of `host` when all of them are public (no loopback, private, link-local, multicast, reserved or
    unspecified target), else None."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return None
    addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    addresses = [a.ipv4_mapped or a if isinstance(a, ipaddress.IPv6Address) else a for a in addresses]
    if not addresses or not all(a.is_global and not a.is_multicast for a in addresses):
        return None
    return str(addresses[0])


def _fetch_remote(url: str, param: str, limits: MediaLimits) -> bytes:
    """GET an http(s) URL from a vetted public address, following redirects by hand (each hop vetted again), within
    one wall-clock deadline and size cap. Every failure is the same error."""
    deadline = time.monotonic() + limits.remote_timeout
    for _ in range(limits.max_redirects + 1):
        try:
            parts = urllib.parse.urlsplit(url)
            https = parts.scheme.lower() == "https"
            port = parts.port or (443 if https else 80)
        except ValueError:
            raise _unreadable(param) from None
        address = _public_address(parts.hostname, port) if parts.scheme.lower() in ("http", "https") and \
            parts.hostname else None
        if address is None:
            raise _unreadable(param)
        try:
            status, location, body = _get(parts, address, port, https, deadline, limits.max_remote_bytes)
        except (OSError, http.client.HTTPException):  # ssl errors and the deadline are OSErrors too
            raise _unreadable(param) from None
        if location is None:
            if status != 200:
                raise _unreadable(param)
            if len(body) > limits.max_remote_bytes:
                raise APIError(413, f"{param}: remote file larger than {limits.max_remote_bytes} bytes", param)
            return body
        url = urllib.parse.urljoin(url, location)
    raise _unreadable(param)


def _get(parts: urllib.parse.SplitResult, address: str, port: int, https: bool, deadline: float,
         max_bytes: int) -> tuple[int, str | None, bytes]:
    """(status, redirect location or None, body up to max_bytes + 1) of one GET sent to `address`."""
    def remaining() -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("remote fetch deadline")
        return left

    sock = socket.create_connection((address, port), timeout=remaining())

    def expire() -> None:  # per-read timeouts do not bound a peer that drips bytes: end any read at the deadline
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)

    watchdog = threading.Timer(remaining(), expire)
    watchdog.start()
    try:
        if https:
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=parts.hostname)
        connection = (http.client.HTTPSConnection if https else http.client.HTTPConnection)(parts.hostname, port)
        connection.sock = sock  # connected to the vetted address, not to a second DNS answer
        connection.request("GET", urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, "")),
                           headers={"Accept-Encoding": "identity", "User-Agent": "qwen2vl-ap"})
        response = connection.getresponse()
        if response.status in (301, 302, 303, 307, 308):
            return response.status, response.getheader("Location") or "", b""
        chunks, size = [], 0
        while size <= max_bytes:
            chunk = response.read1(1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        remaining()  # a read ended by the watchdog is a failure, not the end of the body
        return response.status, None, b"".join(chunks)
    finally:
        watchdog.cancel()
        sock.close()


@dataclass
class _Local:
    """A checked local media path (a regular file or a frame directory below --media_dir)."""
    path: str


def _fetch(url: str, param: str, limits: MediaLimits) -> bytes | _Local:
    """Bytes (data: / http URLs) or a checked local path."""
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if not header.endswith(";base64"):
            raise APIError(400, f"{param}: data URLs must be base64 (data:<mime>;base64,...)", param)
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise APIError(400, f"{param}: invalid base64 data ({e})", param) from None
    scheme = urllib.parse.urlparse(url).scheme.lower() if "\0" not in url else ""
    if scheme in ("http", "https"):
        if not limits.allow_remote:
            raise APIError(400, f"{param}: remote media URLs are disabled on this server "
                                "(start it with --allow_remote_media)", param)
        return _fetch_remote(url, param, limits)
    if scheme not in ("", "file"):
        raise APIError(400, f"{param}: unsupported URL scheme {scheme!r}", param)
    return _Local(_local_path(url, param, limits))


def _read_local(local: _Local, param: str, limit: int) -> bytes:
    with _open_regular(local.path, param) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise APIError(413, f"{param}: file larger than {limit} bytes", param)
    return data


def _image_header(url: str, param: str, limits: MediaLimits) -> Image.Image:
    """The image, opened from its header only (pixels are decoded by `.load()`), within the pixel limit."""
    source = _fetch(url, param, limits)
    data = source if isinstance(source, bytes) else _read_local(source, param, limits.max_remote_bytes)
    try:
        image = Image.open(io.BytesIO(data))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        raise _unreadable(param) from None
    pixels = image.width * image.height
    if pixels > limits.max_image_pixels:
        raise APIError(400, f"{param}: image is {image.width}x{image.height} = {pixels} pixels, above the "
                            f"server's limit of {limits.max_image_pixels}", param)
    return image


def _decoded(image: Image.Image, param: str) -> Image.Image:
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        raise _unreadable(param) from None
    return image


@dataclass
class _PendingVideo:
    """A video whose size and sampled frame count are known from headers; `decode()` reads the pixels."""
    frames: int
    height: int
    width: int
    decode: Callable[[], list[np.ndarray]]


def _frame_list_video(urls: list[str], param: str, limits: MediaLimits) -> _PendingVideo:
    """Frames subsampled to --max_video_frames before any is opened; the rest opened from headers."""
    kept = subsample_frames(list(enumerate(urls)), limits.max_video_frames)
    images = [(f"{param}[{i}]", _image_header(u, f"{param}[{i}]", limits)) for i, u in kept]

    def decode() -> list[np.ndarray]:
        frames = [np.asarray(to_rgb(_decoded(image, p))) for p, image in images]
        return frames + frames[-1:] * (-len(frames) % FRAME_FACTOR)  # an even count, as network.video pads

    first = images[0][1]
    return _PendingVideo(len(images) + -len(images) % FRAME_FACTOR, first.height, first.width, decode)


def _video(source: str | list[str], param: str, limits: MediaLimits) -> _PendingVideo:
    if isinstance(source, list):
        return _frame_list_video(source, param, limits)
    data = _fetch(source, param, limits)
    if isinstance(data, _Local) and os.path.isdir(data.path):
        try:
            files = frame_files(data.path)
        except (OSError, ValueError):
            raise _unreadable(param) from None
        # each frame goes through the same containment and regular-file checks as a path in the request
        return _frame_list_video(files, param, limits)
    file = io.BytesIO(data) if isinstance(data, bytes) else _open_regular(data.path, param)
    try:
        header = probe_video(file)
    except ValueError:
        file.close()
        raise _unreadable(param) from None
    if header.height * header.width > limits.max_image_pixels:
        file.close()
        raise APIError(400, f"{param}: video frames are {header.width}x{header.height} = "
                            f"{header.height * header.width} pixels, above the server's limit of "
                            f"{limits.max_image_pixels}", param)

    def decode() -> list[np.ndarray]:
        try:
            return decode_video(file, header, max_frames=limits.max_video_frames)
        except ValueError:
            raise _unreadable(param) from None
        finally:
            file.close()

    try:
        count = len(sample_frame_indices(header.total_frames, header.fps, max_frames=limits.max_video_frames))
    except ValueError:
        file.close()
        raise _unreadable(param) from None
    return _PendingVideo(count, header.height, header.width, decode)


def build_prompt(request: ChatRequest, processor: Qwen2VLProcessor, limits: MediaLimits) -> Prompt:
    """Chat-template text with one vision span per image/video, the decoded media, and the processor output.
    The prompt's length is known from media headers, so one over the context is refused before any decoding."""
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
            found.append((field, _image_header(source, field, limits) if kind == "image" else
                          _video(source, field, limits)))
            parts.append({"type": kind})
        messages.append({"role": message.role, "content": parts})
    if messages[-1]["role"] == "assistant":
        raise APIError(400, "messages: the last message must not be the assistant's", "messages")
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    if limits.context_tokens is not None and (images or videos):  # text alone is checked once, by the caller
        try:
            num_tokens = processor.prompt_token_count(
                text, [processor.image_token_count(image.height, image.width) for _, image in images],
                [processor.video_token_count(v.frames, v.height, v.width) for _, v in videos])
        except ValueError:  # a size the resize rule refuses (e.g. an extreme aspect ratio)
            raise APIError(400, "messages: cannot prepare the media", "messages") from None
        if num_tokens >= limits.context_tokens:
            raise APIError(400, f"messages: the prompt is {num_tokens} tokens, the model's context is "
                                f"{limits.context_tokens}", "messages")
    decoded_images = [_decoded(image, field) for field, image in images]
    decoded_videos = [video.decode() for _, video in videos]
    try:
        inputs = processor(text, images=decoded_images or None, videos=decoded_videos or None)
    except (OSError, ValueError) as e:
        raise APIError(400, f"messages: cannot prepare the media: {e}", "messages") from None
    return Prompt(inputs, int(inputs["input_ids"].shape[1]))
