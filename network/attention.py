"""The one place that picks the attention kernel for text and vision attention.

Layout everywhere: q [batch, q_len, heads, head_dim], k/v [batch, kv_len, kv_heads, head_dim] (GQA when
kv_heads < heads). Text attention is causal with an optional key-padding mask; with a KV cache the queries are
the last q_len of the kv_len positions (kv_len >= q_len), so causality is aligned bottom-right. Vision attention
is block-diagonal: token i attends to token j only if both fall in the same `Segments` segment (one image or
one video frame). Packed text rows (padding-free packing, several samples per row) pass `segment_ids`: a
query attends only to keys of its own sample, causally, so each sample sees exactly what it would alone. A
trainable ViT runs each dp rank's patches as one padded row of a batch and passes non-causal `segment_ids` (one id
per image/frame, the padding a segment of its own).

Kernels. On a GPU with flash attention (sm80+) and half-precision q/k/v: varlen `flash_attn_unpadded` for
segments, causal `flash_attention` without any mask when nothing is padded (training batches are right-padded,
and causality alone keeps every real token away from the padding after it, so the decoder is called without a
mask there), and for left-padded generation SDPA with an additive mask of the dtype's most negative finite value
(a fully masked padding row stays finite, unlike a boolean mask that becomes -inf). fp32 text prefill on a GPU
(plain tensors): SDPA, whose memory-efficient backend takes fp32. Everywhere else the exact fp32 math path,
which handles segments (images, frames, the samples of packed text rows) separately (one [heads, P, P] score
block for all images at once would be the sum of all images' patches squared).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import paddle
import paddle.nn.functional as F

from network.device import flash_attention_supported, kernel_dtypes, on_gpu


@dataclass(frozen=True)
class Segments:
    """Block-diagonal attention over one packed sequence (batch 1): the boundaries on the host (computed from
    grid_thw, so no device->host sync per block) and as the int32 device tensor varlen kernels take."""

    bounds: np.ndarray  # int [n + 1], 0 first, total last

    @cached_property
    def cu_seqlens(self) -> paddle.Tensor:
        # Uploaded once and shared by every ViT block of the forward (each upload is a host->device copy).
        return paddle.to_tensor(self.bounds.astype(np.int32))

    @property
    def max_len(self) -> int:
        return int(np.diff(self.bounds).max()) if len(self.bounds) > 1 else 0


@dataclass
class PackedRows:
    """The samples of packed text rows: `ids` int [batch, seq] (one id per sample, `-1` padding) and, read to
    the host once per forward and shared by every decoder layer, their varlen boundaries (on a GPU each read is
    a device->host sync)."""

    ids: paddle.Tensor
    _bounds: tuple[np.ndarray, int] | None = None

    @property
    def bounds(self) -> tuple[np.ndarray, int]:
        """(int32 cu_seqlens over the flattened rows, longest sample): `packed_cu_seqlens` of `ids`."""
        if self._bounds is None:
            self._bounds = packed_cu_seqlens(self.ids.numpy())
        return self._bounds

    @cached_property
    def sample_ends(self) -> paddle.Tensor:
        """int32 [batch, 1, seq, 1]: for each key, the end (exclusive) of its sample in its row: FlashMask's
        causal `startend_row_indices` (queries from that row on are masked), computed on the device from `ids`
        once per forward, with `ids`' batch split (no host read)."""
        seq = self.ids.shape[1]
        ids = self.ids.astype("int64")
        position = paddle.cumsum(paddle.ones_like(ids), axis=1) - 1
        starts = paddle.concat([paddle.zeros_like(ids[:, :1]).astype("bool"), ids[:, 1:] != ids[:, :-1]], axis=1)
        # A run starting at k ends every run before it: the end of key j is the first start after j, else seq.
        start_at = paddle.where(starts, position, paddle.full_like(position, seq))
        later = paddle.concat([start_at[:, 1:], paddle.full_like(start_at[:, :1], seq)], axis=1)
        # A suffix minimum as a prefix minimum of the reversed row; reversed by take_along_axis, which keeps the
        # batch split (flip has no sharding rule and would replicate the rows).
        reverse = (seq - 1) - position
        backwards = paddle.cummin(paddle.take_along_axis(later, reverse, axis=1), axis=1)[0]
        ends = paddle.take_along_axis(backwards, reverse, axis=1)
        return ends.astype("int32")[:, None, :, None]


