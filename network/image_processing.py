"""Qwen2-VL image/video-frame preprocessing, numerically identical to HF's slow `Qwen2VLImageProcessor`.

Pipeline per image: load → (optional EXIF transpose) → (optional PaddleMIX `image_resolution` cap) → RGB →
`smart_resize` → PIL bicubic on uint8 → rescale 1/255 → CLIP mean/std → patch flattening. Frames of one video
share the size computed from the first frame, as in HF.

Deliberate differences from HF (all documented, none affects ordinary 8-bit RGB/RGBA/L/P/CMYK images):
- 16-bit images are scaled to 8 bits (value / 257); HF's `convert("RGB")` saturates them to 255.
- numpy inputs must be uint8 (HW, HWC with C in 1/3/4); HF would reinterpret floats in [0, 1].
- `smart_resize` rejects non-positive sizes with ValueError (HF fails with ZeroDivisionError).
- EXIF orientation is ignored by default, like HF; `exif_transpose=True` applies it.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Sequence, Union

import numpy as np
from PIL import Image, ImageOps

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# HF defaults: images in Qwen2VLImageProcessor, videos in Qwen2VLVideoProcessor (per frame).
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 28 * 28 * 1280
DEFAULT_VIDEO_MIN_PIXELS = 128 * 28 * 28
DEFAULT_VIDEO_MAX_PIXELS = 768 * 28 * 28

ImageLike = Union[Image.Image, np.ndarray, str, os.PathLike]

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = 56 * 56,
    max_pixels: int = 14 * 14 * 4 * 1280,
) -> tuple[int, int]:
    """Target (h, w): multiples of `factor`, area within [min_pixels, max_pixels], aspect ratio kept (HF formula).

    Tiny images are resized up (20×20 → 56×56 with the defaults), as in HF; aspect ratios above 200 raise.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got height={height}, width={width}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(
            f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def cap_long_side(height: int, width: int, image_resolution: int | None) -> tuple[int, int]:
    """PaddleMIX/LLaMA-Factory `image_resolution`: shrink so the long side is at most that, truncating sizes."""
    if image_resolution is None or max(height, width) <= image_resolution:
        return height, width
    scale = image_resolution / max(height, width)
    return int(height * scale), int(width * scale)


def open_image(image: ImageLike) -> Image.Image:
    """PIL image from a PIL image, a uint8 numpy array (HW / HWC) or a file path; errors name the file."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f"numpy images must be uint8 (got {image.dtype}); scale to 0..255 first")
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]
        if not (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (3, 4))):
            raise ValueError(f"numpy images must be HW or HWC with C in (1, 3, 4), got shape {image.shape}")
        return Image.fromarray(image)
    if isinstance(image, (str, os.PathLike)):
        try:
            img = Image.open(image)
            _refuse_bomb(img, image)
            img.load()
        except (OSError, Image.DecompressionBombError) as e:
            raise ValueError(f"cannot read image file {os.fspath(image)!r}: {e}") from e
        return img
    raise TypeError(f"unsupported image type {type(image).__name__}; expected PIL image, uint8 ndarray or path")


def image_hw(image: ImageLike) -> tuple[int, int]:
    """(height, width) without decoding pixels when given a path (PIL reads only the header)."""
    if isinstance(image, np.ndarray):
        return int(image.shape[0]), int(image.shape[1])
    if isinstance(image, Image.Image):
        return image.height, image.width
    try:
        with Image.open(image) as img:
            _refuse_bomb(img, image)
            return img.height, img.width
    except (OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image file {os.fspath(image)!r}: {e}") from e


def _refuse_bomb(img: Image.Image, path: ImageLike) -> None:
    """PIL only warns between MAX_IMAGE_PIXELS and twice that, then decodes it all; every image is resized to at
    most max_pixels anyway, so a header claiming more is refused before any pixel is decoded."""
    if Image.MAX_IMAGE_PIXELS and img.width * img.height > Image.MAX_IMAGE_PIXELS:
        raise Image.DecompressionBombError(
            f"{img.width}x{img.height} pixels exceed the decompression-bomb limit of {Image.MAX_IMAGE_PIXELS} "
            f"(PIL.Image.MAX_IMAGE_PIXELS)")


def to_rgb(image: Image.Image) -> Image.Image:
    """HF's do_convert_rgb (`convert("RGB")`: alpha dropped, not composited), plus 16-bit → 8-bit scaling."""
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES or (image.mode == "I" and image.getextrema()[1] > 255):
        # Pillow saturates 16-bit values at 255 when converting; keep the picture instead.
        arr = np.asarray(image, dtype=np.float64) / 257.0
        image = Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8))
    return image.convert("RGB")


