"""Pipeline parallel on send/recv: each rank holds one stage, stage-internal dp/mp stay semi-auto.

Paddle's own `parallelize(pp_config=...)` puts every stage's tensors on one global mesh and runs ops on tensors
whose mesh excludes the current rank: that segfaults on the CPU build. Here nothing global exists:

- Stages (placements/qwen2_vl.py): the vision tower and embeddings on the first, the final norm and the head
  on the last, decoder layers split by `pipeline_layer_split`. `build_stage_model` deletes everything else from
  the plain model, keeping global parameter names (`model.layers.7...` stays 7), so stage state dicts are
  slices of the full one.
- Each stage is `parallelize`d on its own ["dp", "mp"] sub-mesh (`mesh.stage_mesh`) exactly like a pp=1 model.
- Boundaries: the activation [b, S, H] is resharded to Shard(0) on "dp" / Replicate on "mp"; its local
  (dense) value goes by `dist.send` to the rank with the same (dp, mp) coordinate on the next stage, which
  lifts it back with `dtensor_from_local`. Gradients travel the other way the same way. Blocking send/recv
  only (gloo has no batch_isend_irecv on CPU): the same code runs on GPU (NCCL send/recv).
- Schedule: FThenB over the micro-batches (= gradient accumulation steps): all forwards, then all backwards
  in the same order — deadlock-free with blocking p2p, and micro-batches > stages keep every stage busy
  except for the (p-1)/(m+p-1) fill/drain bubble. Memory holds all m micro-batches' activations. 1F1B (p in
  flight) is not implemented: its steady state needs a send and a receive in flight at once
  (batch_isend_irecv, which hangs on the CPU build).
- Tied head: the last stage keeps a copy of `embed_tokens` (see PP_TIED_HEAD); the copies' gradients are
  exchanged by send/recv between the first and last stage and summed before the step (a + b on both sides:
  identical bits), so the copies stay identical. (A `new_group` per first/last pair hung in gloo's connect
  on the CPU build with 4 processes; p2p on the default group does not.)
- Gradient clipping: ClipGradByGlobalNorm over the whole model needs the norm over all stages. The clip is
  taken off the optimizer (`parallelize_stage`); `finish_gradients` returns the cross-stage norm (the tied copy
  counted once) and `autoparallel.step.train_step` clips with it, as for pp = 1.
- Checkpoints: each stage's `state_dict()` has global names (and the full model's auto-generated parameter
  names, so optimizer keys match a pp=1 run): `dist.save_state_dict` of it on every rank writes one checkpoint
  that ckpt_tools merges and a pp=1 layout loads (tests/dist/test_pipeline.py); the tied copies are identical.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import paddle
import paddle.distributed as dist

from autoparallel import cpu_compat
from autoparallel.batch import ShardedBatch, replicated_value, supervised_tokens
from autoparallel.forward import TRAINING_KEY_MASK, embed_inputs, supervised_loss
from autoparallel.gradients import gradient, reduce_partial_gradients_, sum_of_squares
from autoparallel.mesh import PP_DIM, mesh_coordinate, stage_mesh
from autoparallel.parallelize import parallelize
from network.attention import PackedRows
from network.config import Qwen2VLConfig
from network.log import logger
from network.modeling_qwen2_vl import mrope_cos_sin
from placements.degrees import ParallelDegrees
from placements.qwen2_vl import FROZEN_VISION, PP_FIRST_STAGE, PP_LAST_STAGE, PP_TIED_HEAD, Trainable, pipeline_layer_split


@dataclass(frozen=True)
class Stage:
    """This rank's pipeline stage."""

    index: int
    num_stages: int
    layers: range  # global decoder-layer indices held here
    mesh: dist.ProcessMesh  # the stage's ["dp", "mp"] sub-mesh
    prev_rank: int | None  # same (dp, mp) coordinate on the previous / next stage
    next_rank: int | None
    tied_peer: int | None  # the last (first) stage's rank of this (dp, mp) coordinate on the first (last), tied head
    ranks_per_stage: int

    @property
    def first(self) -> bool:
        return self.index == 0

    @property
    def last(self) -> bool:
        return self.index == self.num_stages - 1


