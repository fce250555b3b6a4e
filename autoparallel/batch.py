"""Per-rank numpy batches -> dp-sharded dist tensors (`shard_batch`), and the global counts taken from them.

Data layout. Each dp rank reads its own samples (tensor-parallel peers read the same ones). `shard_batch`
lifts them with `dtensor_from_local` into global tensors sharded on the batch dim over "dp": ids/labels/mask
[B, S] Shard(0), M-RoPE `position_ids` [3, B, S] Shard(1) — taken from the data pipeline, never recomputed.
Sequence lengths differ between ranks, so every rank pads to the longest over dp (one tiny max-reduce).
Vision inputs stay dense per rank (this rank's own patches); `vision_index` says where each merged vision
token goes in the token embeddings (autoparallel/forward.py). Loss positions: the flattened positions whose
next token is supervised, so the head runs only there.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import paddle
import paddle.distributed as dist

from autoparallel.context_parallel import cp_degree
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
    segment_ids: paddle.Tensor | None = None  # [B, S] int64: sample of each token in packed rows, -1 = padding


def _dp_placements(mesh: dist.ProcessMesh, dim: int) -> list:
    return [dist.Shard(dim) if name == "dp" else dist.Replicate() for name in mesh.dim_names]


def lift_local(local: np.ndarray | paddle.Tensor, mesh: dist.ProcessMesh, dim: int) -> paddle.Tensor:
    local = local if isinstance(local, paddle.Tensor) else paddle.to_tensor(local)
    return dist.auto_parallel.api.dtensor_from_local(local, mesh, _dp_placements(mesh, dim))


def replicated_value(tensor: paddle.Tensor) -> np.ndarray:
    tensor = dist.reshard(tensor, tensor.process_mesh, [dist.Replicate()] * len(tensor.process_mesh.shape))
    return tensor._local_value().numpy()


def _max_over_dp(values: Sequence[int], mesh: dist.ProcessMesh) -> list[int]:
    lifted = lift_local(np.asarray([values], dtype=np.int64), mesh, 0)  # [dp, k]
    return [int(v) for v in replicated_value(lifted.max(axis=0))]


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
    pixel_values/image_grid_thw, pixel_values_videos/video_grid_thw, segment_ids of packed rows) -> a
    `ShardedBatch`.

    Every rank must call it (it reduces the sequence and patch lengths over dp); local batch sizes must match.
    `seq_multiple`: pad the sequence to a multiple of it (sequence parallel splits it over "mp"); the
    context-parallel degree of `mesh` multiplies it (context parallel splits it over "cp").
    """
    seq_multiple *= cp_degree(mesh)
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
    # A multiple of cp: context parallel splits the supervised rows evenly over its ranks (forward.py).
    max_targets = -(-max(max_targets, 1) // cp_degree(mesh)) * cp_degree(mesh)
    index = _vision_index(ids, config, n_image, n_video)
    # Always a mask: ranks must agree on the inputs, and only some of them may need padding.
    mask = batch.get("attention_mask")
    mask = np.ones_like(ids) if mask is None else np.asarray(mask, np.int64)
    b = ids.shape[0]
    segments = batch.get("segment_ids")
    return ShardedBatch(
        mesh=mesh,
        input_ids=lift_local(_pad(ids, seq_len, config.pad_token_id), mesh, 0),
        labels=lift_local(_pad(labels, seq_len, IGNORE_INDEX), mesh, 0),
        # Padding positions are 1, as get_rope_index writes them.
        position_ids=lift_local(_pad(np.asarray(batch["position_ids"], np.int64), seq_len, 1), mesh, 1),
        attention_mask=lift_local(_pad(mask, seq_len, 0), mesh, 0),
        vision_index=lift_local(_pad(index, seq_len, -1).reshape(1, b * seq_len), mesh, 0) if max_patches else None,
        pixel_values=paddle.to_tensor(np.concatenate(pixels)) if pixels else None,
        grid_thw=np.concatenate(grids) if patches else None,
        max_patches=max_patches,
        loss_index=lift_local(_pad(positions[None], max_targets, 0), mesh, 0),
        loss_targets=lift_local(_pad(targets[None], max_targets, IGNORE_INDEX), mesh, 0),
        segment_ids=None if segments is None else lift_local(_pad(np.asarray(segments, np.int64), seq_len, -1),
                                                             mesh, 0),
    )


def supervised_tokens(batches: Sequence[ShardedBatch]) -> int:
    """Supervised (shifted) tokens over the global batch: all dp ranks and all given micro-batches."""
    return sum(int(replicated_value((b.labels[:, 1:] != IGNORE_INDEX).astype("int64").sum())) for b in batches)
