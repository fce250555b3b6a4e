"""Every rendering of a plan. The plan table (plan.txt): parameter -> placements -> local shape -> bytes per rank;
and the `qwen2vl-ap plan` report (memory terms, verdict, collectives).

Computed from `parameter_shapes(config)` without building the model, so it works for 72B. Repeated layers
are folded ("model.layers.*.mlp.up_proj.weight x28"); byte columns are per rank, summed over the fold.
With pipeline stages (pp > 1) rows are folded per stage and a "stage" column says where each parameter lives:
a rank holds only its stage's rows (totals per stage); the tied head's embedding is on the first and the last
stage. With sequence parallel a section lists the `SP_PLAN` regions (which activations are sequence-sharded).
"""
from __future__ import annotations

from autoparallel.planning.communication import Collective
from autoparallel.planning.memory import GiB, LoraSpec, ParamRow, PlanSetup, Workload, parameter_rows
from autoparallel.planning.setup import PlanOptions, Planned
from network.config import Qwen2VLConfig
from placements.degrees import ParallelDegrees
from placements.qwen2_vl import (FROZEN_VISION, PP_FIRST_STAGE, PP_LAST_STAGE, PP_TIED_HEAD, SP_GATHER_OUTPUT,
                                  SP_GATHER_REGION, SP_PLAN, SP_SCATTER_INPUT, Trainable)

def table_setup(config: Qwen2VLConfig, dp: int = 1, mp: int = 1, sharding_stage: int = 0, *, pp: int = 1,
                layers_per_stage: list[int] | None = None, sequence_parallel: bool = False,
                trainable: Trainable = FROZEN_VISION, dtype: str | None = None,
                lora: LoraSpec | None = None) -> PlanSetup:
    """A `PlanSetup` for the plan table alone (state bytes do not depend on the workload)."""
    degrees = ParallelDegrees(data_parallel_degree=1 if sharding_stage else dp, tensor_parallel_degree=mp,
                              sharding_parallel_degree=dp if sharding_stage else 1, sharding_stage=sharding_stage,
                              pipeline_parallel_degree=pp, sequence_parallel=sequence_parallel)
    return PlanSetup(config, degrees, Workload(1, 1), dtype=dtype or config.dtype, trainable=trainable,
                     lora=lora, layers_per_stage=tuple(layers_per_stage) if layers_per_stage else None)


def plan_rows(config: Qwen2VLConfig, dp: int = 1, mp: int = 1, sharding_stage: int = 0, **kwargs) -> list[ParamRow]:
    """One row per parameter pattern (and pipeline stage), in model order (`parameter_rows`)."""
    return parameter_rows(table_setup(config, dp, mp, sharding_stage, **kwargs))


def _mib(n: int) -> str:
    return f"{n / 2**20:,.2f}"


def _stage_contents(config: Qwen2VLConfig, split: list[range]) -> list[str]:
    last, out = len(split) - 1, []
    for i, run in enumerate(split):
        parts = [f"decoder layers {run.start}-{run.stop - 1}"]
        if i == 0:
            parts += PP_FIRST_STAGE
        if i == last:
            parts += PP_LAST_STAGE if not config.tie_word_embeddings else \
                [*PP_LAST_STAGE[:1], f"tied head = a copy of {PP_TIED_HEAD}, gradient summed with stage 0's"]
        out.append(f"  stage {i}: " + ", ".join(parts))
    return out


_SP_EFFECT = {
    SP_SCATTER_INPUT: "decoder input (embeddings) -> Shard(1): the residual stream starts sequence-sharded",
    SP_GATHER_REGION: "input all-gathered (colwise projections need every token); Partial rowwise output -> Shard(1) "
                      "(reduce-scatter; all-reduce + slice on CPU)",
    SP_GATHER_OUTPUT: "output all-gathered to Replicate for the head (supervised positions)",
}


