"""Hostile media and records for tests/dist/test_hostile_inputs.py (see the table in docs/RELIABILITY.md).

`write_hostile_dataset(root)` writes one record per per-record case plus plain good records into
`root/ann.json` + `root/meta.json` and returns the meta path; `CASES` maps each case to its expected outcome.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import av
import numpy as np
from PIL import Image

MAX_SEQ_LENGTH = 128


def noise(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    channels = {"RGB": 3, "RGBA": 4, "CMYK": 4, "L": 1}[mode]
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, channels), np.uint8)
    return Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)


def truncated(path: Path, fmt: str) -> str:
    noise(200, 200).save(path, fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # header intact, pixel data cut: only decoding finds it
    return path.name


def sixteen_bit(path: Path) -> str:
    ramp = np.linspace(0, 65535, 56 * 56).reshape(56, 56).astype(np.uint16)
    Image.fromarray(ramp, "I;16").save(path)
    return path.name


def exif_rotated(path: Path) -> str:
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° CW to display
    noise(56, 112).save(path, "JPEG", exif=exif)  # stored 56 wide x 112 high
    return path.name


def animated_gif(path: Path) -> str:
    frames = [noise(56, 56, seed=i).convert("P") for i in range(3)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return path.name


def video(path: Path, frames: int) -> str:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 20 * i, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path.name


def written(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return path.name


def saved(image: Image.Image, path: Path, fmt: Optional[str] = None) -> str:
    image.save(path, fmt)
    return path.name


# case → (media kind, writer(root) → file name or None, user text, expected)
# expected: "ok" (a valid sample) or the DataError kind it is rejected/dropped with.
CASES: dict[str, tuple[str, Callable[[Path], Optional[str]], str, str]] = {
    "truncated_png": ("images", lambda r: truncated(r / "trunc.png", "PNG"), "<image>q", "unreadable media"),
    "truncated_jpeg": ("images", lambda r: truncated(r / "trunc.jpg", "JPEG"), "<image>q", "unreadable media"),
    "zero_byte": ("images", lambda r: written(r / "empty.png", b""), "<image>q", "unreadable media"),
    "1x1": ("images", lambda r: saved(noise(1, 1), r / "one.png"), "<image>q", "ok"),
    "20000x20": ("images", lambda r: saved(noise(20000, 20, "L"), r / "wide.png"), "<image>q", "unreadable media"),
    "16bit": ("images", lambda r: sixteen_bit(r / "deep.png"), "<image>q", "ok"),
    "cmyk": ("images", lambda r: saved(noise(56, 56, "CMYK"), r / "cmyk.jpg", "JPEG"), "<image>q", "ok"),
    "palette": ("images", lambda r: saved(noise(56, 56).convert("P"), r / "palette.png"), "<image>q", "ok"),
    "rgba": ("images", lambda r: saved(noise(56, 56, "RGBA"), r / "rgba.png"), "<image>q", "ok"),
    "exif_rotated": ("images", lambda r: exif_rotated(r / "exif.jpg"), "<image>q", "ok"),
    "animated_gif": ("images", lambda r: animated_gif(r / "anim.gif"), "<image>q", "ok"),
    "video_1_frame": ("videos", lambda r: video(r / "one_frame.mp4", 1), "<video>q", "unreadable media"),
    "not_a_video": ("videos", lambda r: written(r / "fake.mp4", b"not a video"), "<video>q", "unreadable media"),
    "placeholder_without_media": ("images", lambda r: None, "<image>q", "placeholder mismatch"),
    # PaddleMIX/InternVL rule: "<image>\n" is prepended to the first user message
    "media_without_placeholder": ("images", lambda r: saved(noise(56, 56), r / "extra.png"), "q", "ok"),
    # 448x448 → 256 image tokens, more than max_seq_length 128, and an image span is never cut
    "only_image_tokens_too_long": ("images", lambda r: saved(noise(448, 448), r / "big.png"), "<image>", "too long"),
}
PLAIN_RECORDS = 5  # good records: 12 samples + 8 "ok" cases = 20, a multiple of the dp2 x 2 global batch


def record(user: str, media_kind: str, files: list[str], answer: str = "red") -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
            media_kind: files}


def write_hostile_dataset(root: Path) -> tuple[str, dict[str, int]]:
    """(meta path, case → record index): every case of CASES, PLAIN_RECORDS good records, and last a record
    whose text is not UTF-8 (case "non_utf8_text")."""
    root.mkdir(parents=True, exist_ok=True)
    records, where = [], {}
    for name, (kind, write, user, _) in CASES.items():
        file = write(root)
        where[name] = len(records)
        records.append(record(user, kind, [file] if file else []))
    for i in range(PLAIN_RECORDS):
        records.append(record("<image>What colour is the shape?", "images", [saved(noise(56, 56, seed=i), root /
                                                                                   f"plain{i}.png")]))
    where["non_utf8_text"] = len(records)
    records.append(record("<image>caf\u00e9", "images", ["plain0.png"]))
    text = json.dumps(records, ensure_ascii=False).encode("utf-8")
    # The last record's "é" becomes a lone Latin-1 byte: that record, and only it, is not UTF-8.
    text = text.replace("caf\u00e9".encode("utf-8"), b"caf\xe9")
    (root / "ann.json").write_bytes(text)
    meta = root / "meta.json"
    meta.write_text(json.dumps({"hostile": {"annotation": "ann.json", "root": ".", "repeat_time": 1}}))
    return str(meta), where
