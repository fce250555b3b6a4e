"""The distributed forward of one micro-batch: embeddings with the vision tokens placed, the decoder, and the
loss head on the supervised positions only.

Vision. The frozen ViT blocks run densely on this rank's own patches (any number of images/videos of any
size). Their output [P_local, E] is zero-padded to the longest over dp and lifted to a dp-sharded
[dp, P_max, E]; a trainable merger (replicated) runs on that as dist ops — a frozen one runs densely before
the lift. A trainable ViT runs as dist ops from the start: this rank's pixels, rotary tables and per-patch
frame ids are padded to P_max and lifted the same way, and `forward_padded` runs the blocks on [dp, P_max, ...]
with attention restricted to each frame (padding is a frame of its own, so real rows are exact). A rank with
no image lifts only padding: it joins every collective of the ViT's forward and backward, and since no token
reads its padded rows its gradient contribution is exactly zero.

A per-rank index [dp, b*S] (-1 for text) pulls each vision token into the token embeddings with
take_along_axis + where, so no LocalLayer is involved and a trainable merger's (and ViT's) gradients are summed
over dp by the autograd of those ops (LocalLayer/local_map with a Partial output gives wrong gradients in
Paddle 3.3.1).

Loss. Token cross-entropy summed over the global batch, divided by the number of supervised tokens over the
whole global batch (all dp ranks and all accumulation micro-steps): the loss and its gradients do not depend
on the layout. The head runs fused with the loss and chunked (network.loss.linear_cross_entropy, never
[tokens, vocab] logits) with `vocab_parallel_chunk`: with vocab-split logits it reduces only [dp, chunk]-sized
statistics across "mp"; `F.cross_entropy` would all-gather the full [B, S, V] logits first (measured).
"""
from __future__ import annotations

import paddle
import paddle.distributed as dist

from autoparallel import cpu_compat
from autoparallel.batch import ShardedBatch, lift_local
from autoparallel.context_parallel import gather_context, scatter_context, split_rows
from autoparallel.embedding import embedding_uses, lookup
from network.loss import exact_fp32_matmuls, linear_cross_entropy
from network.loss_chunks import rows_per_chunk
from network.modeling_vision import vision_segment_ids

# Training batches are right-padded (collator, shard_batch): causal attention alone keeps every real token away
# from the padding after it, and padded positions are never read (loss_index, vision_index). So the decoder
# gets no key mask: the GPU path runs causal flash attention instead of a dense [b, 1, S, S] mask.
TRAINING_KEY_MASK = None


def _padded(local: paddle.Tensor, rows: int, value: float = 0.0) -> paddle.Tensor:
    """`local` [n, ...] padded with `value` rows to [rows, ...]."""
    pad = paddle.full([rows - local.shape[0], *local.shape[1:]], value, local.dtype)
    return paddle.concat([local, pad])


def distributed_vision_features(visual: paddle.nn.Layer, batch: ShardedBatch) -> paddle.Tensor:
    """Trainable ViT: patch features [dp, P_max, E] (dp-sharded) computed as dist ops on every rank's patches."""
    c, rows = visual.config, batch.max_patches
    patch_dim = c.in_channels * c.temporal_patch_size * c.patch_size ** 2
    head_dim = c.embed_dim // c.num_heads
    # Every rank lifts its pixels in the tower's dtype (bf16 under O2, PatchEmbed's cast moved before the lift):
    # one dtype for the dist tensor on all dp ranks, image-less ones included, and half the bytes.
    dtype = visual.patch_embed.proj.weight.dtype
    if batch.pixel_values is None:
        # A rank without images still joins every collective; the rotary tables stay fp32 as the tower computes them.
        pixels = paddle.zeros([0, patch_dim], dtype)
        cos, sin = paddle.zeros([0, head_dim]), paddle.zeros([0, head_dim])
        segments = paddle.zeros([0], "int64")
    else:
        pixels = batch.pixel_values.astype(dtype)
        cos, sin = visual.rotary_cos_sin(batch.grid_thw)
        segments = paddle.to_tensor(vision_segment_ids(batch.grid_thw))
    lifted = [lift_local(_padded(x, rows, pad).unsqueeze(0), batch.mesh, 0)
              for x, pad in ((pixels, 0.0), (cos, 0.0), (sin, 0.0), (segments, -1))]
    return visual.forward_padded(*lifted)