@dataclass
class SegmentRows:
    """Padded ViT rows' `ids` int [batch, seq] (one id per image/frame, the padding a segment of its own), with
    the GPU path's additive block-diagonal mask built once per forward and shared by every block (N6: one mask
    per block, each kept for backward, was 32 [N, N] masks)."""

    ids: paddle.Tensor
    _masks: dict = field(default_factory=dict)

    def additive(self, dtype) -> paddle.Tensor:
        if dtype not in self._masks:
            seq = self.ids.shape[1]
            self._masks[dtype] = additive_mask(seq, seq, False, None, dtype, self.ids)
        return self._masks[dtype]


def _use_gpu_kernels(q: paddle.Tensor) -> bool:
    # Flash kernels exist only for half precision, on GPUs of compute capability >= 8.0.
    return q.dtype in kernel_dtypes() and flash_attention_supported()


def _use_fp32_sdpa(q: paddle.Tensor, causal: bool) -> bool:
    """fp32 causal text attention over several queries (prefill) on a GPU: SDPA, whose memory-efficient backend
    takes fp32 (Paddle 3.3.1 sdpa.py) and never holds the [batch, heads, q_len, kv_len] fp32 scores of the math
    path. Decoding (one query) stays on the math path: its scores are one row, and SDPA would repeat the cached
    k/v to the query heads. Not for distributed tensors: that kernel has no sharding rule in Paddle 3.3.1, so
    every rank would receive the replicated inputs."""
    return q.dtype == paddle.float32 and causal and q.shape[1] > 1 and not q.is_dist() and on_gpu()


