"""LoRA placements as data: each adapter matrix follows its base layer, so LoRA adds no collective on
full-size activations or weights.

A LoRA layer computes `x @ W + (x @ A) @ B * scaling` with A [in, r], B [r, out] (Paddle layout):

- colwise base (W Shard(1) on "mp", input replicated): A replicated, B Shard(1). `x @ A` is a local
  [b, s, r] product on every rank and `(x @ A) @ B` comes out Shard(2), like `x @ W`.
- rowwise base (W Shard(0), input Shard(2)): A Shard(0), B replicated. `x @ A` is Partial like `x @ W`; the
  only extra traffic is the all-reduce of that [b, s, r] product before `@ B` (r/hidden of the base layer's own
  reduction, and exactly what paddlenlp's `RowParallelLoRALinear` all-reduces).

`dist.parallelize` plans accept "layer.param" keys (`TensorParallel.match_layer`): `"...q_proj.lora_B":
ColWiseParallel()` shards only `lora_B` of the matching layer, and a key never matches a layer without that
parameter, so the entries are inert on a model without LoRA. A and B stay trainable; ZeRO then shards their
optimizer states over "dp" like any other parameter.
"""
from __future__ import annotations

import re

from network.config import Qwen2VLConfig
from network.lora import LORA_PARAMS
from placements.qwen2_vl import COLWISE, ROWWISE, ParamLayout, split_shape, style_for, \
    tensor_parallel_plan

# Which adapter matrix is split, and with which style, per base style: the one whose dim the base splits
# (colwise splits W's output dim = B's dim 1; rowwise splits W's input dim = A's dim 0).
LORA_SHARDED_PARAM: dict[str, tuple[str, str]] = {COLWISE: ("lora_B", COLWISE), ROWWISE: ("lora_A", ROWWISE)}


def lora_plan(plan: dict[str, str]) -> dict[str, str]:
    """Plan entries for the adapter matrices of every planned layer ("<layer>.lora_B": colwise, ...)."""
    entries = {}
    for key, style in plan.items():
        param, lora_style = LORA_SHARDED_PARAM[style]
        entries[f"{key}.{param}"] = lora_style
    return entries


def adapter_shapes(parameter_shapes: dict[str, tuple[int, ...]], targets: list[str],
                   rank: int) -> dict[str, tuple[int, ...]]:
    """"<layer>.lora_A" [in, r] and "<layer>.lora_B" [r, out] for every Linear matching a target regex
    (`re.fullmatch` on the layer name, as network.lora does)."""
    shapes = {}
    for name, shape in parameter_shapes.items():
        layer, _, attr = name.rpartition(".")
        # Linear weights are the 2-D ".weight"s other than the embedding.
        if attr != "weight" or len(shape) != 2 or layer.endswith("embed_tokens"):
            continue
        if not any(re.fullmatch(p, layer) for p in targets):
            continue
        shapes[f"{layer}.lora_A"], shapes[f"{layer}.lora_B"] = (shape[0], rank), (rank, shape[1])
    return shapes


def adapter_layout(name: str, shape: tuple[int, ...], config: Qwen2VLConfig, dp: int, mp: int,
                   sharding_stage: int) -> ParamLayout:
    """Placement of one adapter matrix: follows its base layer on "mp" (table above); ZeRO over "dp" on the
    first dim "mp" does not split, as for any trainable parameter (placements.qwen2_vl.layout)."""
    layer, _, param = name.rpartition(".")
    base_style = style_for(f"{layer}.weight", tensor_parallel_plan(config, mp))
    mp_dim = None
    if base_style is not None and LORA_SHARDED_PARAM[base_style][0] == param:
        mp_dim = 1 if base_style == COLWISE else 0
    dp_dim = None
    if sharding_stage and shape[0] != 1:
        dp_dim = next(d for d in range(len(shape)) if d != mp_dim)
    mp_local = split_shape(tuple(shape), mp_dim, mp)
    zero_local = split_shape(mp_local, dp_dim, dp)
    return ParamLayout(
        name=name, shape=tuple(shape),
        placements=(f"S({dp_dim})" if sharding_stage == 3 and dp_dim is not None else "R",
                    "R" if mp_dim is None else f"S({mp_dim})"),
        local_shape=zero_local if sharding_stage == 3 else mp_local,
        grad_local_shape=zero_local if sharding_stage >= 2 else mp_local,
        state_local_shape=zero_local if sharding_stage >= 1 else mp_local,
        dense=False,
    )
