"""The distributed forward of one micro-batch: embeddings with the vision tokens placed, the decoder, and the
loss head on the supervised positions only.

Vision. The frozen ViT blocks run densely on this rank's own patches (any number of images/videos of any
size). Their output [P_local, E] is zero-padded to the longest over dp and lifted to a dp-sharded
[dp, P_max, E]; a trainable merger (replicated) runs on that as dist ops — a frozen one runs densely before
the lift. A per-rank index [dp, b*S] (-1 for text) pulls each vision token into the token embeddings with
take_along_axis + where, so no LocalLayer is involved and a trainable merger's gradients are summed over dp by
the autograd of those ops (LocalLayer/local_map with a Partial output gives wrong gradients in Paddle 3.3.1).

Loss. Token cross-entropy summed over the global batch, divided by the number of supervised tokens over the
whole global batch (all dp ranks and all accumulation micro-steps): the loss and its gradients do not depend
on the layout. With vocab-split logits, `vocab_parallel_cross_entropy` reduces only [B, S]-sized
statistics across "mp"; `F.cross_entropy` would all-gather the full [B, S, V] logits first (measured).
"""
from __future__ import annotations

import paddle
import paddle.distributed as dist

from autoparallel import cpu_compat
from autoparallel.batch import IGNORE_INDEX, ShardedBatch, lift_local


def embed_inputs(model: paddle.nn.Layer, batch: ShardedBatch) -> paddle.Tensor:
    """Token embeddings [B, S, H] (dist) with this rank's vision tokens placed at its pad tokens."""
    embeds = model.model.embed_tokens(batch.input_ids)
    if not batch.max_patches:
        return embeds
    visual, mesh = model.visual, batch.mesh
    embed_dim = visual.config.embed_dim
    # A trainable merger was parallelized (dist parameters); a frozen one stayed dense like the ViT blocks.
    merger_distributed = visual.merger.mlp[0].weight.is_dist()
    with paddle.no_grad():
        local = (paddle.zeros([0, embed_dim]) if batch.pixel_values is None
                 else visual.forward_features(batch.pixel_values, batch.grid_thw))
        local = paddle.concat([local, paddle.zeros([batch.max_patches - local.shape[0], embed_dim], local.dtype)])
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


def vocab_parallel_cross_entropy(logits: paddle.Tensor, targets: paddle.Tensor) -> paddle.Tensor:
    """Sum of cross-entropy over targets != -100 (fp32), for logits [..., V] split on V or not.

    Only [...]-sized statistics cross "mp" (max, sum of exp, target logit); row sums are matmuls with a
    vocab-split ones vector because `sum`'s backward would all-gather its [..., V] input.
    """
    logits = logits.astype("float32")
    vocab = logits.shape[-1]
    ones = _like_vocab(logits, paddle.ones([vocab, 1], "float32"))
    ids = _like_vocab(logits, paddle.arange(vocab, dtype=targets.dtype))

    def row_sum(x: paddle.Tensor) -> paddle.Tensor:
        return paddle.matmul(x, ones).squeeze(-1)

    shifted = logits - logits.max(axis=-1, keepdim=True).detach()
    log_sum_exp = paddle.log(row_sum(paddle.exp(shifted)))
    target = row_sum(shifted * (targets.unsqueeze(-1) == ids).astype("float32"))
    valid = (targets != IGNORE_INDEX).astype("float32")
    return ((log_sum_exp - target) * valid).sum()


def forward_loss(model: paddle.nn.Layer, batch: ShardedBatch, normalizer: float) -> paddle.Tensor:
    """Distributed forward of one micro-batch: summed token CE / `normalizer` (see `supervised_tokens`).

    The head runs only on the hidden states whose next token is supervised (`loss_index`): in SFT most
    tokens are prompt and image tokens, and the [tokens, vocab] logits dominate the step otherwise."""
    with cpu_compat.zero3_gathered(model):
        embeds = embed_inputs(model, batch)
        hidden = model.model(embeds, batch.position_ids, batch.attention_mask)
        return supervised_loss(model, hidden, batch, normalizer)


def supervised_loss(model: paddle.nn.Layer, hidden: paddle.Tensor, batch: ShardedBatch,
                    normalizer: float) -> paddle.Tensor:
    """Head + CE on the final hidden states [B, S, H] only where the next token is supervised."""
    dp, width = batch.loss_index.shape[0], hidden.shape[-1]
    picked = paddle.take_along_axis(hidden.reshape([dp, -1, width]), batch.loss_index.unsqueeze(-1), axis=1)
    return vocab_parallel_cross_entropy(model.lm_logits(picked), batch.loss_targets) / normalizer