def make_stage(mesh: dist.ProcessMesh, config: Qwen2VLConfig, layers_per_stage: list[int] | None = None) -> Stage:
    """This rank's `Stage` on a ["pp", "dp", "mp"] mesh."""
    if PP_DIM not in mesh.dim_names:
        raise ValueError(f"mesh {mesh.dim_names} has no {PP_DIM!r} dim")
    pp = mesh.shape[mesh.dim_names.index(PP_DIM)]
    index = mesh_coordinate(mesh, PP_DIM)
    ids = np.asarray(mesh.process_ids).reshape(pp, -1)  # [stage, dp*mp]: rank of each (dp, mp) coordinate
    column = int(np.argwhere(ids[index] == dist.get_rank())[0][0])
    tied_peer = None
    if config.tie_word_embeddings and index in (0, pp - 1):
        tied_peer = int(ids[pp - 1 - index, column])
    return Stage(
        index=index, num_stages=pp, layers=pipeline_layer_split(config, pp, layers_per_stage)[index],
        mesh=stage_mesh(mesh, index),
        prev_rank=int(ids[index - 1, column]) if index > 0 else None,
        next_rank=int(ids[index + 1, column]) if index < pp - 1 else None,
        tied_peer=tied_peer, ranks_per_stage=ids.shape[1],
    )


def _delete(model: paddle.nn.Layer, path: str) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model
    for part in filter(None, parent_path.split(".")):
        parent = getattr(parent, part)
    if name in parent._sub_layers:
        del parent._sub_layers[name]


def build_stage_model(model: paddle.nn.Layer, stage: Stage) -> paddle.nn.Layer:
    """Delete (in place) everything `stage` does not run; global names are kept. Build the optimizer after."""
    layers = model.model.layers._sub_layers
    for key in [k for k in layers if int(k) not in stage.layers]:
        del layers[key]
    if not stage.first:
        keep_tied = stage.last and model.config.tie_word_embeddings
        for path in PP_FIRST_STAGE:
            if path == "visual":
                model.visual._sub_layers.clear()  # emptied, not deleted: `parallelize` looks into model.visual
            elif not (keep_tied and path == PP_TIED_HEAD):
                _delete(model, path)
    if not stage.last:
        for path in PP_LAST_STAGE:
            _delete(model, path)
    kept = sum(int(np.prod(p.shape)) for p in model.parameters())
    logger.info("pipeline stage %d/%d: decoder layers %s%s%s, %d parameters", stage.index, stage.num_stages,
                list(stage.layers), f", {'+'.join(PP_FIRST_STAGE)}" if stage.first else "",
                f", {'+'.join(PP_LAST_STAGE)}" if stage.last else "", kept)
    return model


def parallelize_stage(model: paddle.nn.Layer, optimizer: paddle.optimizer.Optimizer, stage: Stage,
                      degrees: ParallelDegrees, *, trainable: Trainable = FROZEN_VISION
                      ) -> tuple[paddle.nn.Layer, paddle.optimizer.Optimizer, float | None]:
    """`parallelize` on the stage's sub-mesh; returns (model, optimizer, clip_norm). The optimizer's
    ClipGradByGlobalNorm is removed (its norm would cover one stage) and its clip_norm returned for
    `autoparallel.step.train_step`."""
    clip = optimizer._grad_clip
    if clip is not None and not isinstance(clip, paddle.nn.ClipGradByGlobalNorm):
        raise ValueError(f"pipeline parallel supports ClipGradByGlobalNorm or no clipping, not {type(clip).__name__}")
    optimizer._grad_clip = None
    stage_degrees = dataclasses.replace(degrees, pipeline_parallel_degree=1)
    model, optimizer = parallelize(model, optimizer, stage.mesh, stage_degrees, trainable=trainable)
    return model, optimizer, None if clip is None else float(clip.clip_norm)


