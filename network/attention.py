"""The one place that picks the attention kernel for text and vision attention.

Layout everywhere: q [batch, q_len, heads, head_dim], k/v [batch, kv_len, kv_heads, head_dim] (GQA when
kv_heads < heads). Text attention is causal with an optional key-padding mask; with a KV cache the queries are
the last q_len of the kv_len positions (kv_len >= q_len), so causality is aligned bottom-right. Vision attention
is block-diagonal: token i attends to token j only if both fall in the same `cu_seqlens` segment (one image or
one video frame).
"""
from __future__ import annotations

import paddle
import paddle.nn.functional as F


def _use_gpu_kernels(q: paddle.Tensor) -> bool:
    # Flash kernels exist only for half precision on CUDA builds.
    return (
        paddle.is_compiled_with_cuda()
        and q.place.is_gpu_place()
        and q.dtype in (paddle.float16, paddle.bfloat16)
    )


def attention(
    q: paddle.Tensor,
    k: paddle.Tensor,
    v: paddle.Tensor,
    *,
    causal: bool,
    attention_mask: paddle.Tensor | None = None,
    cu_seqlens: paddle.Tensor | None = None,
) -> paddle.Tensor:
    """Scaled dot-product attention (scale 1/sqrt(head_dim)); returns [batch, q_len, heads, head_dim].

    attention_mask: [batch, kv_len], 1 = token, 0 = padding (keys at padding are never attended).
    cu_seqlens: int32 [n + 1] segment boundaries for a single packed sequence (batch 1).
    """
    if _use_gpu_kernels(q):
        return _gpu_attention(q, k, v, causal, attention_mask, cu_seqlens)
    return _math_attention(q, k, v, causal, attention_mask, cu_seqlens)


def _math_attention(q, k, v, causal, attention_mask, cu_seqlens) -> paddle.Tensor:
    """Exact reference math: fp32 scores and softmax, masked by a boolean [batch, 1, q_len, kv_len] map."""
    heads, head_dim = q.shape[2], q.shape[3]
    k, v = _repeat_kv(k, heads), _repeat_kv(v, heads)
    qt, kt, vt = (x.transpose([0, 2, 1, 3]) for x in (q, k, v))
    scores = paddle.matmul(qt.astype("float32"), kt.astype("float32"), transpose_y=True) * head_dim**-0.5
    allowed = _allowed(q.shape[1], k.shape[1], causal, attention_mask, cu_seqlens)
    if allowed is not None:
        # A large finite negative (not -inf) keeps fully masked padding rows finite, as HF does.
        scores = paddle.where(allowed, scores, paddle.full([], paddle.finfo(paddle.float32).min, "float32"))
    probs = F.softmax(scores, axis=-1).astype(v.dtype)
    return paddle.matmul(probs, vt).transpose([0, 2, 1, 3])


def _allowed(q_len: int, kv_len: int, causal: bool, attention_mask, cu_seqlens) -> paddle.Tensor | None:
    """Boolean [batch or 1, 1, q_len, kv_len] map (True = attend), or None when everything is allowed."""
    allowed = None
    if causal:
        # Query i sits at position kv_len - q_len + i (cached keys come first).
        allowed = paddle.tril(paddle.ones([q_len, kv_len], "bool"), diagonal=kv_len - q_len)[None, None]
    if attention_mask is not None:
        keys = attention_mask.astype("bool")[:, None, None, :]
        allowed = keys if allowed is None else paddle.logical_and(allowed, keys)
    if cu_seqlens is not None:
        segment = paddle.searchsorted(cu_seqlens[1:].astype("int64"), paddle.arange(q_len, dtype="int64"), right=True)
        same = (segment[:, None] == segment[None, :])[None, None]
        allowed = same if allowed is None else paddle.logical_and(allowed, same)
    return allowed


def _repeat_kv(x: paddle.Tensor, heads: int) -> paddle.Tensor:
    # Query head h reads kv head h // (heads / kv_heads), the grouping Qwen2 checkpoints are trained with.
    groups = heads // x.shape[2]
    return x if groups == 1 else paddle.repeat_interleave(x, groups, axis=2)


def _gpu_attention(q, k, v, causal, attention_mask, cu_seqlens) -> paddle.Tensor:
    """CUDA fast paths. Not exercised on CPU: written against Paddle 3.x `flash_attention` / SDPA signatures."""
    from paddle.nn.functional.flash_attention import flash_attention, flash_attn_unpadded

    if cu_seqlens is not None:
        # Varlen flash attention over the packed patches of all images/frames (batch is 1).
        cu = cu_seqlens.astype("int32")
        max_len = int((cu[1:] - cu[:-1]).max())
        out, _ = flash_attn_unpadded(
            q[0], k[0], v[0], cu, cu, max_len, max_len, scale=q.shape[-1] ** -0.5, causal=False,
        )
        return out.unsqueeze(0)
    if attention_mask is None and q.shape[1] == k.shape[1]:
        # flash_attention handles GQA (kv_heads dividing heads) natively.
        out, _ = flash_attention(q, k, v, causal=causal)
        return out
    # Padded batches and cached decoding: SDPA with the same boolean map as the CPU path (True = attend; GQA
    # handled by SDPA).
    allowed = _allowed(q.shape[1], k.shape[1], causal, attention_mask, None)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