def attention(
    q: paddle.Tensor,
    k: paddle.Tensor,
    v: paddle.Tensor,
    *,
    causal: bool,
    attention_mask: paddle.Tensor | None = None,
    segments: Segments | None = None,
    segment_ids: paddle.Tensor | SegmentRows | None = None,
    packed: PackedRows | None = None,
) -> paddle.Tensor:
    """Scaled dot-product attention (scale 1/sqrt(head_dim)); returns [batch, q_len, heads, head_dim].

    attention_mask: [batch, kv_len], 1 = token, 0 = padding (keys at padding are never attended); leave it out
    for right-padded batches whose padded positions are never read.
    segments: block-diagonal attention within each segment of a single packed sequence (batch 1).
    segment_ids: int [batch, seq] (q_len == kv_len, no cache): tokens attend only within their own id (the
    image/frame of a padded ViT row); a `SegmentRows` shares its GPU mask across calls.
    packed: the samples of packed text rows (q_len == kv_len, no cache, causal): each sample sees only itself.
    """
    if packed is not None and _use_gpu_kernels(q):
        return _gpu_packed_attention(q, k, v, packed)
    rows = segment_ids if isinstance(segment_ids, SegmentRows) else None
    if rows is not None:
        segment_ids = rows.ids
    if segment_ids is not None and _use_gpu_kernels(q):
        # Padded ViT rows: short, padding runs included; SDPA with the block-diagonal map (additive_mask).
        mask = (rows or SegmentRows(segment_ids)).additive(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if _use_gpu_kernels(q):
        return _gpu_attention(q, k, v, causal, attention_mask, segments)
    if segments is not None:
        return _segment_attention(q, k, v, segments.bounds.astype(np.int64))
    if packed is not None and not q.is_dist():
        return _packed_rows_attention(q, k, v, packed)
    if packed is None and segment_ids is None and _use_fp32_sdpa(q, causal):
        return _fp32_sdpa_attention(q, k, v, attention_mask)
    return _math_attention(q, k, v, causal, attention_mask, packed.ids if packed is not None else segment_ids)


def _packed_rows_attention(q, k, v, packed: PackedRows) -> paddle.Tensor:
    """Packed text rows on the math path: each sample's own causal attention, as the varlen kernel computes it,
    instead of whole-row scores under a mask (the sum of squared sample lengths instead of squared row lengths,
    and no mask over the row). Samples are contiguous once the rows are flattened, so a split (whose backward is
    a concat) hands each its slice. Distributed tensors keep the masked path: flattening the rows would not keep
    their batch split."""
    cu, _ = packed.bounds
    b, s = q.shape[0], q.shape[1]
    pieces = [paddle.split(x.reshape([1, b * s, x.shape[2], x.shape[3]]), np.diff(cu).tolist(), axis=1)
              for x in (q, k, v)]
    outs = [_math_attention(qi, ki, vi, True, None) for qi, ki, vi in zip(*pieces)]
    return paddle.concat(outs, axis=1).reshape(q.shape)


def _segment_attention(q, k, v, cu: np.ndarray) -> paddle.Tensor:
    """Block-diagonal attention as dense attention per segment, segments of one length batched together: no
    score map or mask over all patches (on CPU the masking alone costs more than the matmuls)."""
    heads, head_dim = q.shape[2], q.shape[3]
    lengths = np.diff(cu)
    if len(set(lengths.tolist())) == 1:  # one image, or frames of one video: a reshape, no copy
        n, length = len(lengths), int(lengths[0])
        q, k, v = (x.reshape([n, length, -1, head_dim]) for x in (q, k, v))
        return _math_attention(q, k, v, False, None).reshape([1, n * length, heads, head_dim])
    rows, outs = [], []
    for length in np.unique(lengths):
        starts = cu[:-1][lengths == length]
        index = (starts[:, None] + np.arange(length)).reshape(-1)
        t = paddle.to_tensor(index)
        group = [paddle.gather(x[0], t).reshape([len(starts), int(length), -1, head_dim]) for x in (q, k, v)]
        outs.append(_math_attention(*group, False, None).reshape([-1, heads, head_dim]))
        rows.append(index)
    order = paddle.to_tensor(np.argsort(np.concatenate(rows)))  # back to patch order
    return paddle.gather(paddle.concat(outs), order)[None]


# Score elements (fp32) one block of query rows may hold at once. Softmax rows are independent, so computing
# the queries in blocks is exact and bounds the score maps (scores, mask, probabilities) to O(block * kv_len)
# instead of O(q_len * kv_len): without it one long prompt (or a large image) needs tens of GB on CPU.
SCORE_BLOCK_ELEMENTS = 1 << 24
MIN_BLOCK_ROWS = 16  # below this, per-block overhead outweighs the memory it saves


def _math_attention(q, k, v, causal, attention_mask, segment_ids=None) -> paddle.Tensor:
    """Exact reference math in blocks of query rows, each block's score map at most SCORE_BLOCK_ELEMENTS.

    A causal block reads only the keys up to its last query (later ones are masked anyway), so a long causal
    prefill also does about half the work. A query with no allowed key at all (left padding) averages the
    values of the keys its block reads; such outputs are never read (they are padding)."""
    b, q_len, heads, _ = q.shape
    kv_len = k.shape[1]
    rows = max(MIN_BLOCK_ROWS, SCORE_BLOCK_ELEMENTS // max(b * heads * kv_len, 1))
    if q_len <= rows:
        return _dense_attention(q, k, v, causal, attention_mask, segment_ids, segment_ids)
    outs = []
    for start in range(0, q_len, rows):
        end = min(start + rows, q_len)
        keys = kv_len - q_len + end if causal else kv_len  # query i sits at position kv_len - q_len + i
        outs.append(_dense_attention(
            q[:, start:end], k[:, :keys], v[:, :keys], causal,
            None if attention_mask is None else attention_mask[:, :keys],
            None if segment_ids is None else segment_ids[:, :keys],
            None if segment_ids is None else segment_ids[:, start:end]))
    return paddle.concat(outs, axis=1)


def _dense_attention(q, k, v, causal, attention_mask, segment_ids, query_segment_ids) -> paddle.Tensor:
    """fp32 scores and softmax over all of q's rows at once, masked by a boolean [batch, 1, q_len, kv_len] map.

    GQA on plain tensors without repeating k/v: the query heads sharing a kv head are stacked along the query
    axis, so one matmul per kv head covers the group (repeating would copy the whole KV cache every decode
    step). Distributed tensors (heads split over "mp") repeat k/v instead, so every reshape keeps the split."""
    b, q_len, heads, head_dim = q.shape
    if q.is_dist():
        k, v = _repeat_kv(k, heads), _repeat_kv(v, heads)
    kv_heads, kv_len = k.shape[2], k.shape[1]
    qt, kt, vt = (x.transpose([0, 2, 1, 3]) for x in (q, k, v))
    # Scale q, not the [q_len, kv_len] scores: elementwise ops over the score map are slow on CPU.
    qt = qt.astype("float32") * head_dim**-0.5
    if kv_heads != heads:
        qt = qt.reshape([b, kv_heads, heads // kv_heads * q_len, head_dim])
    scores = paddle.matmul(qt, kt.astype("float32"), transpose_y=True)
    allowed = _allowed(q_len, kv_len, causal, attention_mask, segment_ids, query_segment_ids)
    if allowed is not None:
        # A large finite negative (not -inf) keeps fully masked padding rows finite, as HF does.
        scores = scores.reshape([b, heads, q_len, kv_len])
        scores = paddle.where(allowed, scores, paddle.full([], paddle.finfo(paddle.float32).min, "float32"))
        scores = scores.reshape([b, kv_heads, -1, kv_len])
    probs = F.softmax(scores, axis=-1).astype(v.dtype)
    out = paddle.matmul(probs, vt)
    if kv_heads != heads:
        out = out.reshape([b, heads, q_len, head_dim])
    return out.transpose([0, 2, 1, 3])


def _allowed(q_len: int, kv_len: int, causal: bool, attention_mask, segment_ids=None,
             query_segment_ids=None) -> paddle.Tensor | None:
    """Boolean [batch or 1, 1, q_len, kv_len] map (True = attend), or None when everything is allowed.
    `query_segment_ids` (default: `segment_ids`) are the queries' ids when they are a block of the keys' rows."""
    allowed = None
    if causal and q_len > 1:  # a single query (decoding) is the newest position: it sees every key
        # Query i sits at position kv_len - q_len + i (cached keys come first).
        allowed = paddle.tril(paddle.ones([q_len, kv_len], "bool"), diagonal=kv_len - q_len)[None, None]
    if attention_mask is not None:
        keys = attention_mask.astype("bool")[:, None, None, :]
        allowed = keys if allowed is None else paddle.logical_and(allowed, keys)
    if segment_ids is not None:
        queries = segment_ids if query_segment_ids is None else query_segment_ids
        same = (queries[:, :, None] == segment_ids[:, None, :])[:, None]
        allowed = same if allowed is None else paddle.logical_and(allowed, same)
    return allowed


def _repeat_kv(x: paddle.Tensor, heads: int) -> paddle.Tensor:
    # Query head h reads kv head h // (heads / kv_heads), the grouping Qwen2 checkpoints are trained with.
    # unsqueeze/expand/reshape, not repeat_interleave: these have SPMD rules, so a distributed k/v keeps its
    # placements (repeat_interleave has none in Paddle 3.3.1 and would all-gather it on every rank, N7).
    groups = heads // x.shape[2]
    if groups == 1:
        return x
    b, s, kv_heads, d = x.shape
    return x.unsqueeze(3).expand([b, s, kv_heads, groups, d]).reshape([b, s, heads, d])


def _heads_split(x: paddle.Tensor) -> bool:
    return x.is_dist() and any(p.is_shard() and p.get_dim() == 2 for p in x.placements)


def kv_for_kernel(q: paddle.Tensor, k: paddle.Tensor, v: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor]:
    """k/v as the fused kernels may take them. With q split by heads over "mp" and k/v replicated (more mp ranks
    than KV heads), the kernels' SPMD rule would split the few KV heads like q's heads (wrong or empty heads on
    most ranks): repeat them to q's head count first, so they split exactly like q."""
    if _heads_split(q) and not _heads_split(k):
        heads = q.shape[2]
        return _repeat_kv(k, heads), _repeat_kv(v, heads)
    return k, v


def additive_mask(q_len: int, kv_len: int, causal: bool, attention_mask, dtype,
                  segment_ids=None) -> paddle.Tensor | None:
    """[batch, 1, q_len, kv_len] of 0 (attend) and the most negative finite value of `dtype` (masked); None when
    nothing is masked."""
    allowed = _allowed(q_len, kv_len, causal, attention_mask, segment_ids)
    if allowed is None:
        return None
    # Built in fp32 and cast: every bf16/fp16 value, its minimum included, is exact in fp32.
    low = paddle.full([], paddle.finfo(dtype).min, "float32")
    return paddle.where(allowed, paddle.zeros([], "float32"), low).astype(dtype)


def _gpu_attention(q, k, v, causal, attention_mask, segments) -> paddle.Tensor:
    """CUDA fast paths, written against Paddle 3.x `flash_attention` / `flash_attn_unpadded` / SDPA. Checked on the
    CPU against the kernels' input contracts by the simulated GPU (network/simulated_gpu.py)."""
    from paddle.nn.functional.flash_attention import flash_attention, flash_attn_unpadded

    k, v = kv_for_kernel(q, k, v)
    if segments is not None:
        # Varlen flash attention over the packed patches of all images/frames (batch is 1).
        cu, max_len = segments.cu_seqlens, segments.max_len
        out, _ = flash_attn_unpadded(
            q[0], k[0], v[0], cu, cu, max_len, max_len, scale=q.shape[-1] ** -0.5, causal=False,
        )
        return out.unsqueeze(0)
    q_len, kv_len = q.shape[1], k.shape[1]
    if attention_mask is None and (q_len == kv_len or q_len == 1):
        # Training and unpadded prefill: causal. A decode step's single query is the newest position and sees
        # every cached key: nothing to mask (N1). flash_attention takes GQA (kv_heads dividing heads) natively.
        out, _ = flash_attention(q, k, v, causal=causal and q_len > 1)
        return out
    # Left-padded prefill, padded decoding, chunked prefill over a cache. SDPA takes GQA natively (enable_gqa):
    # repeating k/v would copy the cache, and all-gather it when it is split over "mp" (repeat_interleave has
    # no SPMD rule).
    mask = additive_mask(q_len, kv_len, causal, attention_mask, q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _fp32_sdpa_attention(q, k, v, attention_mask) -> paddle.Tensor:
    """Causal fp32 prefill through SDPA (see `_use_fp32_sdpa`; SDPA takes GQA k/v as they are)."""
    if attention_mask is None and q.shape[1] == k.shape[1]:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    # Left padding or cached keys: causality and padding as one additive mask (SDPA's is_causal aligns top-left).
    mask = additive_mask(q.shape[1], k.shape[1], True, attention_mask, q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def packed_cu_seqlens(segment_ids: np.ndarray) -> tuple[np.ndarray, int]:
    """int32 boundaries [n + 1] of the runs of equal ids in `segment_ids` [batch, seq] flattened row-major (a
    new run also starts at every row start), and the longest run: the varlen layout of packed rows."""
    flat = np.asarray(segment_ids).reshape(-1)
    seq = np.asarray(segment_ids).shape[-1]
    starts = np.flatnonzero(np.concatenate([[True], flat[1:] != flat[:-1]]) | (np.arange(flat.size) % seq == 0))
    cu = np.append(starts, flat.size).astype("int32")
    return cu, int(np.diff(cu).max())


def _gpu_packed_attention(q, k, v, packed: PackedRows) -> paddle.Tensor:
    """Causal FlashMask attention over packed rows: each key's sample end masks the later samples' queries (not
    exercised on CPU: written against Paddle 3.3.1 `flashmask_attention(query, key, value,
    startend_row_indices, causal=True)`). N5: FlashMask has a sharding rule (FlashMaskInferSpmd), so dp-split
    rows and mp-split heads stay local; the varlen kernel has none, and every rank received the replicated
    global batch in every layer."""
    from paddle.nn.functional.flash_attention import flashmask_attention

    k, v = kv_for_kernel(q, k, v)
    return flashmask_attention(q, k, v, packed.sample_ends, causal=True)
