"""Qwen2.5-VL vision tower: the Qwen2-VL tower with RMSNorm, a SwiGLU MLP and window attention.

Window attention. Merged tokens (merge x merge patches) are grouped into windows of `window_size` pixels
(`window_size / (patch_size * merge)` merged tokens a side, windows at the right/bottom border are cut), per frame.
The patches are reordered so every window is contiguous; blocks in `fullatt_block_indexes` attend within the
whole frame, the others within their window. The features are put back into processor order at the end, before
the merger: the merger works on whole merge groups, which the reordering keeps intact, so merging then undoing
the order (as HF does) gives the same rows. `forward_features` therefore means the same for both towers.

Submodule names equal the HF Hub checkpoint keys under `visual.`.
"""
from __future__ import annotations

import numpy as np
import paddle
import paddle.nn as nn

from network.attention import Segments
from network.config import Qwen2_5_VLVisionConfig
from network.modeling_vision import VISION_ACTIVATIONS, Qwen2VisionTransformer, as_numpy, vision_segments
from network.rms_norm import Qwen2RMSNorm


def rms_norm(dim: int) -> nn.Layer:
    return Qwen2RMSNorm(dim, eps=1e-6)


class VisionSwiGLU(nn.Layer):
    def __init__(self, config: Qwen2_5_VLVisionConfig):
        super().__init__()
        e, hidden = config.embed_dim, config.mlp_hidden_size
        self.gate_proj = nn.Linear(e, hidden)
        self.up_proj = nn.Linear(e, hidden)
        self.down_proj = nn.Linear(hidden, e)
        self.act = VISION_ACTIVATIONS[config.hidden_act]

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


def window_order(grid_thw: np.ndarray, merge: int, window: int) -> tuple[np.ndarray, np.ndarray]:
    """(patch permutation int64 [N], window boundaries int32 [n_windows + 1]) for `window` x `window` merged
    tokens per window: after `x[order]` the patches of each window are contiguous (frames in order, windows
    row-major in a frame, merged tokens row-major in a window, merge groups whole)."""
    unit = merge * merge
    order, lengths, offset = [], [], 0
    for t, h, w in grid_thw:
        gh, gw = h // merge, w // merge
        nh, nw = -(-gh // window), -(-gw // window)
        groups = np.full((t, nh * window, nw * window), -1, np.int64)
        groups[:, :gh, :gw] = np.arange(t * gh * gw).reshape(t, gh, gw)
        groups = groups.reshape(t, nh, window, nw, window).transpose(0, 1, 3, 2, 4).reshape(t * nh * nw, -1)
        lengths.append((groups >= 0).sum(axis=1))
        ids = groups[groups >= 0] + offset  # merge groups in window order
        order.append((ids[:, None] * unit + np.arange(unit)).reshape(-1))
        offset += t * gh * gw
    bounds = np.concatenate([[0], np.cumsum(np.concatenate(lengths)) * unit]).astype(np.int32)
    return np.concatenate(order), bounds


class Qwen2_5_VisionTransformer(Qwen2VisionTransformer):
    block_norm = staticmethod(rms_norm)
    block_mlp = VisionSwiGLU

    def forward_features(self, pixel_values: paddle.Tensor, grid_thw) -> paddle.Tensor:
        """pixel_values [N, C*T*P*P] -> patch features [N, embed_dim], in processor order."""
        c = self.config
        grid_thw = as_numpy(grid_thw).astype(np.int64).reshape(-1, 3)
        order, windows = window_order(grid_thw, c.spatial_merge_size,
                                      c.window_size // (c.patch_size * c.spatial_merge_size))
        to_windows = paddle.to_tensor(order)
        x = paddle.gather(self.patch_embed(pixel_values), to_windows)
        cos, sin = (paddle.gather(t, to_windows) for t in self.rotary_cos_sin(grid_thw))
        # Frames stay contiguous after the reordering, so the per-frame boundaries still hold.
        frames, windows = vision_segments(grid_thw), Segments(np.asarray(windows))
        for i, block in enumerate(self.blocks):
            x = block(x, frames if i in c.fullatt_block_indexes else windows, cos, sin)
        return paddle.gather(x, paddle.to_tensor(np.argsort(order)))
