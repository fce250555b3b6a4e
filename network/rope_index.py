"""3-D M-RoPE position ids for Qwen2-VL (numpy; same semantics as HF 4.55 `Qwen2VLModel.get_rope_index`).

Text tokens advance the temporal/height/width axes together. An image/video span of
`t x (h/m) x (w/m)` merged tokens gets grid coordinates shifted by the position where it starts;
the text after it resumes at the span's largest position + 1. Images and videos are consumed in
order of appearance, across the whole batch. Padding positions (attention_mask == 0) are set to 1.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from network.config import Qwen2VLConfig


def _grid_positions(t: int, h: int, w: int) -> np.ndarray:
    """[3, t*h*w] (t, h, w) coordinates in row-major order of the merged patch grid."""
    tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
    return np.stack([tt.ravel(), hh.ravel(), ww.ravel()])


def _row_positions(
    ids: np.ndarray,
    image_grid_thw: np.ndarray | None,
    video_grid_thw: np.ndarray | None,
    image_index: int,
    video_index: int,
    spatial_merge_size: int,
    image_token_id: int,
    video_token_id: int,
    vision_start_token_id: int,
) -> tuple[np.ndarray, int, int]:
    """Positions [3, len(ids)] of one unpadded sequence; returns the advanced image/video counters."""
    starts = np.flatnonzero(ids[:-1] == vision_start_token_id)
    following = ids[starts + 1]
    remain_images = int((following == image_token_id).sum())
    remain_videos = int((following == video_token_id).sum())
    image_at = np.flatnonzero(ids == image_token_id)
    video_at = np.flatnonzero(ids == video_token_id)

    pieces, st, next_pos = [], 0, 0
    no_span = len(ids) + 1
    for _ in range(remain_images + remain_videos):
        ed_image = image_at[np.searchsorted(image_at, st)] if remain_images > 0 else no_span
        ed_video = video_at[np.searchsorted(video_at, st)] if remain_videos > 0 else no_span
        if ed_image < ed_video:
            t, h, w = (int(x) for x in image_grid_thw[image_index])
            image_index, remain_images, ed = image_index + 1, remain_images - 1, int(ed_image)
        else:
            t, h, w = (int(x) for x in video_grid_thw[video_index])
            video_index, remain_videos, ed = video_index + 1, remain_videos - 1, int(ed_video)
        h, w = h // spatial_merge_size, w // spatial_merge_size
        text_len = ed - st
        pieces.append(np.broadcast_to(np.arange(text_len) + next_pos, (3, text_len)))
        grid = _grid_positions(t, h, w) + (next_pos + text_len)
        pieces.append(grid)
        next_pos = int(grid.max()) + 1
        st = ed + t * h * w
    if st < len(ids):
        pieces.append(np.broadcast_to(np.arange(len(ids) - st) + next_pos, (3, len(ids) - st)))
    positions = np.concatenate(pieces, axis=1) if pieces else np.zeros((3, 0), np.int64)
    return positions, image_index, video_index


def get_rope_index(
    input_ids: np.ndarray,
    image_grid_thw: np.ndarray | None = None,
    video_grid_thw: np.ndarray | None = None,
    attention_mask: np.ndarray | None = None,
    *,
    spatial_merge_size: int,
    image_token_id: int,
    video_token_id: int,
    vision_start_token_id: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Return (position_ids int64 [3, B, S], rope_deltas int64 [B, 1]) for `input_ids` [B, S]."""
    input_ids = np.asarray(input_ids)
    batch, seq_len = input_ids.shape
    if image_grid_thw is None and video_grid_thw is None:
        if attention_mask is None:
            position_ids = np.broadcast_to(np.arange(seq_len, dtype=np.int64), (3, batch, seq_len)).copy()
            return position_ids, np.zeros((batch, 1), np.int64)
        mask = np.asarray(attention_mask).astype(bool)
        pos = np.where(mask, np.cumsum(mask, axis=-1, dtype=np.int64) - 1, 1)
        deltas = pos.max(axis=-1, keepdims=True) + 1 - seq_len
        return np.broadcast_to(pos, (3, batch, seq_len)).copy(), deltas.astype(np.int64)

    mask = np.ones_like(input_ids, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    image_grid_thw = None if image_grid_thw is None else np.asarray(image_grid_thw)
    video_grid_thw = None if video_grid_thw is None else np.asarray(video_grid_thw)
    position_ids = np.ones((3, batch, seq_len), np.int64)
    deltas = np.zeros((batch, 1), np.int64)
    image_index = video_index = 0
    for row in range(batch):
        positions, image_index, video_index = _row_positions(
            input_ids[row][mask[row]], image_grid_thw, video_grid_thw, image_index, video_index,
            spatial_merge_size, image_token_id, video_token_id, vision_start_token_id,
        )
        position_ids[:, row, mask[row]] = positions
        deltas[row, 0] = (positions.max() + 1 if positions.size else 0) - seq_len
    return position_ids, deltas


def get_rope_index_for_config(
    config: "Qwen2VLConfig",
    input_ids: np.ndarray,
    image_grid_thw: np.ndarray | None = None,
    video_grid_thw: np.ndarray | None = None,
    attention_mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """`get_rope_index` with the token ids and merge size taken from a `Qwen2VLConfig`."""
    return get_rope_index(
        input_ids, image_grid_thw, video_grid_thw, attention_mask,
        spatial_merge_size=config.vision_config.spatial_merge_size,
        image_token_id=config.image_token_id,
        video_token_id=config.video_token_id,
        vision_start_token_id=config.vision_start_token_id,
    )
