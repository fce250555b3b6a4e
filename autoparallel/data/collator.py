"""Batch a rank's samples to a padded length shared by every data-parallel rank.

The loader computes `pad_to` from the whole global batch (see `padded_length`), so all ranks build the same
[B, pad_to] shapes without communicating. Right padding: input_ids = 151643 (<|endoftext|>), labels = -100,
attention_mask = 0, position_ids = 1 (HF's value for masked positions). Pixel patches and grids of all the rank's
images are concatenated in sample order (videos likewise, separately).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from autoparallel.data.dataset import IGNORE_INDEX, PAD_TOKEN_ID

PAD_MULTIPLE = 8


def padded_length(lengths: Sequence[int], multiple: int = PAD_MULTIPLE) -> int:
    """Longest length rounded up to a multiple of `multiple`."""
    return -(-max(lengths) // multiple) * multiple


def _concat(samples: Sequence[dict[str, Any]], key: str) -> Optional[np.ndarray]:
    parts = [s[key] for s in samples if s.get(key) is not None]
    return np.concatenate(parts, axis=0) if parts else None


def collate(samples: Sequence[dict[str, Any]], pad_to: Optional[int] = None,
            pad_token_id: int = PAD_TOKEN_ID) -> dict[str, Any]:
    """Batch dict (numpy):

    input_ids int64 [B, P], labels int64 [B, P], attention_mask int64 [B, P], position_ids int64 [3, B, P],
    pixel_values float32 [N, 1176] | None, image_grid_thw int64 [n_images, 3] | None,
    pixel_values_videos float32 [M, 1176] | None, video_grid_thw int64 [n_videos, 3] | None,
    second_per_grid_ts float32 [n_videos] | None,
    num_tokens int (non-pad tokens), num_labels int (supervised tokens), indices list[int] (dataset indices).
    P = `pad_to` (default: the local longest rounded up to a multiple of 8).
    """
    if not samples:
        raise ValueError("collate needs at least one sample")
    longest = max(len(s["input_ids"]) for s in samples)
    pad_to = padded_length([longest]) if pad_to is None else pad_to
    if longest > pad_to:
        raise ValueError(f"a sample has {longest} tokens but pad_to={pad_to}")
    batch = len(samples)
    input_ids = np.full((batch, pad_to), pad_token_id, np.int64)
    labels = np.full((batch, pad_to), IGNORE_INDEX, np.int64)
    attention_mask = np.zeros((batch, pad_to), np.int64)
    position_ids = np.ones((3, batch, pad_to), np.int64)
    for row, s in enumerate(samples):
        n = len(s["input_ids"])
        input_ids[row, :n] = s["input_ids"]
        labels[row, :n] = s["labels"]
        attention_mask[row, :n] = s["attention_mask"]
        position_ids[:, row, :n] = s["position_ids"]
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "pixel_values": _concat(samples, "pixel_values"),
        "image_grid_thw": _concat(samples, "image_grid_thw"),
        "pixel_values_videos": _concat(samples, "pixel_values_videos"),
        "video_grid_thw": _concat(samples, "video_grid_thw"),
        "second_per_grid_ts": _concat(samples, "second_per_grid_ts"),
        "num_tokens": int(attention_mask.sum()),
        "num_labels": int((labels != IGNORE_INDEX).sum()),
        "indices": [int(s["index"]) for s in samples],
    }
