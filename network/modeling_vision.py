"""Qwen2-VL vision tower (ViT with 2-D rotary, block-diagonal attention per image/frame, PatchMerger), and the
pieces the Qwen2.5-VL tower (network/modeling_vision_window.py) shares with it.

Submodule names equal the HF Hub checkpoint keys under `visual.`.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from network.attention import SegmentRows, Segments, attention
from network.config import VisionConfig

_LN_EPS = 1e-6


def quick_gelu(x: paddle.Tensor) -> paddle.Tensor:
    return x * F.sigmoid(1.702 * x)


VISION_ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu, "silu": F.silu}


def rotate_half(x: paddle.Tensor) -> paddle.Tensor:
    x1, x2 = x.chunk(2, axis=-1)
    return paddle.concat([-x2, x1], axis=-1)


def as_numpy(x) -> np.ndarray:
    """Host copy of small integer metadata (grid_thw, ids) given as numpy, list or paddle.Tensor."""
    return x.numpy() if isinstance(x, paddle.Tensor) else np.asarray(x)


def vision_rotary_positions(grid_thw: np.ndarray, merge: int) -> np.ndarray:
    """(row, col) of every patch, [N, 2], in the order patches arrive: merge windows row-major, then
    the merge x merge patches inside each window row-major, repeated for each of the t frames."""
    out = []
    for t, h, w in grid_thw:
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        hw = np.stack([rows, cols], axis=-1).reshape(h // merge, merge, w // merge, merge, 2)
        out.append(np.tile(hw.transpose(0, 2, 1, 3, 4).reshape(-1, 2), (t, 1)))
    return np.concatenate(out, axis=0)


def vision_segments(grid_thw: np.ndarray) -> Segments:
    """One attention segment per frame (t repeats of h*w patches), boundaries on the host."""
    return Segments(vision_cu_seqlens(grid_thw))


def vision_cu_seqlens(grid_thw: np.ndarray) -> np.ndarray:
    """int32 [frames + 1] boundaries: each frame (t repeats of h*w patches) is its own attention block."""
    lengths = np.repeat(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)


def layer_norm(dim: int) -> nn.Layer:
    return nn.LayerNorm(dim, epsilon=_LN_EPS)


def vision_segment_ids(grid_thw: np.ndarray) -> np.ndarray:
    """int64 [N]: the frame (attention block) of every patch, numbered from 0 as `vision_cu_seqlens` orders them."""
    lengths = np.repeat(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
    return np.repeat(np.arange(len(lengths)), lengths).astype(np.int64)


class PatchEmbed(nn.Layer):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        kernel = [config.temporal_patch_size, config.patch_size, config.patch_size]
        self.proj = nn.Conv3D(config.in_channels, config.embed_dim, kernel, stride=kernel, bias_attr=False)

    def forward(self, pixel_values: paddle.Tensor) -> paddle.Tensor:
        """[..., N, C*T*P*P] -> [..., N, embed_dim]."""
        c = self.config
        x = pixel_values.reshape([-1, c.in_channels, c.temporal_patch_size, c.patch_size, c.patch_size])
        return self.proj(x.astype(self.proj.weight.dtype)).reshape(list(pixel_values.shape[:-1]) + [c.embed_dim])


class VisionAttention(nn.Layer):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.num_heads = config.num_heads
        # Fused output columns are [q | k | v], each [heads * head_dim] (the checkpoint's order).
        self.qkv = nn.Linear(config.embed_dim, config.embed_dim * 3)
        self.proj = nn.Linear(config.embed_dim, config.embed_dim)

    def forward(self, x: paddle.Tensor, segments: Segments | None, cos: paddle.Tensor, sin: paddle.Tensor,
                segment_ids: SegmentRows | None = None) -> paddle.Tensor:
        """x [N, E] packed patches split by `segments`, or [B, N, E] padded rows split by `segment_ids`."""
        lead = list(x.shape[:-1])
        q, k, v = self.qkv(x).reshape(lead + [3, self.num_heads, -1]).unbind(axis=-3)
        # Rotary in fp32 like the reference, then back to the activation dtype.
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
        q, k = ((t.astype("float32") * cos + rotate_half(t.astype("float32")) * sin).astype(v.dtype) for t in (q, k))
        if segment_ids is None:
            out = attention(q[None], k[None], v[None], causal=False, segments=segments)
        else:
            out = attention(q, k, v, causal=False, segment_ids=segment_ids)
        return self.proj(out.reshape(lead + [-1]))


class VisionMlp(nn.Layer):
    def __init__(self, config: VisionConfig):
        super().__init__()
        hidden = config.mlp_hidden_size
        self.fc1 = nn.Linear(config.embed_dim, hidden)
        self.fc2 = nn.Linear(hidden, config.embed_dim)
        self.act = VISION_ACTIVATIONS[config.hidden_act]

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Qwen2VLVisionBlock(nn.Layer):
    def __init__(self, config: VisionConfig, norm: Callable[[int], nn.Layer] = layer_norm,
                 mlp: Callable[[VisionConfig], nn.Layer] = VisionMlp):
        super().__init__()
        self.norm1 = norm(config.embed_dim)
        self.norm2 = norm(config.embed_dim)
        self.attn = VisionAttention(config)
        self.mlp = mlp(config)

    def forward(self, x, segments: Segments | None, cos, sin, segment_ids=None) -> paddle.Tensor:
        x = x + self.attn(self.norm1(x), segments, cos, sin, segment_ids)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Layer):
    """Norm per patch, concatenate each merge x merge window, MLP to the LLM width."""

    def __init__(self, config: VisionConfig, norm: Callable[[int], nn.Layer] = layer_norm):
        super().__init__()
        self.merged_dim = config.embed_dim * config.spatial_merge_size**2
        self.ln_q = norm(config.embed_dim)
        self.mlp = nn.Sequential(
            nn.Linear(self.merged_dim, self.merged_dim),
            nn.GELU(),  # exact erf GELU, as the reference
            nn.Linear(self.merged_dim, config.hidden_size),
        )

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.mlp(self.ln_q(x).reshape([-1, self.merged_dim]))


class Qwen2VisionTransformer(nn.Layer):
    # What a variant tower swaps (see Qwen2_5_VisionTransformer): the norm and MLP of blocks and merger.
    block_norm: Callable[[int], nn.Layer] = staticmethod(layer_norm)
    block_mlp: Callable[[VisionConfig], nn.Layer] = VisionMlp

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.blocks = nn.LayerList(
            [Qwen2VLVisionBlock(config, self.block_norm, self.block_mlp) for _ in range(config.depth)])
        self.merger = PatchMerger(config, self.block_norm)

    def rotary_cos_sin(self, grid_thw: np.ndarray) -> tuple[paddle.Tensor, paddle.Tensor]:
        """cos/sin [N, head_dim]: half the rotary channels encode the patch row, half the column."""
        rot_dim = self.config.embed_dim // self.config.num_heads // 2
        inv_freq = 1.0 / (10000.0 ** (paddle.arange(0, rot_dim, 2, dtype="float32") / rot_dim))
        positions = paddle.to_tensor(vision_rotary_positions(grid_thw, self.config.spatial_merge_size), "float32")
        freqs = (positions[:, :, None] * inv_freq[None, None, :]).reshape([positions.shape[0], -1])
        emb = paddle.concat([freqs, freqs], axis=-1)
        return emb.cos(), emb.sin()

    def forward_features(self, pixel_values: paddle.Tensor, grid_thw) -> paddle.Tensor:
        """The tower without its merger: pixel_values [N, C*T*P*P] -> patch features [N, embed_dim]."""
        grid_thw = as_numpy(grid_thw).astype(np.int64).reshape(-1, 3)
        x = self.patch_embed(pixel_values)
        cos, sin = self.rotary_cos_sin(grid_thw)
        segments = vision_segments(grid_thw)
        for block in self.blocks:
            x = block(x, segments, cos, sin)
        return x

    def forward_padded(self, pixel_values: paddle.Tensor, cos: paddle.Tensor, sin: paddle.Tensor,
                       segment_ids: paddle.Tensor) -> paddle.Tensor:
        """`forward_features` on a batch of padded rows: pixel_values [B, N, C*T*P*P], the rows' rotary tables
        cos/sin [B, N, head_dim] (`rotary_cos_sin` of each row's grids) and segment_ids [B, N] (one id per
        image/frame, padding in a segment of its own) -> [B, N, embed_dim]. Exact per row: a patch attends only
        to its own image/frame, so padding changes nothing in the real rows."""
        x = self.patch_embed(pixel_values)
        rows = SegmentRows(segment_ids)  # one block-diagonal GPU mask for all blocks (N6)
        for block in self.blocks:
            x = block(x, None, cos, sin, rows)
        return x

    def forward(self, pixel_values: paddle.Tensor, grid_thw) -> paddle.Tensor:
        """pixel_values [N, C*T*P*P] (processor patch order) -> merged features [N / merge^2, hidden_size]."""
        return self.merger(self.forward_features(pixel_values, grid_thw))
