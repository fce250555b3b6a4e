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

from placements.qwen2_vl import COLWISE, ROWWISE

# Which adapter matrix is split, and with which style, per base style: the one whose dim the base splits
# (colwise splits W's output dim = B's dim 1; rowwise splits W's input dim = A's dim 0).
LORA_SHARDED_PARAM: dict[str, tuple[str, str]] = {COLWISE: ("lora_B", COLWISE), ROWWISE: ("lora_A", ROWWISE)}
LORA_PARAMS = ("lora_A", "lora_B")


def lora_plan(plan: dict[str, str]) -> dict[str, str]:
    """Plan entries for the adapter matrices of every planned layer ("<layer>.lora_B": colwise, ...)."""
    entries = {}
    for key, style in plan.items():
        param, lora_style = LORA_SHARDED_PARAM[style]
        entries[f"{key}.{param}"] = lora_style
    return entries