def _sp_section(mp: int) -> list[str]:
    if mp == 1:
        return ["sequence parallel: inactive (needs mp > 1)"]
    width = max(map(len, SP_PLAN))
    return [f"sequence parallel (SP_PLAN): decoder activations [b, S, H] outside the attention/MLP blocks are Shard(1) "
            f'on "mp", S/{mp} tokens per rank: the residual stream and the RMSNorm inputs/outputs '
            "(input_layernorm, post_attention_layernorm)",
            *(f"  {key:{width}}  {style:13}  {_SP_EFFECT[style]}" for key, style in SP_PLAN.items())]


def render_plan(config: Qwen2VLConfig, dp: int = 1, mp: int = 1, sharding_stage: int = 0, **kwargs) -> str:
    """The plan table of a layout given by its degrees (keywords as `table_setup`)."""
    return render_plan_table(table_setup(config, dp, mp, sharding_stage, **kwargs))


def render_plan_table(setup: PlanSetup) -> str:
    """Human-readable plan table with per-rank totals (MiB): per stage when pp > 1, and the SP regions. The rows
    and totals are `parameter_rows(setup)`, the numbers `state_memory` (and so `qwen2vl-ap plan`) adds up."""
    config, d, pp = setup.config, setup.degrees, setup.pp
    rows = parameter_rows(setup)
    staged = pp > 1
    header = ("parameter", "x", *(("stage",) if staged else ()), "global shape", "[dp, mp]", "local shape",
              "param MiB", "grad MiB", "optim MiB")
    text_cols = len(header) - 3
    table = [header]
    for r in rows:
        lay = r.layout
        where = "dense (frozen)" if lay.dense else f"[{lay.placements[0]}, {lay.placements[1]}]"
        stage = (" + ".join(map(str, r.stages)) + (" (tied copy)" if len(r.stages) > 1 else ""),) if staged else ()
        table.append((r.pattern, str(r.count), *stage, str(list(lay.shape)), where, str(list(lay.local_shape)),
                      _mib(r.param_bytes), _mib(r.grad_bytes), _mib(r.optimizer_bytes)))
    keys = ("param_bytes", "grad_bytes", "optimizer_bytes")
    blank = ("",) * (text_cols - 1)
    for s in range(pp):
        held = [r for r in rows if s in r.stages]
        label = f"total per rank, stage {s}" if staged else "total per rank"
        table.append((label, *blank, *(_mib(sum(getattr(r, k) for r in held)) for k in keys)))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    title = (f"plan: dp={d.dp} mp={d.mp} pp={pp} sharding_stage={d.sharding_stage} "
             f"sequence_parallel={d.sequence_parallel} dtype={setup.dtype} trainable: {setup.trained().names()}"
             + (f" lora_rank={setup.lora.rank}" if setup.lora else ""))
    lines = [title] + ["  ".join(c.ljust(w) if i < text_cols else c.rjust(w)
                                 for i, (c, w) in enumerate(zip(row, widths))) for row in table]
    lines.insert(2, "-" * len(lines[1]))
    if staged:
        lines += [f"pipeline: {pp} stages, each on its own [dp, mp] sub-mesh; a rank holds only its stage's "
                  "parameters (and their gradients and optimizer states)",
                  *_stage_contents(config, setup.stage_split())]
    if d.sequence_parallel:
        lines += _sp_section(d.mp)
    return "\n".join(lines)


# ---- the `qwen2vl-ap plan` report ---------------------------------------------------------------------------
def gib(n: int) -> str:
    return f"{n / GiB:8.2f} GiB"