def _boundary_placements(mesh: dist.ProcessMesh) -> list:
    return [dist.Shard(0) if name == "dp" else dist.Replicate() for name in mesh.dim_names]


# Boundary activations go with their dtype: under bf16 O2 it is whatever autocast produced on the sending stage,
# which neither the config's "dtype" (bfloat16 in every Hub config, also for fp32 weights) nor the receiving
# stage's parameters determine; send/recv of a buffer of another dtype would move a different number of bytes.
_WIRE_DTYPES = [paddle.float32, paddle.bfloat16, paddle.float16]


def _send(x: paddle.Tensor, dst: int, with_dtype: bool = False) -> None:
    local = dist.reshard(x, x.process_mesh, _boundary_placements(x.process_mesh))._local_value().contiguous()
    if with_dtype:
        dist.send(paddle.to_tensor([_WIRE_DTYPES.index(local.dtype)], "int64"), dst)
    dist.send(local, dst)


def _recv(shape: list[int], dtype, src: int, mesh: dist.ProcessMesh) -> paddle.Tensor:
    """Receive a [shape] tensor from `src`; `dtype=None`: the sender sends its dtype first (`_send(with_dtype=True)`)."""
    if dtype is None:
        code = paddle.zeros([1], "int64")
        dist.recv(code, src)
        dtype = _WIRE_DTYPES[int(code)]
    local = paddle.empty(shape, dtype)
    dist.recv(local, src)
    return dist.auto_parallel.api.dtensor_from_local(local, mesh, _boundary_placements(mesh))


def _stage_forward(model: paddle.nn.Layer, stage: Stage, batch: ShardedBatch, x: paddle.Tensor | None,
                   normalizer: float) -> paddle.Tensor:
    """The stage's part of `step.forward_loss`: hidden states out, or the loss on the last stage."""
    with cpu_compat.zero3_gathered(model):
        if stage.first:
            x = embed_inputs(model, batch)
        cos, sin = mrope_cos_sin(model.config, batch.position_ids, x.dtype)
        packed = None if batch.segment_ids is None else PackedRows(batch.segment_ids)
        for layer in model.model.layers:
            x = layer(x, cos, sin, TRAINING_KEY_MASK, None, packed)
        if stage.last:
            return supervised_loss(model, model.model.norm(x), batch, normalizer)
        return dist.reshard(x, x.process_mesh, _boundary_placements(x.process_mesh))


@dataclass
class PipelineStepStats:
    loss: float  # global-batch token-mean loss (the same on every rank)
    forward_seconds: float  # this rank's forward compute over all micro-batches
    backward_seconds: float  # this rank's backward compute
    wall_seconds: float  # schedule start to end (before the optimizer step)

    @property
    def bubble(self) -> float:
        """Idle fraction of this rank during the schedule."""
        return 1.0 - (self.forward_seconds + self.backward_seconds) / self.wall_seconds


def theoretical_bubble(stages: int, micro_batches: int) -> float:
    """Idle fraction of FThenB/1F1B with equal stage times and free communication: (p-1)/(m+p-1)."""
    return (stages - 1) / (micro_batches + stages - 1)


def fthenb_bubbles(forward: Sequence[float], backward: Sequence[float], micro_batches: int) -> list[float]:
    """Idle fraction of each stage under FThenB given each stage's total forward/backward compute (free
    communication): each phase lasts sum of per-micro-batch stage times + (m-1) x the slowest. Equal stages
    give `theoretical_bubble`."""
    m = micro_batches
    f, b = [t / m for t in forward], [t / m for t in backward]
    wall = sum(f) + (m - 1) * max(f) + sum(b) + (m - 1) * max(b)
    return [1.0 - m * (fs + bs) / wall for fs, bs in zip(f, b)]


