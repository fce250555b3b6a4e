"""The one training step: forward/backward over the gradient-accumulation micro-batches (or the pipeline
schedule), the global gradient norm, clipping, and the optimizer step. The engine and the layout-equivalence
tests run this same function.

The loss of a step is the token mean over the whole global batch (autoparallel/forward.py), so it does not depend
on the layout. The global norm is computed once per step (for metrics and the non-finite check) and clipping
uses it, instead of ClipGradByGlobalNorm computing it again. A step whose loss or norm is not finite changes
nothing: its gradients are cleared and the optimizer is not stepped (the caller decides to stop or skip).
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import paddle
import paddle.distributed as dist

from autoparallel.batch import ShardedBatch, supervised_tokens
from autoparallel.forward import forward_loss
from autoparallel.gradients import gradient, reduce_partial_gradients_, sum_of_squares, zero1_sharding_axis
from autoparallel.pipeline import PipelineStepStats, Stage, finish_gradients, run_schedule


def scalar(tensor: paddle.Tensor) -> float:
    """The global value of a (possibly partial or sharded) scalar."""
    if tensor.is_dist():
        mesh = tensor.process_mesh
        tensor = dist.reshard(tensor, mesh, [dist.Replicate()] * len(mesh.shape))
        tensor = tensor._local_value()
    return float(tensor)


def clip_gradients_(params: Sequence[paddle.Tensor], norm: float, clip_norm: float | None) -> None:
    """Scale gradients in place by clip_norm / max(norm, clip_norm), as ClipGradByGlobalNorm does, given the
    global norm the caller already computed (scaling every local piece scales sharded and partial grads alike)."""
    if clip_norm is None or not math.isfinite(norm) or norm <= clip_norm:
        return
    scale = clip_norm / norm
    for p in params:
        grad = gradient(p)
        if grad is not None:
            (grad._local_value() if grad.is_dist() else grad).scale_(scale)


def global_grad_norm(model: paddle.nn.Layer) -> float:
    """sqrt of the sum of squared gradients over the global model: local squares, one scalar reduction."""
    total = sum_of_squares(model.parameters())
    return math.sqrt(scalar(total)) if total is not None else 0.0


def forward_backward(model: paddle.nn.Layer, micro_batches: Sequence[ShardedBatch],
                     autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                     transform_loss: Callable[[paddle.Tensor], paddle.Tensor] | None = None) -> float:
    """Gradient accumulation over the micro-batches; returns the global-batch token-mean loss.
    `transform_loss` rewrites each micro-batch loss before backward (fault injection)."""
    normalizer = float(max(supervised_tokens(micro_batches), 1))
    loss = 0.0
    for batch in micro_batches:
        with autocast():
            micro_loss = forward_loss(model, batch, normalizer)
        if transform_loss is not None:
            micro_loss = transform_loss(micro_loss)
        micro_loss.backward()
        loss += scalar(micro_loss)
    return loss


@dataclass
class StepResult:
    loss: float  # global-batch token-mean loss
    grad_norm: float  # global, before clipping
    applied: bool  # False: loss or norm not finite, gradients dropped, optimizer not stepped
    schedule: PipelineStepStats | None = None  # pipeline stages: this rank's schedule timings


def train_step(model: paddle.nn.Layer, optimizer: paddle.optimizer.Optimizer, micro_batches: Sequence[ShardedBatch],
               *, clip_norm: float | None = None, stage: Stage | None = None,
               autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
               transform_loss: Callable[[paddle.Tensor], paddle.Tensor] | None = None) -> StepResult:
    """One optimizer step over the micro-batches (a pipeline `stage`: FThenB with cross-stage clipping)."""
    schedule = None
    if stage is not None:
        schedule = run_schedule(model, stage, micro_batches, autocast)
        loss, grad_norm = schedule.loss, finish_gradients(model, stage, zero1_sharding_axis(optimizer))
    else:
        loss = forward_backward(model, micro_batches, autocast, transform_loss)
        reduce_partial_gradients_(model.parameters(), zero1_sharding_axis(optimizer))
        grad_norm = global_grad_norm(model)
    applied = math.isfinite(loss) and math.isfinite(grad_norm)
    if applied:
        clip_gradients_(model.parameters(), grad_norm, clip_norm)
        optimizer.step()
    optimizer.clear_grad()
    return StepResult(loss, grad_norm, applied, schedule)
