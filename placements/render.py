"""Render a plan for a config as a table: parameter -> placements -> local shape -> bytes per rank.

Computed from `parameter_shapes(config)` without building the model, so it works for 72B. Repeated layers
are folded ("model.layers.*.mlp.up_proj.weight x28"); byte columns are per rank, summed over the fold.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from network.config import Qwen2VLConfig
from placements.qwen2_vl import ParamLayout, layout, parameter_shapes

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class PlanRow:
    pattern: str
    count: int
    layout: ParamLayout
    param_bytes: int  # per rank, all `count` parameters
    grad_bytes: int
    optimizer_bytes: int  # AdamW moment1 + moment2 (fp32) + fp32 master weight when params are not fp32


def _numel(shape) -> int:
    return int(np.prod(shape)) if shape else 1


def plan_rows(config: Qwen2VLConfig, dp: int = 1, mp: int = 1, sharding_stage: int = 0, *,
              train_merger: bool = False, dtype: str | None = None) -> list[PlanRow]:
    """One row per parameter pattern, in model order."""
    dtype = dtype or config.dtype
    size = _DTYPE_BYTES[dtype]
    folded: dict[str, list[ParamLayout]] = {}
    for name, shape in parameter_shapes(config).items():
        pattern = re.sub(r"\.\d+\.", ".*.", name)
        folded.setdefault(pattern, []).append(layout(name, shape, config, dp, mp, sharding_stage, train_merger))
    rows = []
    for pattern, layouts in folded.items():
        first, n = layouts[0], len(layouts)
        state = 0 if first.state_local_shape is None else _numel(first.state_local_shape)
        per_state = 2 * 4 + (4 if dtype != "float32" else 0)
        rows.append(PlanRow(
            pattern=pattern, count=n, layout=first,
            param_bytes=n * _numel(first.local_shape) * size,
            grad_bytes=0 if first.grad_local_shape is None else n * _numel(first.grad_local_shape) * size,
            optimizer_bytes=n * state * per_state,
        ))
    return rows


def _mib(n: int) -> str:
    return f"{n / 2**20:,.2f}"


def render_plan(config: Qwen2VLConfig, dp: int = 1, mp: int = 1, sharding_stage: int = 0, *,
                train_merger: bool = False, dtype: str | None = None) -> str:
    """Human-readable plan table with per-rank totals (MiB)."""
    rows = plan_rows(config, dp, mp, sharding_stage, train_merger=train_merger, dtype=dtype)
    header = ("parameter", "x", "global shape", "[dp, mp]", "local shape", "param MiB", "grad MiB", "optim MiB")
    table = [header]
    for r in rows:
        lay = r.layout
        where = "dense (frozen ViT)" if lay.dense else f"[{lay.placements[0]}, {lay.placements[1]}]"
        table.append((r.pattern, str(r.count), str(list(lay.shape)), where, str(list(lay.local_shape)),
                      _mib(r.param_bytes), _mib(r.grad_bytes), _mib(r.optimizer_bytes)))
    totals = [sum(getattr(r, k) for r in rows) for k in ("param_bytes", "grad_bytes", "optimizer_bytes")]
    table.append(("total per rank", "", "", "", "", *map(_mib, totals)))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    title = (f"plan: dp={dp} mp={mp} sharding_stage={sharding_stage} dtype={dtype or config.dtype} "
             f"train_merger={train_merger}")
    lines = [title] + ["  ".join(c.ljust(w) if i < 5 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                       for row in table]
    lines.insert(2, "-" * len(lines[1]))
    return "\n".join(lines)
