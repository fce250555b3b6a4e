"""Gradients between backward and the optimizer step, shared by the train step and the pipeline: which tensor is a
parameter's gradient, reducing Partial gradients once (to the ZeRO-1 shard where there is one), and the sum
of squares the global norm is taken from."""
from __future__ import annotations

from collections.abc import Sequence

import paddle
import paddle.distributed as dist
from paddle.distributed.auto_parallel.api import ShardingStage1
from paddle.distributed.auto_parallel.sharding import get_placement_with_sharding


def gradient(param: paddle.Tensor) -> paddle.Tensor | None:
    """The gradient the optimizer steps with: the fp32 `main_grad` under bf16 O2 with master_grad (sharding stages
    keep it there), else `.grad`."""
    main = getattr(param, "main_grad", None)
    return main if main is not None else param.grad


def zero1_sharding_axis(optimizer: paddle.optimizer.Optimizer) -> int | None:
    """The mesh axis a ZeRO-1 optimizer (`shard_optimizer(..., ShardingStage1)`) shards its states over, else
    None (stage 2/3 reduce gradients to their shard in their own backward hooks)."""
    shard_fn = getattr(optimizer, "_shard_fn", None)
    return shard_fn._sharding_axis if isinstance(shard_fn, ShardingStage1) else None


def reduce_partial_gradients_(params: Sequence[paddle.Tensor], sharding_axis: int | None = None) -> None:
    """Reshard every gradient still Partial (e.g. over "dp" for a replicated parameter) once, in place of the old
    gradient: to its parameter's placements, or under ZeRO-1 (`sharding_axis`) to the optimizer's shard as
    ShardingStage1 places it (N11: a reduce-scatter, half the bytes of an all-reduce; the optimizer's own
    reshard is then a no-op). Otherwise squaring it for the norm and the optimizer's update would each
    all-reduce it again."""
    for p in params:
        grad = p.grad
        if grad is not None and grad.is_dist() and any(pl.is_partial() for pl in grad.placements):
            target = p.placements if sharding_axis is None else get_placement_with_sharding(p, sharding_axis)
            p._copy_gradient_from(dist.reshard(grad, p.process_mesh, target))


def sum_of_squares(params: Sequence[paddle.Tensor]) -> paddle.Tensor | None:
    """The fp32 sum of the squared gradients of `params` as one (dist) scalar, for one reduction of the norm.
    Gradients must not be Partial any more (`reduce_partial_gradients_`), else each square all-reduces."""
    total = None
    for param in params:
        grad = gradient(param)
        if grad is not None:
            square = paddle.square(grad.astype("float32")).sum()  # `** 2` is ~10x slower on CPU
            total = square if total is None else total + square
    return total
