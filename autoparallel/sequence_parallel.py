"""Sequence parallel inside tensor-parallel regions, applied from `placements.qwen2_vl.SP_PLAN` as hooks.

With mp > 1 and SP on, the decoder's residual stream and RMSNorm inputs are split along the sequence over
"mp" (Shard(1) of [b, s, h]): norms, residual adds (and dropout, if any) touch 1/mp of the tokens, and those
activations take 1/mp of the memory. Each attention/MLP block all-gathers its input (its colwise q/k/v or
gate/up need all tokens) and its rowwise output, Partial over "mp", goes straight to Shard(1): a
reduce-scatter instead of TP's all-reduce.

Backward: the gradient of the all-gather is Partial (colwise input gradient) and must become Shard(1): a
reduce-scatter. Paddle's C++ reshard backward has no CPU kernel for it, so on CPU builds the reshards are
`cpu_compat.reshard_python_backward` (all-reduce then local slice); on CUDA plain `dist.reshard`.

Sequence lengths must be divisible by mp: pad with `shard_batch(..., seq_multiple=mp)`.
"""
from __future__ import annotations

import re

import paddle
import paddle.distributed as dist

from autoparallel import cpu_compat
from network.log import logger
from placements.qwen2_vl import SEQUENCE_DIM, SP_GATHER_OUTPUT, SP_GATHER_REGION, SP_PLAN, SP_SCATTER_INPUT


def _reshard(x: paddle.Tensor, placements: list) -> paddle.Tensor:
    if not cpu_compat.runs_on_cpu():
        return dist.reshard(x, x.process_mesh, placements)
    return cpu_compat.reshard_python_backward(x, placements)


def _on_mp(x: paddle.Tensor, placement) -> list:
    """x's placements with the "mp" axis set to `placement` (other axes, e.g. Shard(0) on "dp", kept)."""
    placements = list(x.placements)
    placements[x.process_mesh.dim_names.index("mp")] = placement
    return placements


def scatter_sequence(x: paddle.Tensor) -> paddle.Tensor:
    """Replicate or Partial on "mp" -> Shard(1): the sequence split over "mp"."""
    return _reshard(x, _on_mp(x, dist.Shard(SEQUENCE_DIM)))


def gather_sequence(x: paddle.Tensor) -> paddle.Tensor:
    """Shard(1) on "mp" -> Replicate (all-gather); backward reduce-scatters the gradient."""
    return _reshard(x, _on_mp(x, dist.Replicate()))


def _scatter_input(layer, inputs):
    return (scatter_sequence(inputs[0]), *inputs[1:])


def _gather_input(layer, inputs):
    return (gather_sequence(inputs[0]), *inputs[1:])


def _scatter_output(layer, inputs, output):
    return scatter_sequence(output)


def _gather_output(layer, inputs, output):
    return gather_sequence(output)


_HOOKS = {  # style -> (forward pre-hook, forward post-hook)
    SP_SCATTER_INPUT: (_scatter_input, None),
    SP_GATHER_REGION: (_gather_input, _scatter_output),
    SP_GATHER_OUTPUT: (None, _gather_output),
}


def apply_sequence_parallel(model: paddle.nn.Layer, plan: dict[str, str] = SP_PLAN) -> list:
    """Register the SP layout changes of `plan` on the (already tensor-parallel) `model`; returns the hook
    handles (`.remove()` undoes it). Every plan key must match at least one sublayer."""
    handles, unmatched = [], set(plan)
    for name, layer in model.named_sublayers():
        for key, style in plan.items():
            if re.fullmatch(key, name):
                unmatched.discard(key)
                pre, post = _HOOKS[style]
                if pre is not None:
                    handles.append(layer.register_forward_pre_hook(pre))
                if post is not None:
                    handles.append(layer.register_forward_post_hook(post))
    if unmatched:
        raise ValueError(f"sequence-parallel plan keys match no sublayer: {sorted(unmatched)}")
    logger.info("sequence parallel: %d layout hooks (%s)", len(handles),
                "dist.reshard" if not cpu_compat.runs_on_cpu() else "CPU all-reduce+slice backward")
    return handles