@dataclass
class Qwen2VLImageProcessor:
    """Qwen2-VL image processor; `min_pixels`/`max_pixels` bound images, `video_*` bound each video frame."""

    min_pixels: int = DEFAULT_MIN_PIXELS
    max_pixels: int = DEFAULT_MAX_PIXELS
    video_min_pixels: int = DEFAULT_VIDEO_MIN_PIXELS
    video_max_pixels: int = DEFAULT_VIDEO_MAX_PIXELS
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = field(default=OPENAI_CLIP_MEAN)
    image_std: tuple[float, ...] = field(default=OPENAI_CLIP_STD)
    resample: int = Image.Resampling.BICUBIC
    rescale_factor: float = 1 / 255
    image_resolution: int | None = None
    exif_transpose: bool = False

    def __post_init__(self) -> None:
        if self.min_pixels > self.max_pixels or self.video_min_pixels > self.video_max_pixels:
            raise ValueError("min_pixels must not exceed max_pixels")
        # uint8 in, so rescale+normalize is a per-(value, channel) table; built with HF's exact dtype steps
        # (float64 rescale → float32, then float32 (x - mean) / std) so results are bit-identical.
        levels = (np.arange(256, dtype=np.float64) * self.rescale_factor).astype(np.float32)[:, None]
        mean = np.asarray(self.image_mean, dtype=np.float32)
        std = np.asarray(self.image_std, dtype=np.float32)
        self._lut = ((levels - mean) / std).astype(np.float32)  # [256, 3]

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def resized_hw(self, height: int, width: int, video: bool = False) -> tuple[int, int]:
        """Size an image (or video frame) of this original size is resized to."""
        height, width = cap_long_side(height, width, self.image_resolution)
        lo, hi = (self.video_min_pixels, self.video_max_pixels) if video else (self.min_pixels, self.max_pixels)
        return smart_resize(height, width, self.factor, lo, hi)

    def grid_thw(self, height: int, width: int, num_frames: int = 1, video: bool = False) -> tuple[int, int, int]:
        """(t, h, w) patch grid for an image (num_frames=1) or a video of num_frames frames of this size."""
        rh, rw = self.resized_hw(height, width, video)
        return -(-num_frames // self.temporal_patch_size), rh // self.patch_size, rw // self.patch_size

    def num_image_tokens(self, height: int, width: int) -> int:
        """LLM placeholder tokens for one image of this original size (no pixels decoded)."""
        t, h, w = self.grid_thw(height, width)
        return t * h * w // self.merge_size**2

    def num_video_tokens(self, num_frames: int, height: int, width: int) -> int:
        """LLM placeholder tokens for a video of num_frames frames of this original size."""
        t, h, w = self.grid_thw(height, width, num_frames, video=True)
        return t * h * w // self.merge_size**2

    def _prepare(self, image: ImageLike) -> Image.Image:
        img = open_image(image)
        if self.exif_transpose:
            img = ImageOps.exif_transpose(img)
        h, w = cap_long_side(img.height, img.width, self.image_resolution)
        if (h, w) != (img.height, img.width):
            img = img.resize((w, h), resample=Image.Resampling.NEAREST)
        return to_rgb(img)

    def _patchify(self, frames: list[Image.Image], video: bool) -> tuple[np.ndarray, tuple[int, int, int]]:
        """Resize all frames to the first frame's target size, normalise, flatten patches in HF order."""
        rh, rw = smart_resize(
            frames[0].height,
            frames[0].width,
            self.factor,
            self.video_min_pixels if video else self.min_pixels,
            self.video_max_pixels if video else self.max_pixels,
        )
        pixels = np.stack([np.asarray(f.resize((rw, rh), resample=self.resample)) for f in frames])  # [T,H,W,3]
        channels = pixels.shape[-1]
        tps, p, m = self.temporal_patch_size, self.patch_size, self.merge_size
        num_t = -(-len(frames) // tps) * tps  # single images and odd frame counts: repeat the last frame
        values = np.empty((num_t, rh, rw, channels), dtype=np.float32)
        for c in range(channels):  # per-channel table gather: fastest exact form, measured
            np.take(self._lut[:, c], pixels[..., c], out=values[: len(frames), ..., c])
        values[len(frames) :] = values[len(frames) - 1]
        gt, gh, gw = num_t // tps, rh // p, rw // p
        # [gt, tps, gh/m, m, p, gw/m, m, p, C] → [gt, gh/m, gw/m, m, m, C, tps, p, p]: HF's order, from HWC.
        values = values.reshape(gt, tps, gh // m, m, p, gw // m, m, p, channels)
        values = values.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)
        return values.reshape(gt * gh * gw, channels * tps * p * p), (gt, gh, gw)

    def preprocess(self, images: ImageLike | Sequence[ImageLike]) -> dict[str, np.ndarray]:
        """{"pixel_values": float32 [sum(t*h*w), C*T*P*P], "image_grid_thw": int64 [N, 3]}."""
        if isinstance(images, (Image.Image, np.ndarray, str, os.PathLike)):
            images = [images]
        if len(images) == 0:
            raise ValueError("preprocess needs at least one image")
        out = [self._patchify([self._prepare(img)], video=False) for img in images]
        return {
            "pixel_values": np.concatenate([o[0] for o in out], axis=0),
            "image_grid_thw": np.asarray([o[1] for o in out], dtype=np.int64),
        }

    def preprocess_videos(self, videos: Sequence[Sequence[ImageLike]]) -> dict[str, np.ndarray]:
        """Each video is a list of frames; {"pixel_values_videos": float32 [...], "video_grid_thw": int64 [N, 3]}."""
        if len(videos) == 0 or any(len(v) == 0 for v in videos):
            raise ValueError("preprocess_videos needs at least one video with at least one frame each")
        out = [self._patchify([self._prepare(f) for f in frames], video=True) for frames in videos]
        return {
            "pixel_values_videos": np.concatenate([o[0] for o in out], axis=0),
            "video_grid_thw": np.asarray([o[1] for o in out], dtype=np.int64),
        }

    def to_dict(self) -> dict:
        """HF `preprocessor_config.json` content (+ our `image_resolution`, ignored by HF)."""
        d = {
            "image_processor_type": "Qwen2VLImageProcessor",
            "processor_class": "Qwen2VLProcessor",
            "do_resize": True,
            "do_rescale": True,
            "do_normalize": True,
            "do_convert_rgb": True,
            "resample": int(self.resample),
            "rescale_factor": self.rescale_factor,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "min_pixels": self.min_pixels,
            "max_pixels": self.max_pixels,
            "size": {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels},
            "patch_size": self.patch_size,
            "temporal_patch_size": self.temporal_patch_size,
            "merge_size": self.merge_size,
        }
        if self.image_resolution is not None:
            d["image_resolution"] = self.image_resolution
        return d

    @classmethod
    def from_dict(cls, image_cfg: dict, video_cfg: dict | None = None) -> "Qwen2VLImageProcessor":
        """From HF `preprocessor_config.json` (and optionally `video_preprocessor_config.json`) contents."""
        kw = {}
        for src, prefix in ((image_cfg, ""), (video_cfg or {}, "video_")):
            size = src.get("size") or {}
            lo = src.get("min_pixels", size.get("shortest_edge"))
            hi = src.get("max_pixels", size.get("longest_edge"))
            if lo is not None:
                kw[prefix + "min_pixels"] = int(lo)
            if hi is not None:
                kw[prefix + "max_pixels"] = int(hi)
        for key in ("patch_size", "temporal_patch_size", "merge_size", "rescale_factor", "image_resolution"):
            if image_cfg.get(key) is not None:
                kw[key] = image_cfg[key]
        for key in ("image_mean", "image_std"):
            if image_cfg.get(key) is not None:
                kw[key] = tuple(image_cfg[key])
        return cls(**kw)
