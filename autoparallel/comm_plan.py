"""Collectives of one optimizer step (all micro-steps), per rank, for a `PlanSetup`: what they move and how
often, from the same plan data as the memory plan (tensor-parallel plan, ZeRO stage, local widths).

Bytes are the payload of one call on one rank (the tensor handed to the collective); a ring all-reduce puts
about 2(n-1)/n of that on each link, an all-gather/reduce-scatter (n-1)/n of the full tensor.

- "mp": Megatron pairs. Forward: the vocab-parallel embedding and each rowwise projection (o_proj, down_proj)
  end in a Partial [b, S, H] that is all-reduced; backward: the gradients of the two colwise inputs per layer
  (attention, MLP) are all-reduced. Recompute replays the forward ones. The head (tied or not) all-reduces
  the gradient of the picked [K, H] hidden states; the vocab-parallel cross-entropy all-reduces three
  [K] fp32 statistics (max, sum of exp, target logit). LoRA adds one [b, S, r] all-reduce per adapted planned
  layer (forward for rowwise, backward for colwise bases).
- "dp": stage 0 all-reduces every trainable gradient; stage 1 reduce-scatters gradients and all-gathers the
  updated parameters; stage 2 as 1 but the gradient hook runs at every micro-step's backward; stage 3
  all-gathers parameters in the forward of each micro-step and reduce-scatters gradients in its backward.
  On CPU (gloo) Paddle has no reduce-scatter: it is an all-reduce plus a local slice (full-size payload).
  When the gradients of stages 0/1 are reduced (each micro-step or once per step) is Paddle's choice, not
  ours; we count once per step, which is the lower bound.
- Vision: the frozen ViT runs on each rank's own patches: no collective. Per micro-step the batch shapes are
  max-reduced over "dp" (three int64) and the supervised-token count is reduced once per step. A trainable
  merger's gradients are dp gradients like any other.
- "pp": pipeline parallel is not implemented (degree 1 enforced by autoparallel.mesh): no send/recv.
"""
from __future__ import annotations

from dataclasses import dataclass

from autoparallel.planner import DTYPE_BYTES, PlanSetup, local_widths, numel
from placements.lora import adapter_layout, adapter_shapes
from placements.qwen2_vl import _style_for, layout, parameter_shapes, tensor_parallel_plan


@dataclass(frozen=True)
class Collective:
    group: str  # "mp" | "dp" | "pp"
    op: str  # all_reduce | all_gather | reduce_scatter | send/recv
    phase: str
    calls: int  # per optimizer step
    bytes_per_call: int  # payload on one rank (for per-parameter collectives: the average)
    note: str = ""

    @property
    def total_bytes(self) -> int:
        return self.calls * self.bytes_per_call


def _trainable_local(setup: PlanSetup) -> list[int]:
    """mp-local bytes of each trainable tensor: what the dp gradient collectives move."""
    config, d, size = setup.config, setup.degrees, DTYPE_BYTES[setup.dtype]
    shapes = parameter_shapes(config)
    if setup.lora:
        return [numel(adapter_layout(name, shape, config, d.dp, d.mp, 0).local_shape) * size
                for name, shape in adapter_shapes(shapes, list(setup.lora.targets), setup.lora.rank).items()]
    layouts = (layout(name, shape, config, d.dp, d.mp, 0, setup.train_merger) for name, shape in shapes.items())
    return [numel(lay.local_shape) * size for lay in layouts if lay.grad_local_shape is not None]


def _mean(values: list[int]) -> int:
    return sum(values) // max(1, len(values))


def communication(setup: PlanSetup, cpu: bool = False) -> list[Collective]:
    """Every collective of one optimizer step on one rank (see the module docstring)."""
    config, d, wl = setup.config, setup.degrees, setup.workload
    e, micro, layers = DTYPE_BYTES[setup.dtype], wl.gradient_accumulation_steps, config.num_hidden_layers
    w = local_widths(config, d.mp)
    out: list[Collective] = []
    if d.mp > 1:
        act = wl.tokens * w.h * e
        replays = 2 if wl.recompute else 1
        out += [
            Collective("mp", "all_reduce", "forward: vocab-parallel embedding", micro, act),
            Collective("mp", "all_reduce", "forward: o_proj + down_proj outputs", micro * 2 * layers * replays, act,
                       f"2 per layer{', replayed by recompute' if wl.recompute else ''}"),
            Collective("mp", "all_reduce", "backward: attention + MLP input gradients", micro * 2 * layers, act,
                       "2 per layer"),
            Collective("mp", "all_reduce", "backward: head input gradient", micro, wl.supervised * w.h * e,
                       f"[{wl.supervised}, {w.h}]"),
            Collective("mp", "all_reduce", "forward: vocab-parallel CE statistics", micro * 3, wl.supervised * 4,
                       "max, sum exp, target logit"),
        ]
        if setup.lora:
            plan = tensor_parallel_plan(config, d.mp)
            adapters = adapter_shapes(parameter_shapes(config), list(setup.lora.targets), setup.lora.rank)
            planned = sum(1 for n in adapters if n.endswith(".lora_A")
                          and _style_for(n[: -len("lora_A")] + "weight", plan) is not None)
            if planned:
                out.append(Collective("mp", "all_reduce", "LoRA [b, S, r] products", micro * planned * replays,
                                      wl.tokens * setup.lora.rank * e, "rowwise: forward, colwise: backward"))
    if d.dp > 1:
        full = _trainable_local(setup)
        n = len(full)
        scatter = ("all_reduce", "reduce-scatter done as all-reduce + slice (gloo)") if cpu else \
            ("reduce_scatter", "")
        if d.sharding_stage == 0:
            out.append(Collective("dp", "all_reduce", "gradients", n, _mean(full), f"{n} trainable tensors"))
        else:
            grad_calls = n * (micro if d.sharding_stage >= 2 else 1)
            out.append(Collective("dp", scatter[0], "gradients -> ZeRO shards", grad_calls, _mean(full),
                                  scatter[1] or f"{n} tensors" + (" per micro-step" if d.sharding_stage >= 2 else "")))
            if d.sharding_stage == 3:
                out.append(Collective("dp", "all_gather", "forward: parameter shards", n * micro, _mean(full),
                                      "per micro-step"))
            else:
                out.append(Collective("dp", "all_gather", "updated parameter shards", n, _mean(full)))
        out += [Collective("dp", "all_reduce", "batch shapes (seq, patches, targets)", micro, 3 * 8),
                Collective("dp", "all_reduce", "supervised-token count + loss", 1 + micro, 8)]
    out.append(Collective("pp", "send/recv", "stage boundaries", 0, 0, "pipeline parallel is not implemented"))
    return out
