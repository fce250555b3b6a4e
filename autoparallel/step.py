"""Per-rank numpy batches -> dp-sharded dist tensors, and the distributed forward + loss.

Data layout. Each dp rank reads its own samples (tensor-parallel peers read the same ones). `shard_batch`
lifts them with `dtensor_from_local` into global tensors sharded on the batch dim over "dp": ids/labels/mask
[B, S] Shard(0), M-RoPE `position_ids` [3, B, S] Shard(1) — taken from the data pipeline, never recomputed.
Sequence lengths differ between ranks, so every rank pads to the longest over dp (one tiny max-reduce).

Vision. The frozen ViT blocks run densely on this rank's own patches (any number of images/videos of any
size). Their output [P_local, E] is zero-padded to the longest over dp and lifted to a dp-sharded
[dp, P_max, E]; a trainable merger (replicated) runs on that as dist ops — a frozen one runs densely before
the lift. A per-rank index
[dp, b*S] (-1 for text) pulls each vision token into the token embeddings with take_along_axis + where, so
no LocalLayer is involved and a trainable merger's gradients are summed over dp by the autograd of those
ops (LocalLayer/local_map with a Partial output gives wrong gradients in Paddle 3.3.1).

Loss. Token cross-entropy summed over the global batch, divided by the number of supervised tokens over the
whole global batch (all dp ranks and all accumulation micro-steps): the loss and its gradients do not depend
on the layout. With vocab-split logits, `vocab_parallel_cross_entropy` reduces only [B, S]-sized
statistics across "mp"; `F.cross_entropy` would all-gather the full [B, S, V] logits first (measured).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import paddle
import paddle.distributed as dist

from autoparallel import cpu_compat
from network.config import Qwen2VLConfig

IGNORE_INDEX = -100


@dataclass
class ShardedBatch:
    """One micro-batch as global dist tensors (dp-sharded) plus this rank's dense vision inputs."""

    mesh: dist.ProcessMesh
    input_ids: paddle.Tensor  # [B, S] int64
    labels: paddle.Tensor  # [B, S] int64, IGNORE_INDEX where unsupervised
    position_ids: paddle.Tensor  # [3, B, S] int64
    attention_mask: paddle.Tensor  # [B, S] int64, 0 = padding
    vision_index: paddle.Tensor | None  # [dp, b*S] int64: row of this rank's merged vision tokens, -1 = text
    pixel_values: paddle.Tensor | None  # [P_local, C*T*P*P] this rank's image patches, then video patches
    grid_thw: np.ndarray | None  # [n, 3] matching pixel_values
    max_patches: int  # P_max over dp (0: no vision anywhere in this micro-batch)
    # Loss only needs logits where a next token is supervised: [dp, K] positions into this rank's flattened
    # [b*S] hidden states and their target ids (IGNORE_INDEX padding), K = the most such tokens on any rank.
    loss_index: paddle.Tensor | None = None
    loss_targets: paddle.Tensor | None = None


def _dp_placements(mesh: dist.ProcessMesh, dim: int) -> list:
    return [dist.Shard(dim) if name == "dp" else dist.Replicate() for name in mesh.dim_names]


def _lift(local: np.ndarray | paddle.Tensor, mesh: dist.ProcessMesh, dim: int) -> paddle.Tensor:
    local = local if isinstance(local, paddle.Tensor) else paddle.to_tensor(local)
    return dist.auto_parallel.api.dtensor_from_local(local, mesh, _dp_placements(mesh, dim))


def _replicated_value(tensor: paddle.Tensor) -> np.ndarray:
    tensor = dist.reshard(tensor, tensor.process_mesh, [dist.Replicate()] * len(tensor.process_mesh.shape))
    return tensor._local_value().numpy()


def _max_over_dp(values: Sequence[int], mesh: dist.ProcessMesh) -> list[int]:
    lifted = _lift(np.asarray([values], dtype=np.int64), mesh, 0)  # [dp, k]
    return [int(v) for v in _replicated_value(lifted.max(axis=0))]


def _pad(a: np.ndarray, length: int, value: int, axis: int = -1) -> np.ndarray:
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, length - a.shape[axis])
    return np.pad(a, widths, constant_values=value)


def _vision_index(input_ids: np.ndarray, config: Qwen2VLConfig, n_image: int, n_video: int) -> np.ndarray:
    """Row of the rank's merged features for each image/video pad token (images first), -1 elsewhere."""
    index = np.full(input_ids.shape, -1, dtype=np.int64)
    for token, start, count, kind in ((config.image_token_id, 0, n_image, "image"),
                                      (config.video_token_id, n_image, n_video, "video")):
        hits = input_ids == token
        if int(hits.sum()) != count:
            raise ValueError(f"{kind} pad tokens {int(hits.sum())} != merged {kind} features {count}")
        index[hits] = start + np.arange(count)
    return index


