"""The data section of a run's configuration (PaddleMIX key names where PaddleMIX has one)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from network.processor import DEFAULT_SYSTEM_PROMPT


PIXELS_PER_TOKEN = 28 * 28  # one LLM token per merged 2x2 group of 14-pixel patches


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
    # Loss masks (dataset.py "Labels"): LLaMA-Factory's train_on_prompt / mask_history, ms-swift's loss_scale
    # (default: every answer; last_round: the last answer only; all: prompts too). They combine: either name turns
    # a behaviour on.
    train_on_prompt: bool = False
    mask_history: bool = False
    loss_scale: Literal["default", "last_round", "all"] = "default"
    # Token budgets (ms-swift's IMAGE_MAX_TOKEN_NUM / VIDEO_MAX_TOKEN_NUM): tokens per image / per video frame,
    # applied as max_pixels / video_max_pixels = n x 28 x 28 before tokenisation (a token is a merged 28x28 patch).
    image_max_token_num: Optional[int] = None
    video_max_token_num: Optional[int] = None
    # Held-out split of the training records (LLaMA-Factory's val_size; ms-swift's split_dataset_ratio is its alias):
    # in (0, 1) a fraction (rounded up), >= 1 a record count, 0 none. Seeded by data_seed, disjoint from training;
    # evaluated at eval_steps when eval_meta_path is not given (records.held_out_records).
    val_size: float = 0.0

    def __post_init__(self) -> None:
        for budget, pixels in (("image_max_token_num", "max_pixels"), ("video_max_token_num", "video_max_pixels")):
            tokens = getattr(self, budget)
            if tokens is None:
                continue
            if tokens <= 0 or getattr(self, pixels) not in (None, tokens * PIXELS_PER_TOKEN):
                raise ValueError(f"{budget}={tokens} must be > 0 and agree with {pixels}={getattr(self, pixels)} "
                                 f"(= {budget} x {PIXELS_PER_TOKEN}); set one of them")
            setattr(self, pixels, tokens * PIXELS_PER_TOKEN)
        checks = {
            "val_size": self.val_size >= 0 and (self.val_size < 1 or float(self.val_size).is_integer()),
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
            raise ValueError(", ".join(f"{k}={getattr(self, k)!r} is out of range" for k in bad)
                             + (" (val_size: a fraction in [0, 1) or a whole record count)" if "val_size" in bad
                                else ""))

    @property
    def supervises_prompt(self) -> bool:
        return self.train_on_prompt or self.loss_scale == "all"

    @property
    def masks_history(self) -> bool:
        return self.mask_history or self.loss_scale == "last_round"

    @property
    def pixel_overrides(self) -> dict[str, int]:
        """The image-processor settings this config sets (the rest come from the checkpoint)."""
        keys = ("min_pixels", "max_pixels", "video_min_pixels", "video_max_pixels", "image_resolution")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}
