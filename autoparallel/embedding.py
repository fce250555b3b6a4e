"""The token embedding's two uses in the distributed forward, at the communication the plan counts (issue 29).

- Tied head (N13). The embedding lookup and a tied head both read `embed_tokens.weight`; each yields a gradient
  Partial over "dp", and Paddle 3.3.1's gradient accumulation on the leaf all-reduces each before summing, so
  the weight was reduced twice. `embedding_uses` hands the two uses the two outputs of one identity node
  (`autoparallel.gradients.shared_uses`): its backward adds the two Partial gradients locally and the leaf
  gets one, reduced once.
- Vocab-parallel lookup (N14). On a weight split on the vocab (Shard(0) over "mp") Paddle's embedding SPMD rule
  all-gathers the whole table every micro-step. `lookup` lets each rank read its own rows instead (ids outside
  its range give zeros) and sums the partial embeddings over "mp": an all-reduce of [b, S, H], as a Megatron
  vocab-parallel embedding does. The reduction happens inside the PyLayer's forward, so no Partial output reaches
  autograd (LocalLayer/local_map backward with a Partial output is wrong in Paddle 3.3.1); the backward is local.
"""
from __future__ import annotations

import numpy as np
import paddle
import paddle.distributed as dist
import paddle.nn.functional as F
from paddle.autograd import PyLayer
from paddle.distributed.auto_parallel.api import dtensor_from_local

from autoparallel.gradients import shared_uses
from autoparallel.mesh import mesh_coordinate


def _vocab_axis(weight: paddle.Tensor, ids: paddle.Tensor) -> int | None:
    """The mesh axis splitting `weight`'s vocab when `_VocabParallelLookup` applies: the weight is Shard(0) on
    exactly one axis (evenly), Replicate on the others, and the ids are a dist tensor on its mesh."""
    if not (weight.is_dist() and ids.is_dist()) or ids.process_mesh != weight.process_mesh:
        return None
    split = [i for i, p in enumerate(weight.placements) if p.is_shard(0)]
    rest = [p for i, p in enumerate(weight.placements) if i not in split]
    if len(split) != 1 or not all(p.is_replicated() for p in rest) or not ids.placements[split[0]].is_replicated():
        return None
    if weight.shape[0] % weight.process_mesh.shape[split[0]]:
        return None
    return split[0]


def _fresh(placement: dist.Placement) -> dist.Placement:
    if placement.is_shard():
        return dist.Shard(placement.get_dim())
    return dist.Partial() if placement.is_partial() else dist.Replicate()


class _VocabParallelLookup(PyLayer):
    """Embedding rows of `ids` from a weight split on the vocab over mesh axis `axis`; output placed like the
    ids, Replicate on `axis`. Backward: this rank's rows of the weight gradient, Partial where the ids are
    split (their gradients are summed by the usual parameter reduction)."""

    @staticmethod
    def forward(ctx, weight: paddle.Tensor, ids: paddle.Tensor, axis: int) -> paddle.Tensor:
        mesh = weight.process_mesh
        table = weight._local_value()
        rows = table.shape[0]
        local = ids._local_value() - mesh_coordinate(mesh, mesh.dim_names[axis]) * rows
        mask = (local >= 0) & (local < rows)
        safe = paddle.where(mask, local, paddle.zeros_like(local))
        keep = mask.unsqueeze(-1).astype(table.dtype)
        partial = list(ids.placements)
        partial[axis] = dist.Partial()
        out = dtensor_from_local(F.embedding(safe, table) * keep, mesh, partial)
        ctx.save_for_backward(safe, keep)
        # Fresh mesh and placements: a non-leaf's (the tied weight's view) die with it, crashing the backward.
        ctx.mesh = dist.ProcessMesh(np.asarray(mesh.process_ids).reshape(mesh.shape).tolist(), list(mesh.dim_names))
        ctx.rows = rows
        ctx.placements = [_fresh(p) for p in ids.placements]
        ctx.grad_placements = [dist.Partial() if p.is_shard() else _fresh(w)
                               for p, w in zip(ids.placements, weight.placements)]
        return dist.reshard(out, ctx.mesh, ctx.placements)

    @staticmethod
    def backward(ctx, grad: paddle.Tensor) -> tuple[paddle.Tensor, None]:
        safe, keep = ctx.saved_tensor()
        if grad.placements != ctx.placements:
            grad = dist.reshard(grad, ctx.mesh, ctx.placements)
        local = grad._local_value() * keep.astype(grad.dtype)
        width = local.shape[-1]
        table = paddle.zeros([ctx.rows, width], local.dtype)
        table.index_add_(safe.reshape([-1]), 0, local.reshape([-1, width]))  # in place: one table, not two
        return dtensor_from_local(table, ctx.mesh, ctx.grad_placements), None


def lookup(weight: paddle.Tensor, ids: paddle.Tensor) -> paddle.Tensor:
    """`F.embedding(ids, weight)`, vocab-parallel (no gather of the table) when the weight is split on the vocab."""
    axis = _vocab_axis(weight, ids)
    if axis is None:
        return F.embedding(ids, weight)
    return _VocabParallelLookup.apply(weight, ids, axis)


def vocab_parallel_layer(layer: paddle.nn.Embedding) -> None:
    """The model's own calls of `layer` (`embed_multimodal`: generation in infer, eval and the trainer's
    generation metrics) through `lookup` too, else every generated token would all-gather the whole table: ids
    that are not dist tensors (generation's) are taken as this rank's copy of replicated ids on the weight's
    mesh, which they are (every rank decodes the same tokens)."""
    def forward(ids: paddle.Tensor) -> paddle.Tensor:
        weight = layer.weight
        if weight.is_dist() and not ids.is_dist():
            mesh = weight.process_mesh
            ids = dtensor_from_local(ids, mesh, [dist.Replicate()] * len(mesh.shape))
        return lookup(weight, ids)

    layer.forward = forward


def embedding_uses(model: paddle.nn.Layer) -> tuple[paddle.Tensor, tuple[paddle.Tensor, bool]]:
    """(the weight to look tokens up in, the head's (weight, transposed) of `model.lm_head_weight`): with a tied
    head, the two outputs of one node, so the weight gets one summed gradient (reduced once)."""
    weight = model.model.embed_tokens.weight
    if not model.config.tie_word_embeddings:
        return weight, model.lm_head_weight()
    first, second = shared_uses(weight, 2)
    return first, (second, True)