def embed_inputs(model: paddle.nn.Layer, batch: ShardedBatch, weight: paddle.Tensor | None = None) -> paddle.Tensor:
    """Token embeddings [B, S, H] (dist) with this rank's vision tokens placed at its pad tokens; looked up in
    `weight` (default: the embedding's own, see `autoparallel.embedding.embedding_uses`)."""
    embeds = lookup(model.model.embed_tokens.weight if weight is None else weight, batch.input_ids)
    if not batch.max_patches:
        return embeds
    visual, mesh = model.visual, batch.mesh
    embed_dim = visual.config.embed_dim
    # Parallelized (dist parameters) from the first trainable part of the tower on; the rest stayed dense.
    merger_distributed = visual.merger.mlp[0].weight.is_dist()
    if visual.patch_embed.proj.weight.is_dist():
        lifted = distributed_vision_features(visual, batch)
    else:
        with paddle.no_grad():
            # A rank without images still runs the merger: its empty input takes the tower's dtype (bf16 under O2).
            local = (paddle.zeros([0, embed_dim], visual.patch_embed.proj.weight.dtype) if batch.pixel_values is None
                     else visual.forward_features(batch.pixel_values, batch.grid_thw))
            local = _padded(local, batch.max_patches)
            if not merger_distributed:
                local = visual.merger(local)
        lifted = lift_local(local.unsqueeze(0), mesh, 0)  # [dp, P_max, E], or merged already [dp, M_max, H]
    features = (visual.merger(lifted).reshape([lifted.shape[0], -1, embeds.shape[-1]]) if merger_distributed
                else lifted)
    index = batch.vision_index
    picked = paddle.take_along_axis(features, paddle.clip(index, min=0).unsqueeze(-1), axis=1)
    picked = picked.reshape(embeds.shape).astype(embeds.dtype)
    return paddle.where((index >= 0).reshape(embeds.shape[:2] + [1]), picked, embeds)


def _like_vocab(logits: paddle.Tensor, local: paddle.Tensor) -> paddle.Tensor:
    """`local` ([V, ...]) placed like the vocab dim of `logits` (split where the logits are split)."""
    if not logits.is_dist():
        return local
    vocab_dim = logits.ndim - 1
    placements = [dist.Shard(0) if p == dist.Shard(vocab_dim) else dist.Replicate() for p in logits.placements]
    return dist.shard_tensor(local, logits.process_mesh, placements)


def vocab_parallel_chunk(h, weight, targets, scale, transpose_weight, need):
    """`network.loss.ChunkRule` for distributed hidden rows [dp, c, H] and a head weight split on the vocab or
    not: only [dp, c]-sized statistics cross "mp" (row max, sum of exp, target logit); row sums are matmuls
    with a vocab-split ones vector and the target's logit a one-hot against vocab-split ids, because `sum`'s
    and `take_along_axis`'s dist rules would all-gather the [dp, c, V] logits."""
    logits = paddle.matmul(h, weight, transpose_y=transpose_weight).astype("float32")
    # Autocast off for the statistics: matmul is on the O2 white list and would run these row sums in bf16; and
    # no TF32 for them on a GPU (N3), which would round the logits the row sums read.
    with paddle.amp.auto_cast(enable=False), exact_fp32_matmuls():
        return _chunk_statistics(logits, h, weight, targets, scale, transpose_weight, need)


