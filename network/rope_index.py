"""3-D M-RoPE position ids for Qwen2-VL and Qwen2.5-VL (numpy; the semantics of HF 4.55
`Qwen2VLModel.get_rope_index` / `Qwen2_5_VLModel.get_rope_index`).

Text tokens advance the temporal/height/width axes together. An image/video span of
`t x (h/m) x (w/m)` merged tokens gets grid coordinates shifted by the position where it starts;
the text after it resumes at the span's largest position + 1. Images and videos are consumed in
order of appearance, across the whole batch. Padding positions (attention_mask == 0) are set to 1.

Temporal coordinate of a video's k-th temporal patch: k (Qwen2-VL, `tokens_per_second=None`), or
floor(k * second_per_grid_t * tokens_per_second) (Qwen2.5-VL: absolute time; second_per_grid_ts defaults to
1 s per video; images stay at time 0). HF 4.55 truncates second_per_grid_t to an integer first, so a fractional
value (fps > temporal_patch_size / 1 s, e.g. 0.5 s at 4 fps) collapses every frame onto time 0 there; this
module keeps the fraction, as the original Qwen2.5-VL code and later transformers releases (PR #48669) do.
Both agree for integer seconds (the processor's default fps=2 gives 1.0 s).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from network.config import Qwen2VLConfig


def _grid_positions(t: int, h: int, w: int, seconds: float = 1.0, tokens_per_second: float = 1.0) -> np.ndarray:
    """[3, t*h*w] (time, h, w) coordinates in row-major order of the merged patch grid."""
    times = np.floor(np.arange(t) * seconds * tokens_per_second).astype(np.int64)
    tt, hh, ww = np.meshgrid(times, np.arange(h), np.arange(w), indexing="ij")
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
    tokens_per_second: float | None,
    second_per_grid_ts: np.ndarray,
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
            seconds = 0.0 if tokens_per_second is not None else 1.0
            image_index, remain_images, ed = image_index + 1, remain_images - 1, int(ed_image)
        else:
            t, h, w = (int(x) for x in video_grid_thw[video_index])
            seconds = 1.0 if tokens_per_second is None else float(second_per_grid_ts[video_index])
            video_index, remain_videos, ed = video_index + 1, remain_videos - 1, int(ed_video)
        h, w = h // spatial_merge_size, w // spatial_merge_size
        text_len = ed - st
        pieces.append(np.broadcast_to(np.arange(text_len) + next_pos, (3, text_len)))
        grid = _grid_positions(t, h, w, seconds, tokens_per_second or 1.0) + (next_pos + text_len)
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
    second_per_grid_ts: np.ndarray | None = None,
    *,
    spatial_merge_size: int,
    image_token_id: int,
    video_token_id: int,
    vision_start_token_id: int,
    tokens_per_second: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Return (position_ids int64 [3, B, S], rope_deltas int64 [B, 1]) for `input_ids` [B, S].

    `tokens_per_second` (Qwen2.5-VL) makes video time absolute, with `second_per_grid_ts` [n_videos] seconds
    per temporal patch (default 1 s each); None (Qwen2-VL) counts temporal patches and ignores the seconds."""
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
    n_videos = 0 if video_grid_thw is None else len(video_grid_thw)
    seconds = (np.ones(n_videos) if second_per_grid_ts is None
               else np.asarray(second_per_grid_ts, np.float64).reshape(-1))
    if tokens_per_second is not None and len(seconds) != n_videos:
        raise ValueError(f"second_per_grid_ts has {len(seconds)} entries for {n_videos} videos")
    image_index = video_index = 0
    for row in range(batch):
        positions, image_index, video_index = _row_positions(
            input_ids[row][mask[row]], image_grid_thw, video_grid_thw, image_index, video_index,
            spatial_merge_size, image_token_id, video_token_id, vision_start_token_id, tokens_per_second, seconds,
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
    second_per_grid_ts: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """`get_rope_index` with the token ids, merge size and video time scale taken from a `Qwen2VLConfig`."""
    return get_rope_index(
        input_ids, image_grid_thw, video_grid_thw, attention_mask, second_per_grid_ts,
        spatial_merge_size=config.vision_config.spatial_merge_size,
        image_token_id=config.image_token_id,
        video_token_id=config.video_token_id,
        vision_start_token_id=config.vision_start_token_id,
        tokens_per_second=video_tokens_per_second(config),
    )


def video_tokens_per_second(config: "Qwen2VLConfig") -> float | None:
    """The M-RoPE time scale of videos: Qwen2.5-VL's `tokens_per_second`, None for Qwen2-VL (frame counts)."""
    return getattr(config.vision_config, "tokens_per_second", None)
