"""Padding-free packing: several samples share one row of up to `max_seq_length` tokens.

`first_fit_decreasing` groups sample indices into rows, window by window (deterministic: a window's samples
are sorted by length, ties by position, and each goes to the first row with room). `collate_packed` builds
the batch of such rows: the samples' tokens back to back, each sample's own M-RoPE positions (they restart per
sample), `segment_ids` naming each token's sample (network.attention keeps attention inside a sample), and the
label at each sample's first token ignored, so no sample's last token is trained to predict the next sample.
Pixel patches are concatenated in row-major sample order, the order the model places vision features in.

The loss stays the token mean over the global batch: packing moves tokens, not labels.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from autoparallel.data.collator import collate
from autoparallel.data.dataset import PAD_TOKEN_ID

PADDING_SEGMENT = -1  # segment id of the padding after a row's last sample


def first_fit_decreasing(lengths: Sequence[int], capacity: int, window: int) -> list[list[int]]:
    """Rows of sample indices (positions into `lengths`), each summing to <= capacity tokens; samples are
    packed only with samples of the same window of `window` consecutive indices."""
    rows: list[list[int]] = []
    for start in range(0, len(lengths), window):
        order = sorted(range(start, min(start + window, len(lengths))), key=lambda i: (-lengths[i], i))
        bins: list[list[int]] = []
        room: list[int] = []
        for i in order:
            if lengths[i] > capacity:
                raise ValueError(f"sample {i} has {lengths[i]} tokens, more than the packed row length {capacity}")
            slot = next((b for b, free in enumerate(room) if free >= lengths[i]), None)
            if slot is None:
                bins.append([])
                room.append(capacity)
                slot = len(bins) - 1
            bins[slot].append(i)
            room[slot] -= lengths[i]
        rows.extend(bins)
    return rows


def _pack_row(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One sample-like dict of the row's samples back to back, plus `segment_ids`."""
    labels = [np.array(s["labels"], np.int64, copy=True) for s in samples]
    for lab in labels:
        lab[0] = -100  # the previous sample's last token must not learn to predict this sample's first
    row = {
        "input_ids": np.concatenate([s["input_ids"] for s in samples]),
        "labels": np.concatenate(labels),
        "attention_mask": np.concatenate([s["attention_mask"] for s in samples]),
        "position_ids": np.concatenate([s["position_ids"] for s in samples], axis=1),
        "segment_ids": np.concatenate([np.full(len(s["input_ids"]), n, np.int64) for n, s in enumerate(samples)]),
        "index": -1,
    }
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        parts = [s[key] for s in samples if s.get(key) is not None]
        row[key] = np.concatenate(parts) if parts else None
    return row


def rank_rows(rows: Sequence[Sequence[int]], dp_world_size: int, dp_rank: int) -> list[Sequence[int]]:
    """The packed rows of one global batch that data-parallel rank `dp_rank` takes: every dp_world_size-th row,
    so ranks hold equally many rows (up to one) and similar fill (first-fit-decreasing fills earlier rows first)."""
    return list(rows[dp_rank::dp_world_size])


def rows_per_rank(num_rows: int, dp_world_size: int) -> int:
    """Rows every rank's batch has: the most any rank takes (the others add padding rows, so shapes match)."""
    return -(-num_rows // dp_world_size)


def collate_packed(rows: Sequence[Sequence[dict[str, Any]]], pad_to: int | None = None,
                   pad_token_id: int = PAD_TOKEN_ID, num_rows: int | None = None) -> dict[str, Any]:
    """`collate` of packed rows, with `segment_ids` int64 [B, P] (PADDING_SEGMENT on padding), the dataset
    `indices` of every packed sample, and `fill` = real tokens / (B * P). `num_rows` (>= len(rows)) adds rows
    of padding only (no token, no label) so every data-parallel rank has the same batch shape."""
    packed = [_pack_row(samples) for samples in rows]
    if packed:
        batch = collate(packed, pad_to, pad_token_id)
    elif pad_to is None:
        raise ValueError("collate_packed without rows needs pad_to")
    else:  # this rank got no row of the global batch: padding only
        batch = collate([_padding_sample()], pad_to, pad_token_id)
    segment_ids = np.full(batch["input_ids"].shape, PADDING_SEGMENT, np.int64)
    for r, row in enumerate(packed):
        segment_ids[r, :len(row["segment_ids"])] = row["segment_ids"]
    batch["segment_ids"] = segment_ids
    batch = _with_padding_rows(batch, (num_rows or 0) - len(segment_ids), pad_token_id)
    batch["indices"] = [int(s["index"]) for samples in rows for s in samples]
    batch["fill"] = batch["num_tokens"] / batch["segment_ids"].size
    return batch


def _padding_sample() -> dict[str, Any]:
    """A one-token sample of padding (no attention, no label), for a rank without any real row."""
    return {"input_ids": np.array([PAD_TOKEN_ID]), "labels": np.array([-100]), "attention_mask": np.array([0]),
            "position_ids": np.ones((3, 1), np.int64), "index": -1}


def _with_padding_rows(batch: dict[str, Any], n: int, pad_token_id: int) -> dict[str, Any]:
    """`batch` with `n` more rows of padding: the values `collate` pads with."""
    if n <= 0:
        return batch
    width = batch["input_ids"].shape[1]
    fills = {"input_ids": pad_token_id, "labels": -100, "attention_mask": 0, "segment_ids": PADDING_SEGMENT}
    for key, value in fills.items():
        batch[key] = np.concatenate([batch[key], np.full((n, width), value, np.int64)])
    batch["position_ids"] = np.concatenate([batch["position_ids"], np.ones((3, n, width), np.int64)], axis=1)
    return batch
