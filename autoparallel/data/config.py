"""The data section of a run's configuration (PaddleMIX key names where PaddleMIX has one)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from network.processor import DEFAULT_SYSTEM_PROMPT


def _bounds_ok(low: Optional[int], high: Optional[int]) -> bool:
    return (low is None or low > 0) and (high is None or high > 0) and (low is None or high is None or low <= high)


@dataclass
class DataConfig:
    # PaddleMIX meta JSON: {name: {"annotation" | "file_name": path, "repeat_time": float, "root"?: dir}}.
    meta_path: Optional[str] = None
    # LLaMA-Factory / ms-swift: entries of meta_path (or of dataset_dir/dataset_info.json) picked by name, or
    # annotation files read directly (records.resolve_sources).
    dataset: Optional[list[str]] = None
    dataset_dir: Optional[str] = None
    # Used by the demo when meta_path is unset: the synthetic dataset is generated there (or reused).
    synthetic_data_dir: Optional[str] = None
    max_seq_length: int = 2048
    # Padding-free packing (autoparallel/data/packing.py): each global batch's samples share rows of up to
    # max_seq_length tokens, attention and M-RoPE positions stay per sample (aliases: padding_free, neat_packing).
    packing: bool = False
    # Pixel bounds: None takes the checkpoint's preprocessor config (HF's defaults for a preset), so training and
    # `infer` see the same resolution unless the run config sets one.
    min_pixels: Optional[int] = None
    max_pixels: Optional[int] = None
    # PaddleMIX compatibility: cap the long side before min/max pixels apply (None = no cap).
    image_resolution: Optional[int] = None
    video_fps: float = 2.0
    video_maxlen: int = 64  # max sampled frames per video
    video_min_pixels: Optional[int] = None
    video_max_pixels: Optional[int] = None
    skip_bad_samples: bool = False
    # Named like HF's `data_seed` so it does not collide with the trainer's `seed` in the flat key space.
    data_seed: int = 42
    dataloader_num_workers: int = 2
    # Used when a record has no system message; "" means no system turn at all.
    system_prompt: str = DEFAULT_SYSTEM_PROMPT

    def __post_init__(self) -> None:
        checks = {
            "max_seq_length": self.max_seq_length >= 8,
            "min_pixels": _bounds_ok(self.min_pixels, self.max_pixels),
            "video_min_pixels": _bounds_ok(self.video_min_pixels, self.video_max_pixels),
            "image_resolution": self.image_resolution is None or self.image_resolution > 0,
            "video_fps": self.video_fps > 0,
            "video_maxlen": self.video_maxlen >= 2,
            "dataloader_num_workers": self.dataloader_num_workers >= 0,
        }
        bad = [key for key, ok in checks.items() if not ok]
        if bad:
            raise ValueError(", ".join(f"{k}={getattr(self, k)!r} is out of range" for k in bad))

    @property
    def pixel_overrides(self) -> dict[str, int]:
        """The image-processor settings this config sets (the rest come from the checkpoint)."""
        keys = ("min_pixels", "max_pixels", "video_min_pixels", "video_max_pixels", "image_resolution")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}