def _size(n: int) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def render_report(planned: Planned, collectives: list[Collective], options: PlanOptions) -> str:
    """The `qwen2vl-ap plan` report: memory per rank with its terms and verdict, then the collectives."""
    s, mem, cfg = planned.setup, planned.memory, planned.cfg
    d, wl = s.degrees, s.workload
    stage = f" (sharding stage{d.sharding_stage})" if d.sharding_stage else ""
    kind = "lora" if s.lora else "sft"
    lines = [
        f"plan: {cfg.model.model_name_or_path} {kind} | {d.world_size} ranks = dp {d.dp}{stage} x mp {d.mp}"
        f"{' (sequence parallel)' if d.sequence_parallel else ''} x pp {s.pp} | "
        f"{s.dtype}, {'flash' if s.flash_attention else 'math'} attention ({options.device})",
        f"per rank and micro-step: batch {wl.batch} x {wl.seq_len} tokens; {planned.image_note}; "
        f"{wl.supervised_fraction:.0%} supervised -> {wl.supervised} logit rows; recompute "
        f"{'on' if wl.recompute else 'off'}; accumulation {wl.gradient_accumulation_steps}",
        "",
    ]
    if s.pp > 1:
        split = s.stage_split()
        lines += [f"pipeline: {s.pp} stages, FThenB over {wl.gradient_accumulation_steps} micro-batches "
                  "(all of a stage's micro-batch activations alive at once); per stage and rank:"]
        lines += [f"  stage {m.stage}: decoder layers {split[m.stage].start}-{split[m.stage].stop - 1}"
                  f"{' + vision + embeddings' if m.stage == 0 else ''}"
                  f"{' + norm + head' if m.stage == s.pp - 1 else ''}"
                  f"{' (tied: embedding copy)' if m.stage == s.pp - 1 and s.config.tie_word_embeddings else ''}: "
                  f"state {_size(m.state.total)}, activations {_size(m.step_peak)}, total {_size(m.total)}"
                  for m in planned.stages]
        lines += ["", f"memory per rank (role: pipeline stage {mem.stage}, the fullest - its dp x mp ranks hold the "
                      "same; rank 0 is the fullest if a dim does not divide)"]
    else:
        lines.append("memory per rank (role: every rank - dp x mp ranks hold the same; rank 0 is the fullest if a "
                     "dim does not divide)")
    lines += [f"  {t.name:44}{gib(t.bytes)}  {t.note}" for t in mem.state.terms]
    lines.append(f"  {'state subtotal':44}{gib(mem.state.total)}")
    act = mem.activations
    lines.append(f"  {'activations, peak (' + act.peak_phase + ')':44}{gib(act.peak)}")
    lines += [f"    kept: {t.name:38}{gib(t.bytes)}  {t.note}" for t in act.saved]
    lines += [f"    phase: {t.name:37}{gib(t.bytes)}  {t.note}" for t in act.phases]
    lines.append(f"    phase: {'optimizer update':37}{gib(mem.state.largest_grad)}  one gradient-sized temporary")
    if mem.reserve:
        lines.append(f"  {'reserve (CUDA context, NCCL, allocator)':44}{gib(mem.reserve)}  assumed")
    lines.append(f"  {'training step (state + step peak)':44}{gib(mem.step_total)}")
    if mem.startup is not None:
        up = mem.startup
        how = ("whole model loaded before ZeRO-3 shards it" if up.dense_first
               else "lazy build, this rank's slices of the checkpoint")
        lines.append(f"  {'start-up (build + load)':44}{gib(mem.startup_total)}  {how}: weights "
                     f"{_size(up.weights)} + one tensor in flight {_size(up.in_flight)} ({up.in_flight_name})")
    lines.append(f"  {'peak phase':44}{mem.peak_phase}")
    limit = int(options.device_memory_gb * GiB)
    headroom = limit - mem.total
    verdict = (f"fits, headroom {_size(headroom)} ({headroom / limit:.0%})" if headroom >= 0
               else f"DOES NOT FIT, short by {_size(-headroom)}")
    lines.append(f"  {'total':44}{gib(mem.total)}  of {options.device_memory_gb:g} GiB: {verdict}")
    if planned.problems:
        lines += ["", "the engine would refuse this config:"] + [f"  - {p}" for p in planned.problems]
    lines += ["", "communication per optimizer step, per rank" + (f" of stage {mem.stage}" if s.pp > 1 else "")
              + " (payload per call)",
              f"  {'group':6}{'op':16}{'calls':>7}{'per call':>12}{'total':>12}  phase"]
    for c in collectives:
        lines.append(f"  {c.group:6}{c.op:16}{c.calls:7d}{_size(c.bytes_per_call):>12}{_size(c.total_bytes):>12}  "
                     f"{c.phase}{' - ' + c.note if c.note else ''}")
    return "\n".join(lines)