def _loss_positions(labels: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Flattened [b*seq_len] positions whose next token is supervised, and those next tokens."""
    labels = _pad(labels, seq_len, IGNORE_INDEX)
    rows, cols = np.nonzero(labels[:, 1:] != IGNORE_INDEX)
    return rows * seq_len + cols, labels[rows, cols + 1]


def shard_batch(batch: Mapping[str, np.ndarray], mesh: dist.ProcessMesh, config: Qwen2VLConfig,
                seq_multiple: int = 1) -> ShardedBatch:
    """This rank's micro-batch (numpy: input_ids, labels, position_ids [3,b,S], optional attention_mask,
    pixel_values/image_grid_thw, pixel_values_videos/video_grid_thw) -> a `ShardedBatch`.

    Every rank must call it (it reduces the sequence and patch lengths over dp); local batch sizes must match.
    `seq_multiple`: pad the sequence to a multiple of it (sequence parallel splits it over "mp").
    """
    merge = config.vision_config.spatial_merge_size ** 2
    pixels, grids = [], []
    for pk, gk in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
        grid = batch.get(gk)
        grid = np.zeros([0, 3], np.int64) if grid is None else np.asarray(grid, np.int64).reshape(-1, 3)
        grids.append(grid)
        if len(grid):
            pixels.append(np.asarray(batch[pk], np.float32))
    n_image, n_video = (int(g.prod(axis=1).sum()) // merge for g in grids)
    patches = (n_image + n_video) * merge

    ids = np.asarray(batch["input_ids"], np.int64)
    labels = np.asarray(batch["labels"], np.int64)
    n_targets = int((labels[:, 1:] != IGNORE_INDEX).sum())
    seq_len, max_patches, max_targets = _max_over_dp([ids.shape[1], patches, n_targets], mesh)
    seq_len = -(-seq_len // seq_multiple) * seq_multiple
    positions, targets = _loss_positions(labels, seq_len)
    max_targets = max(max_targets, 1)
    index = _vision_index(ids, config, n_image, n_video)
    # Always a mask: ranks must agree on the inputs, and only some of them may need padding.
    mask = batch.get("attention_mask")
    mask = np.ones_like(ids) if mask is None else np.asarray(mask, np.int64)
    b = ids.shape[0]
    return ShardedBatch(
        mesh=mesh,
        input_ids=_lift(_pad(ids, seq_len, config.pad_token_id), mesh, 0),
        labels=_lift(_pad(labels, seq_len, IGNORE_INDEX), mesh, 0),
        # Padding positions are 1, as get_rope_index writes them.
        position_ids=_lift(_pad(np.asarray(batch["position_ids"], np.int64), seq_len, 1), mesh, 1),
        attention_mask=_lift(_pad(mask, seq_len, 0), mesh, 0),
        vision_index=_lift(_pad(index, seq_len, -1).reshape(1, b * seq_len), mesh, 0) if max_patches else None,
        pixel_values=paddle.to_tensor(np.concatenate(pixels)) if pixels else None,
        grid_thw=np.concatenate(grids) if patches else None,
        max_patches=max_patches,
        loss_index=_lift(_pad(positions[None], max_targets, 0), mesh, 0),
        loss_targets=_lift(_pad(targets[None], max_targets, IGNORE_INDEX), mesh, 0),
    )


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
    lifted = _lift(local.unsqueeze(0), mesh, 0)  # [dp, P_max, E], or merged already [dp, M_max, H]
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


def clip_gradients_(params: Sequence[paddle.Tensor], norm: float, clip_norm: float | None) -> None:
    """Scale gradients in place by clip_norm / max(norm, clip_norm), as ClipGradByGlobalNorm does, given the
    global norm the caller already computed (scaling every local piece scales sharded and partial grads alike)."""
    if clip_norm is None or not math.isfinite(norm) or norm <= clip_norm:
        return
    scale = clip_norm / norm
    for p in params:
        if p.grad is not None:
            (p.grad._local_value() if p.grad.is_dist() else p.grad).scale_(scale)


def supervised_tokens(batches: Sequence[ShardedBatch]) -> int:
    """Supervised (shifted) tokens over the global batch: all dp ranks and all given micro-batches."""
    return sum(int(_replicated_value((b.labels[:, 1:] != IGNORE_INDEX).astype("int64").sum())) for b in batches)


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


def train_step(model: paddle.nn.Layer, optimizer: paddle.optimizer.Optimizer,
               micro_batches: Sequence[ShardedBatch]) -> float:
    """One optimizer step over gradient-accumulation micro-batches; returns the global-batch token-mean loss."""
    normalizer = float(max(supervised_tokens(micro_batches), 1))
    total = 0.0
    for batch in micro_batches:
        loss = forward_loss(model, batch, normalizer)
        loss.backward()
        total += float(_replicated_value(loss))
    optimizer.step()
    optimizer.clear_grad()
    return total