def _tied_weight(model: paddle.nn.Layer, stage: Stage) -> paddle.Tensor | None:
    if stage.tied_peer is None:
        return None
    return getattr(model.model, PP_TIED_HEAD.rpartition(".")[2]).weight


def _sum_tied_grad(grad: paddle.Tensor, stage: Stage) -> None:
    """grad += the other copy's gradient (first stage sends first: blocking p2p stays ordered)."""
    local = grad._local_value()
    other = paddle.empty_like(local)
    if stage.first:
        dist.send(local.contiguous(), stage.tied_peer)
        dist.recv(other, stage.tied_peer)
    else:
        dist.recv(other, stage.tied_peer)
        dist.send(local.contiguous(), stage.tied_peer)
    local.add_(other)


def _world_sum(value: float) -> float:
    t = paddle.to_tensor([value], dtype="float64")
    dist.all_reduce(t)
    return float(t)


def finish_gradients(model: paddle.nn.Layer, stage: Stage, sharding_axis: int | None = None) -> float:
    """After `run_schedule`: sum the tied-head copies' gradients and return the global gradient norm over all
    stages (the tied copy counted once; same on every rank)."""
    reduce_partial_gradients_(model.parameters(), sharding_axis)
    params = [p for p in model.parameters() if not p.stop_gradient and gradient(p) is not None]
    tied = _tied_weight(model, stage)
    if tied is not None:
        _sum_tied_grad(gradient(tied), stage)
    skip = tied if stage.last and not stage.first else None
    # N10: Partial gradients reduced once above, then one scalar reduction for the stage's sum of squares.
    total = sum_of_squares([p for p in params if p is not skip])
    local = float(replicated_value(total)) if total is not None else 0.0
    # Every rank of a stage holds its stage's sum: the world sum counts each stage ranks_per_stage times.
    return math.sqrt(_world_sum(local) / stage.ranks_per_stage)


def run_schedule(model: paddle.nn.Layer, stage: Stage, micro_batches: Sequence[ShardedBatch],
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
                 ) -> PipelineStepStats:
    """Forward and backward of all micro-batches, FThenB (every stage calls it with the same micro-batches,
    `shard_batch`ed on its own stage mesh); gradients accumulate in the stage's parameters. Forwards run under
    `autocast` (the backward replays the ops' recorded dtypes)."""
    normalizer = float(max(supervised_tokens(micro_batches), 1))
    hidden = model.config.hidden_size
    forward = backward = 0.0
    start = time.perf_counter()
    inputs, outputs = [], []
    for batch in micro_batches:  # forward
        x = None
        if not stage.first:
            local_ids = batch.input_ids._local_value()
            x = _recv([local_ids.shape[0], batch.input_ids.shape[1], hidden], None, stage.prev_rank, stage.mesh)
            x.stop_gradient = False
        t = time.perf_counter()
        with autocast():
            out = _stage_forward(model, stage, batch, x, normalizer)
        forward += time.perf_counter() - t
        if not stage.last:
            _send(out, stage.next_rank, with_dtype=True)
        inputs.append(x)
        outputs.append(out)
    total = 0.0
    for x, out in zip(inputs, outputs):  # backward, same order on every stage
        grad = None
        if not stage.last:
            grad = _recv(out._local_value().shape, out.dtype, stage.next_rank, stage.mesh)
        t = time.perf_counter()
        if stage.last:
            total += float(replicated_value(out))
            out.backward()
        else:
            paddle.autograd.backward([out], [grad])
        backward += time.perf_counter() - t
        if not stage.first:
            _send(x.grad, stage.prev_rank)
    wall = time.perf_counter() - start
    # The loss lives on the last stage (replicated over its ranks); share it with every rank.
    loss = _world_sum(total if stage.last else 0.0) / stage.ranks_per_stage
    return PipelineStepStats(loss, forward, backward, wall)
