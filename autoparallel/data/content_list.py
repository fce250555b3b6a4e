"""OpenAI / HF / Anthropic content lists in training records → text with `<image>`/`<video>` placeholders.

A message's `content` may be a list of parts, as `serve` accepts them and as ms-swift and HF processors write them:
`{"type": "text", "text"}`, `{"type": "image", "image" | "url" | "path": ref}`, `{"type": "image_url",
"image_url": {"url"} | url}`, `{"type": "video", "video": ref | [frame refs]}`, `{"type": "video_url",
"video_url": {"url"} | url}`, and Anthropic's `{"type": "image", "source": {"type": "base64", "media_type",
"data"} | {"type": "url", "url"}}`. Parts are concatenated without separators and each media part becomes one
placeholder, exactly as the chat template renders a content list (network/processor.py `apply_chat_template`,
which `serve` uses), so the same list gives the same tokens in training and serving.
"""
from __future__ import annotations

from typing import Any

from autoparallel.data.schema import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, DataError

_MEDIA_KEYS = {"image": ("image", "url", "path", "source"), "image_url": ("image_url",),
               "video": ("video", "url", "path"), "video_url": ("video_url",)}
# qwen_vl_utils' per-part sampling and sizing options: honouring none of them would train on other pixels or
# frames than the record asks for, so a part carrying one is refused (the data options set them for all media).
_MEDIA_OPTIONS = ("nframes", "fps", "min_frames", "max_frames", "min_pixels", "max_pixels", "total_pixels",
                  "resized_height", "resized_width", "video_start", "video_end")


def _media_ref(part: dict, kind: str, where: tuple[str, int], field: str) -> Any:
    key = next((k for k in _MEDIA_KEYS[kind] if part.get(k) is not None), None)
    if key is None:
        raise DataError(*where, f"{field}: a {kind!r} part needs one of {list(_MEDIA_KEYS[kind])}")
    ref = part[key]
    if key == "source":  # Anthropic
        if not isinstance(ref, dict) or ref.get("type") not in ("base64", "url"):
            raise DataError(*where, f"{field}.source: expected {{\"type\": \"base64\" | \"url\", ...}}")
        return ref.get("url") if ref["type"] == "url" else f"data:{ref.get('media_type', '')};base64,{ref.get('data')}"
    if isinstance(ref, dict):  # {"url": ...} of image_url / video_url
        if "url" not in ref:
            raise DataError(*where, f"{field}.{key}: expected {{\"url\": ...}}")
        return ref["url"]
    return ref


def flatten_content(content: list, where: tuple[str, int],
                    field: str) -> tuple[str, list[Any], list[Any], list[str]]:
    """(text with placeholders, image refs, video refs, part keys not read, e.g. OpenAI's "detail") of one
    message's content list, in order; a part with a per-part media option (`_MEDIA_OPTIONS`) is refused."""
    text, images, videos, unread = [], [], [], []
    for j, part in enumerate(content):
        param = f"{field}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        option = next((k for k in _MEDIA_OPTIONS if kind in _MEDIA_KEYS and part.get(k) is not None), None)
        if option is not None:
            raise DataError(*where, f"{param}.{option}: per-part media options are not supported; remove it and "
                                    "set the data options (video_fps, video_maxlen, max_pixels, ...) instead")
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise DataError(*where, f"{param}.text must be a string")
            text.append(part["text"])
            read = {"type", "text"}
        elif kind in _MEDIA_KEYS:
            read = {"type", next((k for k in _MEDIA_KEYS[kind] if part.get(k) is not None), "")}
            ref = _media_ref(part, kind, where, param)
            is_image = kind.startswith("image")
            (images if is_image else videos).append(ref)
            text.append(IMAGE_PLACEHOLDER if is_image else VIDEO_PLACEHOLDER)
        else:
            raise DataError(*where, f"{param}: a content part needs \"type\": one of "
                                    f"{['text', *_MEDIA_KEYS]}, got {kind!r}")
        unread += [f"content part key {k}" for k in sorted(set(part) - read) if part[k] not in (None, "", [], {})]
    return "".join(text), images, videos, unread
