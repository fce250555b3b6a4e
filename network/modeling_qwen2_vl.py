"""Qwen2-VL and Qwen2.5-VL for conditional generation in plain Paddle (no distributed code).

The two share this file: the decoder, the vision-feature scatter and the loss are the same; `config.model_type`
picks the vision tower (network/modeling_vision.py, network/modeling_vision_window.py) and whether video
M-RoPE time follows `second_per_grid_ts` (network/rope_index.py).

Reads like the HF file: parameter names equal the Hub checkpoint keys (`visual.*`, `model.*`,
`lm_head.weight`), so a weight name points at the code that uses it. Paddle `nn.Linear` weights are
[in, out]; `network.weights` transposes at the checkpoint boundary.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Union

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from network.attention import PackedRows, attention
from network.config import Qwen2VLConfig
from network.device import allocation_dtype
from network.loss import IGNORE_INDEX, linear_cross_entropy
from network.modeling_vision import Qwen2VisionTransformer, as_numpy, rotate_half
from network.modeling_vision_window import Qwen2_5_VisionTransformer
from network.rms_norm import Qwen2RMSNorm
from network.rope_index import get_rope_index_for_config
from network.weights import load_weights, save_weights

if TYPE_CHECKING:
    from network.generation import KVCache

Array = Union[paddle.Tensor, np.ndarray]


@dataclass
class Qwen2VLOutput:
    """`logits` [B, S, vocab] are computed from the final hidden states on first access: a training step that
    reads only `loss` (computed by the fused chunked head) never holds [B, S, vocab] logits."""
    loss: paddle.Tensor | None
    hidden_states: paddle.Tensor  # final (normed) hidden states [B, S, H]
    rope_deltas: np.ndarray | None
    head: Callable[[paddle.Tensor], paddle.Tensor] = field(repr=False)

    @functools.cached_property
    def logits(self) -> paddle.Tensor:
        return self.head(self.hidden_states)


def apply_rotary(q: paddle.Tensor, k: paddle.Tensor, cos: paddle.Tensor, sin: paddle.Tensor, dtype
                 ) -> tuple[paddle.Tensor, paddle.Tensor]:
    """Rotary on q and k, returned in `dtype` (v's): fp32 cos/sin (bf16 O2 keeps the embedding fp32) would
    otherwise promote bf16 q/k to fp32 and keep the decoder off the flash kernels."""
    return (q * cos + rotate_half(q) * sin).astype(dtype), (k * cos + rotate_half(k) * sin).astype(dtype)


def mrope_cos_sin(config: Qwen2VLConfig, position_ids: paddle.Tensor, dtype) -> tuple[paddle.Tensor, paddle.Tensor]:
    """M-RoPE tables [B, S, 1, head_dim] from position_ids [3, B, S].

    Rotary channel pair j takes its angle from axis t, h or w according to `mrope_section`
    (the same split is used for both halves that rotate_half pairs up).
    """
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (paddle.arange(0, dim, 2, dtype="float32") / dim))
    freqs = position_ids.astype("float32")[..., None] * inv_freq  # [3, B, S, dim/2]
    emb = paddle.concat([freqs, freqs], axis=-1)
    chunks = config.mrope_section * 2
    cos = paddle.concat([c[i % 3] for i, c in enumerate(emb.cos().split(chunks, axis=-1))], axis=-1)
    sin = paddle.concat([c[i % 3] for i, c in enumerate(emb.sin().split(chunks, axis=-1))], axis=-1)
    return cos.astype(dtype)[:, :, None, :], sin.astype(dtype)[:, :, None, :]


class Qwen2VLAttention(nn.Layer):
    def __init__(self, config: Qwen2VLConfig, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx  # which KV-cache slot this layer reads and extends
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias_attr=False)

    def forward(self, x, cos, sin, attention_mask, cache: KVCache | None = None,
                packed: PackedRows | None = None) -> paddle.Tensor:
        b, s = x.shape[0], x.shape[1]
        # -1 head counts keep the reshape valid when q/k/v are column-sharded by heads.
        q = self.q_proj(x).reshape([b, s, -1, self.head_dim])
        k = self.k_proj(x).reshape([b, s, -1, self.head_dim])
        v = self.v_proj(x).reshape([b, s, -1, self.head_dim])
        q, k = apply_rotary(q, k, cos, sin, v.dtype)
        if cache is not None:  # keys are cached after rotary: their positions never change
            k, v = cache.update(self.layer_idx, k, v)
        out = attention(q, k, v, causal=True, attention_mask=attention_mask, packed=packed)
        return self.o_proj(out.reshape([b, s, -1]))


class Qwen2MLP(nn.Layer):
    def __init__(self, config: Qwen2VLConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias_attr=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias_attr=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias_attr=False)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen2VLDecoderLayer(nn.Layer):
    def __init__(self, config: Qwen2VLConfig, layer_idx: int = 0):
        super().__init__()
        self.self_attn = Qwen2VLAttention(config, layer_idx)
        self.mlp = Qwen2MLP(config)
        self.input_layernorm = Qwen2RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = Qwen2RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, attention_mask, cache: KVCache | None = None,
                packed: PackedRows | None = None) -> paddle.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attention_mask, cache, packed)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2VLTextModel(nn.Layer):
    def __init__(self, config: Qwen2VLConfig):
        super().__init__()
        self.config = config
        # No padding_idx: Paddle would return zeros for pad ids, the reference returns the stored row.
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.LayerList([Qwen2VLDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = Qwen2RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, inputs_embeds, position_ids, attention_mask=None, cache: KVCache | None = None,
                segment_ids: paddle.Tensor | None = None) -> paddle.Tensor:
        """attention_mask covers the cached and the new positions ([B, cache_len + S]); `segment_ids` [B, S]
        mark the samples of packed rows (attention stays within a sample)."""
        cos, sin = mrope_cos_sin(self.config, position_ids, inputs_embeds.dtype)
        packed = None if segment_ids is None else PackedRows(segment_ids)
        x = inputs_embeds
        for layer in self.layers:
            x = layer(x, cos, sin, attention_mask, cache, packed)
        if cache is not None:
            cache.advance(x.shape[1])
        return self.norm(x)


def causal_lm_loss(
    hidden: paddle.Tensor, head: tuple[paddle.Tensor, bool], labels: paddle.Tensor,
    normalizer: paddle.Tensor | float | None = None,
) -> paddle.Tensor:
    """Sum of fp32 token cross-entropy over shifted labels != -100, divided by `normalizer` (default: the
    number of such labels; pass a global count under gradient accumulation). `hidden` [B, S, H] are the final
    hidden states and `head` the output head's (weight, transposed) (see `lm_head_weight`): the head runs
    chunked and fused with the loss on the supervised rows only (network/loss.py), never as [B, S, V] logits."""
    # Shift the labels, not the hidden states; gather the supervised rows ([n, H], cheap) before the head.
    targets = paddle.concat([labels[:, 1:], paddle.full_like(labels[:, :1], IGNORE_INDEX)], axis=1)
    targets = targets.astype("int64").reshape([-1])
    valid = targets != IGNORE_INDEX
    rows = paddle.nonzero(valid).reshape([-1])
    count = int(rows.shape[0])
    if normalizer is None:
        normalizer = max(count, 1)
    flat = hidden.reshape([-1, hidden.shape[-1]])
    if count < flat.shape[0]:
        flat, targets = paddle.gather(flat, rows), paddle.gather(targets, rows)
    weight, transpose = head
    return linear_cross_entropy(flat, weight, targets, transpose_weight=transpose, normalizer=float(normalizer))


def _tensor(x: Array | None) -> paddle.Tensor | None:
    return x if x is None or isinstance(x, paddle.Tensor) else paddle.to_tensor(x)


def _scatter_features(inputs_embeds, input_ids, token_id: int, features, kind: str) -> paddle.Tensor:
    """Put feature row n at the n-th `token_id` position (row-major over the batch).

    Gather-by-cumsum + where instead of masked_scatter or per-sample loops, so the same code runs on
    distributed tensors.
    """
    mask = input_ids == token_id
    count = int(mask.astype("int64").sum())
    if count != features.shape[0]:
        raise ValueError(
            f"{kind} features and {kind} tokens do not match: tokens {count}, features {features.shape[0]}"
        )
    index = paddle.clip(mask.astype("int64").reshape([-1]).cumsum() - 1, min=0)
    placed = paddle.gather(features.astype(inputs_embeds.dtype), index).reshape(inputs_embeds.shape)
    return paddle.where(mask[..., None], placed, inputs_embeds)


VISION_TOWERS = {"qwen2_vl": Qwen2VisionTransformer, "qwen2_5_vl": Qwen2_5_VisionTransformer}


class Qwen2VLForConditionalGeneration(nn.Layer):
    def __init__(self, config: Qwen2VLConfig):
        super().__init__()
        self.config = config
        self.visual = VISION_TOWERS[config.model_type](config.vision_config)
        self.model = Qwen2VLTextModel(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias_attr=False)
        self._init_weights()

    def _init_weights(self) -> None:
        """Reference init for fresh models: N(0, 0.02) matrices, zero biases (norms keep ones), visited in
        a fixed order so `paddle.seed` makes it deterministic."""
        normal, zeros = nn.initializer.Normal(std=0.02), nn.initializer.Constant(0.0)
        for layer in self.sublayers():
            if isinstance(layer, (nn.Linear, nn.Embedding, nn.Conv3D)):
                normal(layer.weight)
                if getattr(layer, "bias", None) is not None:
                    zeros(layer.bias)

    def embed_multimodal(
        self,
        input_ids: paddle.Tensor,
        pixel_values: paddle.Tensor | None = None,
        image_grid_thw: Array | None = None,
        pixel_values_videos: paddle.Tensor | None = None,
        video_grid_thw: Array | None = None,
    ) -> paddle.Tensor:
        """Token embeddings with vision features placed at the image/video pad tokens."""
        inputs_embeds = self.model.embed_tokens(input_ids)
        if pixel_values is not None:
            features = self.visual(pixel_values, image_grid_thw)
            inputs_embeds = _scatter_features(inputs_embeds, input_ids, self.config.image_token_id, features, "image")
        if pixel_values_videos is not None:
            features = self.visual(pixel_values_videos, video_grid_thw)
            inputs_embeds = _scatter_features(inputs_embeds, input_ids, self.config.video_token_id, features, "video")
        return inputs_embeds

    def forward(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        position_ids: Array | None = None,
        pixel_values: Array | None = None,
        image_grid_thw: Array | None = None,
        pixel_values_videos: Array | None = None,
        video_grid_thw: Array | None = None,
        second_per_grid_ts: Array | None = None,
        labels: Array | None = None,
        inputs_embeds: paddle.Tensor | None = None,
        loss_normalizer: paddle.Tensor | float | None = None,
        past_key_values: KVCache | None = None,
        logits_to_keep: int = 0,
        segment_ids: Array | None = None,
    ) -> Qwen2VLOutput:
        """Logits [B, S, vocab] and, with `labels`, the causal-LM loss. Grids may be numpy (host metadata).
        Without `position_ids`, 3-D M-RoPE positions are computed from `input_ids` on the host (Qwen2.5-VL:
        video time from `second_per_grid_ts` [n_videos], seconds per temporal patch; default 1).

        Decoding (see network.generation): `past_key_values` is extended in place with this call's keys/values;
        `input_ids` are then only the new tokens, `attention_mask` spans cached + new positions, and
        `position_ids` are required once the cache is non-empty. `logits_to_keep=n` returns logits of the
        last n positions only (0 = all), sparing the [B, S, vocab] prefill logits.

        Packed rows (padding-free training, see autoparallel.data.packing): `segment_ids` [B, S] give each
        token's sample; attention never crosses samples and `position_ids` must be each sample's own M-RoPE
        positions (restarting per sample); labels at a sample's first token are ignored by the packer."""
        input_ids, attention_mask, labels = _tensor(input_ids), _tensor(attention_mask), _tensor(labels)
        segment_ids = _tensor(segment_ids)
        if segment_ids is not None and (position_ids is None or past_key_values is not None):
            raise ValueError("packed rows (segment_ids) need each sample's position_ids and no KV cache")
        pixel_values, pixel_values_videos = _tensor(pixel_values), _tensor(pixel_values_videos)
        rope_deltas = None
        if position_ids is None and past_key_values is not None and past_key_values.seq_len:
            raise ValueError("position_ids are required when decoding with a non-empty KV cache")
        if position_ids is None:
            # Always 3-D M-RoPE positions, also for text-only batches (never 1-D).
            position_ids, rope_deltas = get_rope_index_for_config(
                self.config, as_numpy(input_ids),
                None if image_grid_thw is None else as_numpy(image_grid_thw),
                None if video_grid_thw is None else as_numpy(video_grid_thw),
                None if attention_mask is None else as_numpy(attention_mask),
                None if second_per_grid_ts is None else as_numpy(second_per_grid_ts),
            )
        position_ids = _tensor(position_ids)
        if position_ids.ndim != 3 or position_ids.shape[0] != 3:
            raise ValueError(f"position_ids must be M-RoPE positions [3, batch, seq], got shape {position_ids.shape}")
        if inputs_embeds is None:
            inputs_embeds = self.embed_multimodal(
                input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw
            )
        hidden = self.model(inputs_embeds, position_ids, attention_mask, past_key_values, segment_ids)
        loss = None
        if labels is not None:
            loss = causal_lm_loss(hidden, self.lm_head_weight(), labels, loss_normalizer)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return Qwen2VLOutput(loss=loss, hidden_states=hidden, rope_deltas=rope_deltas, head=self.lm_logits)

    def lm_head_weight(self) -> tuple[paddle.Tensor, bool]:
        """The output head's (weight, transposed): a tied head is the [V, H] embedding matrix (no separate
        parameter), an untied one the Linear's [H, V] weight."""
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.weight, True
        head = self.lm_head
        if getattr(head, "lora_A", None) is not None and not getattr(head, "merged", False):
            # A LoRA head (network/lora.py): the fused loss and the logits multiply by one weight, so the adapter
            # is folded into it, differentiably (A and B get their gradients through the sum); equal to LoRALinear's
            # x@W + (x@A)@B*scaling without dropout on the head's input.
            return head.weight + paddle.matmul(head.lora_A, head.lora_B) * head.scaling, False
        return head.weight, False

    def lm_logits(self, hidden: paddle.Tensor) -> paddle.Tensor:
        """Logits [..., vocab] of the output head."""
        weight, transpose = self.lm_head_weight()
        return paddle.matmul(hidden, weight, transpose_y=transpose)

    @classmethod
    def from_pretrained(cls, path: str, dtype: str | None = None) -> "Qwen2VLForConditionalGeneration":
        """Build from `config.json` and load HF safetensors (single/sharded) or `model_state.pdparams`."""
        model = cls.lazy(Qwen2VLConfig.from_pretrained(path), dtype or "float32")
        load_weights(model, path)
        model.eval()
        return model

    @classmethod
    def lazy(cls, config: Qwen2VLConfig, dtype: str = "float32") -> "Qwen2VLForConditionalGeneration":
        """The model with parameters of `dtype` declared but not allocated (`paddle.LazyGuard`): no memory and no
        random init until each one is loaded (`network.weights.load_weights`, or sharded by
        `autoparallel.sharded_load`)."""
        with _default_dtype(dtype), paddle.LazyGuard():
            return cls(config)

    def save_pretrained(self, path: str, format: str = "safetensors") -> None:
        """Write `config.json` plus weights as HF safetensors or Paddle `model_state.pdparams`."""
        self.config.save_pretrained(path)
        save_weights(self, path, format=format)


@contextlib.contextmanager
def _default_dtype(dtype: str):
    previous = paddle.get_default_dtype()
    paddle.set_default_dtype(allocation_dtype(dtype))
    try:
        yield
    finally:
        paddle.set_default_dtype(previous)

