"""Per-rank memory report: bytes of parameters, gradients and optimizer states actually held by this rank
(read from the local tensors, `_local_value()`), next to the ideal for the layout (`placements.layout` and the
planner's byte rule, `planning.memory.optimizer_state_bytes`).

Optimizer states are AdamW's moment1/moment2 (+ fp32 master weight for non-fp32 parameters) and its two
[1]-shaped beta-power accumulators, found in the (inner) optimizer's `_accumulators` / `_master_weights`.
Gradients are counted as allocated at the time of the call (Paddle's `clear_grad()` keeps zeroed buffers).
On a pipeline stage model (`pipeline.build_stage_model`) only that stage's parameters exist, so both columns
are per stage (the tied head's embedding copy included on the last stage), as `planner.state_memory(setup,
stage)` plans them (tests/unit/test_plan_pp_sp.py).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from autoparallel.planning.memory import optimizer_state_bytes
from placements.degrees import ParallelDegrees
from placements.qwen2_vl import FROZEN_VISION, Trainable, layout

if TYPE_CHECKING:
    import paddle

_KINDS = ("param", "grad", "optimizer")


def _local_bytes(tensor: "paddle.Tensor | None") -> int:
    if tensor is None:
        return 0
    local = tensor._local_value() if tensor.is_dist() else tensor
    if not local._is_initialized():
        return 0
    return int(np.prod(local.shape)) * local.element_size()


def _numel(shape) -> int:
    return int(np.prod(shape)) if shape else 1


def _optimizer_states(optimizer) -> dict[str, list["paddle.Tensor"]]:
    """Parameter tensor name -> its optimizer state tensors."""
    inner = getattr(optimizer, "_inner_opt", optimizer)
    by_name: dict[str, list["paddle.Tensor"]] = {}
    masters = getattr(inner, "_master_weights", {})
    master_to_param = {m.name: p for p, m in masters.items()}
    for p, master in masters.items():
        by_name.setdefault(p, []).append(master)
    for per_param in inner._accumulators.values():
        for key, tensor in per_param.items():
            by_name.setdefault(master_to_param.get(key, key), []).append(tensor)
    return by_name


def _ideal_grad_shape(lay, degrees: ParallelDegrees) -> tuple[int, ...]:
    """ZeRO-1 holds gradients on the optimizer's shard: the train step reduce-scatters them there (N11)."""
    return lay.state_local_shape if degrees.sharding_stage == 1 else lay.grad_local_shape


def memory_report(model: "paddle.nn.Layer", optimizer, degrees: ParallelDegrees, *,
                  trainable: Trainable = FROZEN_VISION) -> dict:
    """{"params": {name: {"param"|"grad"|"optimizer": bytes, "ideal_param"|...: bytes}}, "total": {...}}."""
    states = _optimizer_states(optimizer) if optimizer is not None else {}
    config = model.config
    params, total = {}, dict.fromkeys([*_KINDS, *(f"ideal_{k}" for k in _KINDS)], 0)
    for name, p in model.named_parameters():
        lay = layout(name, tuple(p.shape), config, degrees.dp, degrees.mp, degrees.sharding_stage, trainable)
        size = p.element_size()
        ideal_opt = 0
        if lay.state_local_shape is not None:
            ideal_opt = sum(optimizer_state_bytes(_numel(lay.state_local_shape), str(p.dtype).split(".")[-1]))
        row = {
            "param": _local_bytes(p),
            "grad": _local_bytes(p.grad),
            "optimizer": sum(_local_bytes(t) for t in states.get(p.name, [])),
            "ideal_param": _numel(lay.local_shape) * size,
            "ideal_grad": 0 if lay.grad_local_shape is None else _numel(_ideal_grad_shape(lay, degrees)) * size,
            "ideal_optimizer": ideal_opt,
        }
        params[name] = row
        for k in total:
            total[k] += row[k]
    return {"params": params, "total": total}


def render_memory_report(report: dict, top: int = 8) -> str:
    """Totals (MiB, actual vs ideal) and the `top` parameters with the most bytes held."""
    mib = 2.0**20
    t = report["total"]
    lines = [f"{'':10}{'held MiB':>12}{'ideal MiB':>12}"]
    lines += [f"{k:10}{t[k] / mib:12.2f}{t['ideal_' + k] / mib:12.2f}" for k in _KINDS]
    ranked = sorted(report["params"].items(), key=lambda kv: -sum(kv[1][k] for k in _KINDS))[:top]
    lines.append(f"{'parameter':48}" + "".join(f"{k:>12}" for k in _KINDS) + "   (MiB held; * = differs from ideal)")
    for name, row in ranked:
        flag = "*" if any(row[k] != row["ideal_" + k] for k in _KINDS) else ""
        lines.append(f"{name:48}" + "".join(f"{row[k] / mib:12.2f}" for k in _KINDS) + f" {flag}")
    return "\n".join(lines)