def _chunk_statistics(logits, h, weight, targets, scale, transpose_weight, need):
    vocab = logits.shape[-1]
    ones = _like_vocab(logits, paddle.ones([vocab, 1], "float32"))
    onehot = (targets.unsqueeze(-1) == _like_vocab(logits, paddle.arange(vocab, dtype=targets.dtype)))
    onehot = onehot.astype("float32")

    def row_sum(x: paddle.Tensor) -> paddle.Tensor:
        return paddle.matmul(x, ones).squeeze(-1)

    shifted = logits - logits.max(axis=-1, keepdim=True)
    target = row_sum(shifted * onehot)
    exp = paddle.exp(shifted)
    sum_exp = row_sum(exp)
    loss = ((paddle.log(sum_exp) - target) * scale).sum()
    if not any(need):
        return loss, None, None
    grad = ((exp / sum_exp.unsqueeze(-1) - onehot) * scale.unsqueeze(-1)).astype(h.dtype)
    d_hidden = None
    if need[0]:
        # Partial over "mp" when the vocab is split: reduced here, because a PyLayer's returned gradient is
        # taken to have its input's placements as it is (no reshard).
        d_hidden = paddle.matmul(grad, weight, transpose_y=not transpose_weight)
        d_hidden = dist.reshard(d_hidden, h.process_mesh, h.placements)
    d_weight = None
    if need[1]:
        flat_grad, flat_h = grad.reshape([-1, vocab]), h.reshape([-1, h.shape[-1]])
        d_weight = (paddle.matmul(flat_grad, flat_h, transpose_x=True) if transpose_weight
                    else paddle.matmul(flat_h, flat_grad, transpose_x=True))
    return loss, d_hidden, d_weight


def forward_loss(model: paddle.nn.Layer, batch: ShardedBatch, normalizer: float) -> paddle.Tensor:
    """Distributed forward of one micro-batch: summed token CE / `normalizer` (see `supervised_tokens`).

    The head runs only on the hidden states whose next token is supervised (`loss_index`): in SFT most
    tokens are prompt and image tokens, and the [tokens, vocab] logits dominate the step otherwise."""
    with cpu_compat.zero3_gathered(model):
        # Context parallel: the decoder runs on this rank's slice of every sequence (no-ops without "cp").
        table, head = embedding_uses(model)
        embeds = scatter_context(embed_inputs(model, batch, table))
        hidden = model.model(embeds, batch.position_ids, TRAINING_KEY_MASK, segment_ids=batch.segment_ids)
        return supervised_loss(model, gather_context(hidden), batch, normalizer, head)


def supervised_loss(model: paddle.nn.Layer, hidden: paddle.Tensor, batch: ShardedBatch, normalizer: float,
                    head: tuple[paddle.Tensor, bool] | None = None) -> paddle.Tensor:
    """Head + CE on the final hidden states [B, S, H] only where the next token is supervised; `head` is
    (weight, transposed), default `model.lm_head_weight()`."""
    dp, width = batch.loss_index.shape[0], hidden.shape[-1]
    picked = paddle.take_along_axis(hidden.reshape([dp, -1, width]), batch.loss_index.unsqueeze(-1), axis=1)
    # Context parallel: each cp rank takes an equal share of the supervised rows, wherever in the sequence they
    # are (an answer at the end of a long sample lies in one rank's slice; a head on each rank's own slice
    # would leave that rank the whole [K, V] work, the largest of the step).
    picked, targets = split_rows(picked), split_rows(batch.loss_targets)
    weight, transpose = model.lm_head_weight() if head is None else head
    return linear_cross_entropy(picked, weight, targets, transpose_weight=transpose,
                                normalizer=normalizer, chunk_rows=loss_chunk_rows(picked, weight, transpose),
                                rule=vocab_parallel_chunk)


def local_shape(tensor: paddle.Tensor) -> list[int]:
    """The shape this rank computes on: a dist tensor's local piece, else the tensor's own."""
    return list(tensor._local_shape if tensor.is_dist() else tensor.shape)


def loss_chunk_rows(hidden: paddle.Tensor, weight: paddle.Tensor, transpose_weight: bool) -> int:
    """Loss chunk rows from the local shapes (N8): each rank computes the logits of its dp rows and V/mp
    columns, so sizing from the global [dp, K, H] and V would make dp*mp times more, smaller chunks, each
    writing a full [V/mp, H] weight gradient."""
    return rows_per_chunk(local_shape(hidden), local_shape(weight), transpose_weight)
