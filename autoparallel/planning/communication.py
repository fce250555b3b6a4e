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
- Sequence parallel (mp > 1): the TP all-reduces of the decoder become an all-gather of each attention/MLP
  input (S/mp tokens -> all) and a reduce-scatter of its rowwise output; backward the other way round
  (reduce-scatter of the gathered input's gradient, all-gather of the output's). The embedding output is
  reduce-scattered into the sequence shard (all-gathered back in backward) and the final norm's output
  all-gathered for the head (its gradient reduce-scattered, replacing the head's [K, H] all-reduce). On CPU
  every reduce-scatter is an all-reduce + local slice (cpu_compat), full-size payload.
- "cp" (context parallel, Ulysses): per decoder layer, q, k and v go from S/cp tokens of all (mp-local) heads
  to all S tokens of 1/cp of them, and the attention output back before o_proj: four all-to-alls forward
  (replayed by recompute) and four backward, each moving this rank's [b, S/cp, heads x head_dim] piece. On CPU
  (gloo) the all-to-all is pairwise send/recv (cpu_compat), the same bytes. KV heads fewer than cp per
  mp rank are repeated before their exchange (cp / their count copies each). The final hidden states are
  all-gathered for the head, each rank runs the head on an equal share of the supervised rows, and their
  gradients are all-gathered back; the gradients of the decoder layers, final norm and head (each rank's tokens
  or rows) are all-reduced over "cp" (the embedding lookup and vision tower run whole on every cp rank).
- "pp": per micro-batch, the stage output [b, S, H] (this rank's dp shard, replicated over mp) goes by
  send/recv to the same (dp, mp) coordinate of the next stage, and its gradient comes back the same size; a
  middle stage does both sides. A tied head exchanges the embedding copies' gradients between the first and
  last stage once per step (send + recv), and the loss and global gradient norm are all-reduced over all
  ranks. mp/dp counts are for one stage's ranks (its decoder layers; the embedding on the first, the head on
  the last).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from autoparallel.planning.memory import DTYPE_BYTES, PlanSetup, local_widths, numel
from placements.lora import adapter_layout, adapter_shapes
from placements.qwen2_vl import (PP_TIED_HEAD, style_for, layout, parameter_shapes, parameter_stages,
                                  tensor_parallel_plan)


@dataclass(frozen=True)
class Collective:
    group: str  # "mp" | "dp" | "pp" | "cp"
    op: str  # all_reduce | all_gather | reduce_scatter | all_to_all | send/recv
    phase: str
    calls: int  # per optimizer step
    bytes_per_call: int  # payload on one rank (for per-parameter collectives: the average)
    note: str = ""

    @property
    def total_bytes(self) -> int:
        return self.calls * self.bytes_per_call


def _trainable_local(setup: PlanSetup, stage: int, prefixes: tuple[str, ...] = ("",)) -> list[int]:
    """mp-local bytes of each trainable tensor of pipeline `stage` (whose name starts with one of `prefixes`):
    what the dp gradient collectives move."""
    config, d, size, split = setup.config, setup.degrees, DTYPE_BYTES[setup.dtype], setup.stage_split()
    shapes = parameter_shapes(config)
    if setup.lora:
        return [numel(adapter_layout(name, shape, config, d.dp, d.mp, 0).local_shape) * size
                for name, shape in adapter_shapes(shapes, list(setup.lora.targets), setup.lora.rank).items()
                if stage in parameter_stages(name, config, split) and name.startswith(prefixes)]
    layouts = (layout(name, shape, config, d.dp, d.mp, 0, setup.trainable) for name, shape in shapes.items()
               if stage in parameter_stages(name, config, split) and name.startswith(prefixes))
    return [numel(lay.local_shape) * size for lay in layouts if lay.grad_local_shape is not None]


def cp_reduced_parameters(config) -> tuple[str, ...]:
    """Name prefixes of the parameters whose gradients context parallel all-reduces over "cp": the decoder layers
    and final norm run on this rank's sequence slice, the head on its share of the supervised rows
    (autoparallel/context_parallel.py). The embedding lookup and the vision tower run on the whole sequence on
    every cp rank, so their gradients are complete there; a tied table gets the head's partial gradient, though."""
    head = "model.embed_tokens." if config.tie_word_embeddings else "lm_head."
    return "model.layers.", "model.norm.", head


def _mean(values: list[int]) -> int:
    return sum(values) // max(1, len(values))


def communication(setup: PlanSetup, cpu: bool = False, stage: int | None = None) -> list[Collective]:
    """Every collective of one optimizer step on one rank of pipeline `stage` (default: the stage with the most
    decoder layers; see the module docstring)."""
    config, d, wl = setup.config, setup.degrees, setup.workload
    split = setup.stage_split()
    if stage is None:
        stage = max(range(setup.pp), key=lambda s: len(split[s]))
    first, last = stage == 0, stage == setup.pp - 1
    e, micro, layers = DTYPE_BYTES[setup.dtype], wl.gradient_accumulation_steps, len(split[stage])
    w = local_widths(config, d.mp)
    act = wl.tokens * w.h * e
    scatter = ("all_reduce", "reduce-scatter done as all-reduce + slice (gloo)") if cpu else ("reduce_scatter", "")
    replays = 2 if wl.recompute else 1
    replayed = ", replayed by recompute" if wl.recompute else ""
    out: list[Collective] = []
    if d.mp > 1 and d.sequence_parallel:
        cpu_note = f"; {scatter[1]}" if cpu else ""
        out += [
            *([Collective("mp", scatter[0], "forward: embedding -> sequence shard", micro, act,
                          "vocab-parallel Partial -> Shard(1)" + cpu_note),
               Collective("mp", "all_gather", "backward: embedding output gradient", micro, act)] if first else []),
            Collective("mp", "all_gather", "forward: attention + MLP inputs", micro * 2 * layers * replays, act,
                       f"2 per layer, replace TP's output all-reduces{replayed}"),
            Collective("mp", scatter[0], "forward: o_proj + down_proj outputs", micro * 2 * layers * replays, act,
                       f"2 per layer, Partial -> Shard(1){cpu_note}"),
            Collective("mp", scatter[0], "backward: attention + MLP input gradients", micro * 2 * layers, act,
                       f"2 per layer, replace TP's all-reduces{cpu_note}"),
            Collective("mp", "all_gather", "backward: o_proj + down_proj output gradients", micro * 2 * layers, act,
                       "2 per layer"),
        ]
        if last:
            out += [Collective("mp", "all_gather", "forward: final norm output for the head", micro, act),
                    Collective("mp", scatter[0], "backward: final norm output gradient", micro, act,
                               "replaces the head's [K, H] all-reduce" + cpu_note)]
    elif d.mp > 1:
        out += [
            *([Collective("mp", "all_reduce", "forward: vocab-parallel embedding", micro, act)] if first else []),
            Collective("mp", "all_reduce", "forward: o_proj + down_proj outputs", micro * 2 * layers * replays, act,
                       f"2 per layer{replayed}"),
            Collective("mp", "all_reduce", "backward: attention + MLP input gradients", micro * 2 * layers, act,
                       "2 per layer"),
            *([Collective("mp", "all_reduce", "backward: head input gradient", micro, wl.supervised * w.h * e,
                          f"[{wl.supervised}, {w.h}]")] if last else []),
        ]
    if d.mp > 1 and last:
        out.append(Collective("mp", "all_reduce", "forward: vocab-parallel CE statistics", micro * 3,
                              wl.supervised * 4, "max, sum exp, target logit"))
    if d.mp > 1 and setup.lora:
        plan = tensor_parallel_plan(config, d.mp)
        adapters = adapter_shapes(parameter_shapes(config), list(setup.lora.targets), setup.lora.rank)
        planned = sum(1 for n in adapters if n.endswith(".lora_A") and stage in parameter_stages(n, config, split)
                      and style_for(n[: -len("lora_A")] + "weight", plan) is not None)
        if planned:
            out.append(Collective("mp", "all_reduce", "LoRA [b, S, r] products", micro * planned * replays,
                                  wl.tokens * setup.lora.rank * e, "rowwise: forward, colwise: backward"))
    if d.dp > 1:
        full = _trainable_local(setup, stage)
        n = len(full)
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
    if d.cp > 1:
        out += _context_parallel(setup, cpu, stage, layers, replays)
    if setup.pp > 1:
        sides = (not first) + (not last)  # receive from the previous stage / send to the next
        boundary = f"[{wl.batch}, {wl.seq_len}, {w.h}] per micro-batch" + (", to and from both neighbours"
                                                                             if sides == 2 else "")
        out += [Collective("pp", "send/recv", "forward: stage activations", micro * sides, act, boundary),
                Collective("pp", "send/recv", "backward: activation gradients", micro * sides, act, boundary)]
        if config.tie_word_embeddings and (first or last):
            tied = layout(f"{PP_TIED_HEAD}.weight", (config.vocab_size, config.hidden_size), config, d.dp, d.mp,
                          d.sharding_stage).grad_local_shape
            out.append(Collective("pp", "send/recv", "tied embedding gradient, first <-> last stage", 2,
                                  numel(tied) * e, "send + recv, summed on both sides"))
        out.append(Collective("pp", "all_reduce", "loss + global gradient norm (all ranks)", 2, 8))
    return out


def decode_communication(setup: PlanSetup, batch: int = 1) -> list[Collective]:
    """The collectives of one generated token (a decode step over the KV cache: [batch, 1] new positions) on one
    rank under tensor parallel (launch/infer.py, `eval`): the vocab-parallel embedding and every rowwise
    projection (o_proj, down_proj) end in a Partial [batch, 1, H] that is all-reduced, and the head's
    vocab-split logits are all-gathered (`TensorParallelModel`: sampling reads them whole on every rank).
    `calls` here count per token, not per optimizer step."""
    config, d = setup.config, setup.degrees
    if d.mp == 1:
        return []
    e = DTYPE_BYTES[setup.dtype]
    row = batch * config.hidden_size * e
    return [Collective("mp", "all_reduce", "decode: vocab-parallel embedding", 1, row),
            Collective("mp", "all_reduce", "decode: o_proj + down_proj outputs", 2 * config.num_hidden_layers, row,
                       "2 per layer"),
            Collective("mp", "all_gather", "decode: vocab-split logits", 1, batch * config.vocab_size * e,
                       f"[{batch}, {config.vocab_size}] for sampling on every rank")]


def group_size(collective: Collective, setup: PlanSetup) -> int:
    """Ranks taking part in `collective`: its mesh axis, or every rank for the pipeline's scalar reductions."""
    d = setup.degrees
    if collective.group == "pp":
        return d.dp * d.mp * setup.pp if collective.op == "all_reduce" else 2
    if collective.group == "cp":
        return d.cp
    return d.mp if collective.group == "mp" else d.dp


def wire_bytes_sent(collective: Collective, setup: PlanSetup) -> int:
    """Bytes one rank sends for `collective` under the ideal algorithm: a ring all-reduce 2(n-1)/n of the
    payload, a ring all-gather / reduce-scatter (n-1)/n of the full tensor; a send/recv entry counts both
    directions, so half of it is sent."""
    n = group_size(collective, setup)
    if collective.op == "send/recv":
        return collective.total_bytes // 2
    factor = 2 * (n - 1) / n if collective.op == "all_reduce" else (n - 1) / n
    return round(collective.total_bytes * factor)


def planned_sent_by_kind(collectives: list[Collective], setup: PlanSetup) -> dict[str, int]:
    """Ideal bytes one rank sends per optimizer step, by collective kind (the ledger's kinds)."""
    out: dict[str, int] = {}
    for c in collectives:
        out[c.op] = out.get(c.op, 0) + wire_bytes_sent(c, setup)
    return out


def _context_parallel(setup: PlanSetup, cpu: bool, stage: int, layers: int, replays: int) -> list[Collective]:
    """The "cp" collectives of one step (see the module docstring)."""
    d, wl, e = setup.degrees, setup.workload, DTYPE_BYTES[setup.dtype]
    w, micro, tokens = local_widths(setup.config, d.mp), wl.gradient_accumulation_steps, wl.tokens // d.cp
    note = "pairwise send/recv (gloo)" if cpu else ""
    kv = w.kv * (d.cp // math.gcd(w.kv // setup.config.head_dim, d.cp))  # repeated KV heads (GQA)
    exchanged = tokens * (2 * w.q + 2 * kv) * e // 4  # q, k, v, attention output: this rank's piece, per call
    full = _trainable_local(setup, stage, cp_reduced_parameters(setup.config))
    rows = math.ceil(wl.supervised / d.cp)  # this rank's share of the supervised rows
    # An all-gather's payload is the gathered tensor.
    return [
        Collective("cp", "all_to_all", "forward: Ulysses q/k/v -> heads, attention output -> sequence",
                   micro * 4 * layers * replays, exchanged, note),
        Collective("cp", "all_to_all", "backward: the same four exchanges reversed", micro * 4 * layers, exchanged,
                   note),
        Collective("cp", "all_gather", "forward: final hidden states for the head", micro, wl.tokens * w.h * e),
        Collective("cp", "all_gather", "backward: the head rows' hidden-state gradients", micro,
                   d.cp * rows * w.h * e, "each rank's share of the supervised rows"),
        Collective("cp", "all_reduce", "gradients of the sequence- and row-split parts", len(full), _mean(full),
                   f"{len(full)} trainable tensors of the decoder layers, final norm and head"),
    ]
