"""Media references in training records → local files, the forms other frameworks write them in.

An image (or one video) is: a path (a relative one as given, else under the
source's root: `resolve_media`), `file://` URL,
`data:<mime>;base64,...` URI, raw base64 of an image file (ms-swift), or `{"bytes": base64 | null, "path": ...}`
(HF `datasets` Image feature, ms-swift). A video may also be a list of frames, each an image reference.
Inline bytes are written once to a content-addressed file under `cache_dir` (so records stay small and every
process finds the same file). http(s) URLs are refused: training reads every sample many times, on every node, so
remote media must be downloaded first. Messages never print a payload: `describe` elides it.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import tempfile
import urllib.parse
from typing import Any, Optional, Union

from autoparallel.data.schema import DataError

VideoRef = Union[str, tuple[str, ...]]  # a file / frame directory, or a frame list
DEFAULT_CACHE_DIR = os.path.join(tempfile.gettempdir(), "qwen2vl-ap-media")
_BASE64 = re.compile(r"[A-Za-z0-9+/=\s]+")
_MAGIC = ((b"\x89PNG", ".png"), (b"\xff\xd8\xff", ".jpg"), (b"GIF8", ".gif"), (b"BM", ".bmp"),
          (b"RIFF", ".webp"), (b"II*\x00", ".tif"), (b"MM\x00*", ".tif"))


def media_candidates(path: str, root: Optional[str]) -> list[str]:
    """Where a record's media path may be: as given, then under the meta entry's root (relative paths only)."""
    if root is None or os.path.isabs(path):
        return [path]
    return [path, os.path.join(root, path)]


def resolve_media(path: str, root: Optional[str]) -> str:
    """The first existing candidate of `media_candidates`, else the last one (the error then names them all)."""
    candidates = media_candidates(path, root)
    return next((c for c in candidates[:-1] if os.path.exists(c)), candidates[-1])


def describe(ref: Any, limit: int = 60) -> str:
    """A reference as an error message shows it: long inline payloads cut, with their length."""
    text = ref if isinstance(ref, str) else repr(ref)
    return text if len(text) <= limit else f"{text[:limit // 2]}...({len(text)} chars)"


def _extension(data: bytes) -> str:
    return next((ext for magic, ext in _MAGIC if data.startswith(magic)), ".bin")


def _store(data: bytes, cache_dir: str) -> str:
    path = os.path.join(cache_dir, hashlib.sha1(data).hexdigest()[:24] + _extension(data))
    if not os.path.exists(path):
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)  # atomic: ranks writing the same file at once never see half of it
    return path


def _b64(payload: str, where: tuple[str, int], field: str) -> bytes:
    try:
        return base64.b64decode(payload, validate=False)
    except (binascii.Error, ValueError) as e:
        raise DataError(*where, f"{field}: invalid base64 data ({e})", kind="unreadable media") from None


def _looks_like_base64_image(ref: str) -> Optional[bytes]:
    """Raw base64 of an image file (no `data:` prefix), as ms-swift accepts it; None for anything else."""
    if len(ref) < 64 or not _BASE64.fullmatch(ref[:4096]):
        return None
    try:
        data = base64.b64decode(ref[:64], validate=False)
    except (binascii.Error, ValueError):
        return None
    return data if _extension(data) != ".bin" else None


def local_media(ref: Any, where: tuple[str, int], field: str, root: Optional[str], cache_dir: str) -> str:
    """The local file behind one image (or video file) reference; inline data is stored under cache_dir."""
    if isinstance(ref, dict):
        unknown = set(ref) - {"bytes", "path"}
        if unknown or not (ref.get("bytes") or ref.get("path")):
            raise DataError(*where, f'{field}: a media object needs "bytes" (base64) or "path", got keys '
                                    f"{sorted(ref)}")
        if ref.get("bytes"):
            if not isinstance(ref["bytes"], str):
                raise DataError(*where, f'{field}.bytes: expected base64 text')
            return _store(_b64(ref["bytes"], where, field), cache_dir)
        ref = ref["path"]
    if not isinstance(ref, str) or not ref:
        raise DataError(*where, f"{field}: expected a path, URL or base64 string, got {describe(ref)}")
    if ref.startswith("data:"):
        header, _, payload = ref.partition(",")
        if not header.endswith(";base64"):
            raise DataError(*where, f"{field}: data URIs must be base64 (data:<mime>;base64,...), got "
                                    f"{describe(ref)}")
        return _store(_b64(payload, where, field), cache_dir)
    scheme = urllib.parse.urlparse(ref).scheme if "://" in ref else ""
    if scheme == "file":
        return urllib.parse.unquote(urllib.parse.urlparse(ref).path)
    if scheme in ("http", "https"):
        raise DataError(*where, f"{field}: {describe(ref)}: http(s) URLs are not downloaded for training (every "
                                "sample is read many times on every node): download the files and give local paths",
                        kind="missing media")
    if scheme:
        raise DataError(*where, f"{field}: unsupported URL scheme {scheme!r} in {describe(ref)}")
    if _looks_like_base64_image(ref) is not None and not os.path.exists(ref) and not (
            root and os.path.exists(os.path.join(root, ref))):  # the cheap test first: no stat for plain paths
        return _store(_b64(ref, where, field), cache_dir)
    return resolve_media(ref, root)


def local_video(ref: Any, where: tuple[str, int], field: str, root: Optional[str], cache_dir: str) -> VideoRef:
    """A video file / frame directory path, or a tuple of frame paths for a frame list."""
    if isinstance(ref, list):
        if not ref:
            raise DataError(*where, f"{field}: a video given as a frame list needs at least one frame")
        return tuple(local_media(r, where, f"{field}[{i}]", root, cache_dir) for i, r in enumerate(ref))
    return local_media(ref, where, field, root, cache_dir)
