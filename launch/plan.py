"""`qwen2vl-ap plan`: will this run fit? Per-rank memory and per-step communication for a run config, before
launch — no model is built and no worker is started (autoparallel/planner.py, autoparallel/comm_plan.py).

    qwen2vl-ap plan --config qwen2vl_2b_sft_auto [--key value ...] [--nproc_per_node N --nnodes M]
                    [--device_memory_gb 80] [--device gpu|cpu] [--image_size PX] [--images_per_sample 1]
                    [--supervised_fraction 0.25] [--reserve_gb 1]

Every run-config key works as in `sft`/`lora` (same sections, same override parsing). Planner options:
- device: gpu (default) plans bf16 runs with flash attention as on CUDA; cpu plans what this CPU build runs
  (fp32 — bf16 is ignored there — and the exact math attention).
- image_size: side in pixels of the square image assumed per sample, before `image_resolution`, min/max_pixels
  (default: the largest the config allows: image_resolution, else sqrt(max_pixels)).
- supervised_fraction: share of positions whose next token is supervised (logits are computed only there).
- reserve_gb: CUDA context, communication buffers and allocator slack, not modelled (default 1 on gpu).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path
from typing import Any

from autoparallel.comm_plan import Collective, communication
from autoparallel.mesh import degree_problems
from autoparallel.planner import GiB, LoraSpec, MemoryPlan, PlanSetup, Workload, stage_memory_plans
from launch.config import ConfigError, RunConfig, parse_overrides, read_yaml, resolve_config_path
from network.config import Qwen2VLConfig
from network.image_processing import Qwen2VLImageProcessor
from network.log import logger

# Shapes are all the planner needs: a Hub id that is not a local directory plans with its preset.
HUB_PRESETS = {"Qwen/Qwen2-VL-2B-Instruct": "qwen2-vl-2b", "Qwen/Qwen2-VL-2B": "qwen2-vl-2b",
               "Qwen/Qwen2-VL-7B-Instruct": "qwen2-vl-7b", "Qwen/Qwen2-VL-7B": "qwen2-vl-7b",
               "Qwen/Qwen2-VL-72B-Instruct": "qwen2-vl-72b", "Qwen/Qwen2-VL-72B": "qwen2-vl-72b",
               "Qwen/QVQ-72B-Preview": "qvq-72b-preview"}


@dataclasses.dataclass
class PlanOptions:
    device_memory_gb: float = 80.0
    device: str = "gpu"
    image_size: int | None = None
    images_per_sample: int = 1
    supervised_fraction: float = 0.25
    reserve_gb: float | None = None
    nproc_per_node: int | None = None
    nnodes: int = 1


@dataclasses.dataclass
class Planned:
    cfg: RunConfig
    setup: PlanSetup
    memory: MemoryPlan  # the fullest pipeline stage's
    image_note: str
    problems: list[str]  # degree problems: the engine would refuse the config
    stages: list[MemoryPlan]  # every pipeline stage's (one when pp = 1)


@functools.lru_cache(maxsize=None)
def _hub_fallback(name: str) -> str | None:
    """The preset standing in for a Hub id that is not a local directory (logged once)."""
    if name not in HUB_PRESETS or Path(name).is_dir():
        return None
    logger.info("plan: %s is not a local directory; using the %s preset's shapes", name, HUB_PRESETS[name])
    return HUB_PRESETS[name]


def _model_config(name: str) -> Qwen2VLConfig:
    from autoparallel.run_config import model_config

    preset = _hub_fallback(name)
    return Qwen2VLConfig.preset(preset) if preset else model_config(name)


def _command(config: str | None, overrides: dict[str, str]) -> str:
    """lora when the config (or the command line) sets LoRA keys, else sft."""
    keys = set(overrides)
    if config:
        keys |= set(read_yaml(resolve_config_path(config)))
    return "lora" if any(k == "lora" or k.startswith("lora_") for k in keys) else "sft"


def build(config: str | None, overrides: dict[str, Any], options: PlanOptions) -> Planned:
    """The run config with `overrides`, its `PlanSetup` and memory plan."""
    from autoparallel.run_config import load

    command = _command(config, overrides)
    cfg = load(command, config, overrides)
    model = _model_config(cfg.model_name_or_path)
    degrees = cfg.parallel.degrees()
    world = options.nproc_per_node * options.nnodes if options.nproc_per_node else None
    problems = [p for p in degree_problems(degrees, model, world, allow_pipeline=True)
                # planning a GPU run on a CPU machine: the CPU build's own limits do not apply
                if not (options.device == "gpu" and "CPU build" in p)]
    v = model.vision_config
    processor = Qwen2VLImageProcessor(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels,
                                      image_resolution=cfg.image_resolution, patch_size=v.patch_size,
                                      temporal_patch_size=v.temporal_patch_size, merge_size=v.spatial_merge_size)
    side = options.image_size or cfg.image_resolution or math.isqrt(cfg.max_pixels)
    grid = processor.grid_thw(side, side)
    rh, rw = processor.resized_hw(side, side)
    image_tokens = grid[0] * grid[1] * grid[2] // v.spatial_merge_size ** 2
    image_note = (f"{options.images_per_sample} image/sample of {side}x{side} px -> {rh}x{rw} -> grid "
                  f"{grid[0]}x{grid[1]}x{grid[2]} = {grid[0] * grid[1] * grid[2]} patches, {image_tokens} tokens")
    if image_tokens * options.images_per_sample >= cfg.max_seq_length:
        image_note += (f" (WARNING: more than max_seq_length={cfg.max_seq_length}; such samples are cut or "
                       "skipped by the data pipeline: pass --image_size for your data)")
    half = cfg.bf16 and options.device == "gpu"
    lora = None
    if command == "lora" and cfg.lora:
        lora = LoraSpec(cfg.lora_rank, tuple(cfg.lora_target_modules))
    workload = Workload(batch=cfg.per_device_train_batch_size, seq_len=cfg.max_seq_length, image_grid=grid,
                        images_per_sample=options.images_per_sample,
                        supervised_fraction=options.supervised_fraction, recompute=cfg.recompute,
                        gradient_accumulation_steps=cfg.gradient_accumulation_steps)
    setup = PlanSetup(config=model, degrees=degrees, workload=workload, dtype="bfloat16" if half else "float32",
                      train_merger=cfg.train_merger, lora=lora, flash_attention=half,
                      layers_per_stage=tuple(cfg.layers_per_stage) or None)
    reserve = options.reserve_gb if options.reserve_gb is not None else (1.0 if options.device == "gpu" else 0.0)
    stages = stage_memory_plans(setup, int(reserve * GiB))
    return Planned(cfg, setup, max(stages, key=lambda m: m.total), image_note, problems, stages)


# ---- what would make it fit ---------------------------------------------------------------------------------
Change = tuple[str, dict[str, Any]]


def _candidates(cfg: RunConfig, setup: PlanSetup) -> list[list[Change]]:
    """Groups of alternative changes, in the order to try them: cheapest in speed first (ZeRO stage,
    recompute), then less work per step (batch, image size: {} = searched in `advise`), then more tensor
    parallel. Within a group, milder options come first."""
    d, groups = setup.degrees, []
    if d.dp > 1:
        stages = []
        for stage in range(d.sharding_stage + 1, 4):
            change: dict[str, Any] = {"sharding": f"stage{stage}"}
            if d.sharding_stage == 0:
                change |= {"data_parallel_degree": 1, "sharding_parallel_degree": d.dp}
            stages.append((f"sharding stage{d.sharding_stage} -> stage{stage}", change))
        groups.append(stages)
    if not cfg.recompute:
        groups.append([("recompute on", {"recompute": True})])
    b, acc, batches = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps, []
    while b > 1:
        b //= 2
        factor = cfg.per_device_train_batch_size // b
        batches.append((f"per_device_train_batch_size {cfg.per_device_train_batch_size} -> {b} (accumulation "
                         f"x{factor})", {"per_device_train_batch_size": b, "gradient_accumulation_steps": acc * factor}))
    groups += [batches, [("max_pixels", {})]]
    world, mp, tps = d.dp * d.mp, d.mp * 2, []
    key = "sharding_parallel_degree" if d.sharding_stage else "data_parallel_degree"
    while mp <= world and world % mp == 0:
        dp = world // mp
        tps.append((f"tensor_parallel_degree {d.mp} -> {mp} ({key} {dp})",
                    {"tensor_parallel_degree": mp, key: dp, "gradient_accumulation_steps": acc * d.dp // dp}))
        mp *= 2
    groups.append(tps)
    return [g for g in groups if g]


@dataclasses.dataclass
class Attempt:
    change: str
    overrides: dict[str, Any]
    total: int
    fits: bool


def _largest_max_pixels(config, overrides, options, limit) -> Attempt | None:
    """The largest max_pixels (whole 28x28 merged tokens) that fits, by bisection (memory grows with it)."""
    base = build(config, overrides, options)
    factor = base.setup.config.vision_config.patch_size * base.setup.config.vision_config.spatial_merge_size
    t, h, w = base.setup.workload.image_grid
    lo, hi = max(1, -(-base.cfg.min_pixels // factor ** 2)), h * w // 4 - 1
    best = None
    while lo <= hi:
        mid = (lo + hi) // 2
        change = {"max_pixels": mid * factor ** 2, "min_pixels": min(base.cfg.min_pixels, mid * factor ** 2)}
        planned = build(config, overrides | change, options)
        if planned.memory.total <= limit and not planned.problems:
            best, lo = Attempt(f"max_pixels <= {mid * factor ** 2} ({mid} tokens per image)", change,
                               planned.memory.total, True), mid + 1
        else:
            hi = mid - 1
    return best


def advise(config: str | None, overrides: dict[str, Any], options: PlanOptions) -> list[Attempt]:
    """Re-plan with each candidate change alone; stop at the first that fits. If none fits alone, stack the
    groups in the same order (the mildest option of a group that fits, else its strongest) until it fits;
    the last attempt then lists every change it needed."""
    limit = int(options.device_memory_gb * GiB)
    base = build(config, overrides, options)
    groups = _candidates(base.cfg, base.setup)
    attempts: list[Attempt] = []

    def attempt(label: str, change: dict[str, Any], on: dict[str, Any]) -> Attempt | None:
        if not change:  # the max_pixels search
            return _largest_max_pixels(config, on, options, limit)
        try:
            planned = build(config, on | change, options)
        except ConfigError:
            return None
        if planned.problems:
            return None
        return Attempt(label, change, planned.memory.total, planned.memory.total <= limit)

    for label, change in (option for group in groups for option in group):
        result = attempt(label, change, overrides)
        if result is not None:
            attempts.append(result)
            if result.fits:
                return attempts
    stacked, labels, combined = dict(overrides), [], None
    for group in groups:
        results = [r for r in (attempt(label, change, stacked) for label, change in group) if r is not None]
        if not results:
            continue
        chosen = next((r for r in results if r.fits), results[-1])
        stacked |= chosen.overrides
        labels.append(chosen.change)
        combined = Attempt(" + ".join(labels), {k: v for k, v in stacked.items() if overrides.get(k) != v},
                           chosen.total, chosen.fits)
        if chosen.fits:
            break
    return attempts + ([combined] if combined else [])


# ---- rendering ----------------------------------------------------------------------------------------------
def _gib(n: int) -> str:
    return f"{n / GiB:8.2f} GiB"


def _size(n: int) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def render(planned: Planned, collectives: list[Collective], options: PlanOptions) -> str:
    s, mem, cfg = planned.setup, planned.memory, planned.cfg
    d, wl = s.degrees, s.workload
    stage = f" (sharding stage{d.sharding_stage})" if d.sharding_stage else ""
    kind = "lora" if s.lora else "sft"
    lines = [
        f"plan: {cfg.model_name_or_path} {kind} | {d.world_size} ranks = dp {d.dp}{stage} x mp {d.mp}"
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
    lines += [f"  {t.name:44}{_gib(t.bytes)}  {t.note}" for t in mem.state.terms]
    lines.append(f"  {'state subtotal':44}{_gib(mem.state.total)}")
    act = mem.activations
    lines.append(f"  {'activations, peak (' + act.peak_phase + ')':44}{_gib(act.peak)}")
    lines += [f"    kept: {t.name:38}{_gib(t.bytes)}  {t.note}" for t in act.saved]
    lines += [f"    phase: {t.name:37}{_gib(t.bytes)}  {t.note}" for t in act.phases]
    lines.append(f"    phase: {'optimizer update':37}{_gib(mem.state.largest_grad)}  one gradient-sized temporary")
    if mem.reserve:
        lines.append(f"  {'reserve (CUDA context, NCCL, allocator)':44}{_gib(mem.reserve)}  assumed")
    limit = int(options.device_memory_gb * GiB)
    headroom = limit - mem.total
    verdict = (f"fits, headroom {_size(headroom)} ({headroom / limit:.0%})" if headroom >= 0
               else f"DOES NOT FIT, short by {_size(-headroom)}")
    lines.append(f"  {'total':44}{_gib(mem.total)}  of {options.device_memory_gb:g} GiB: {verdict}")
    if planned.problems:
        lines += ["", "the engine would refuse this config:"] + [f"  - {p}" for p in planned.problems]
    lines += ["", "communication per optimizer step, per rank" + (f" of stage {mem.stage}" if s.pp > 1 else "")
              + " (payload per call)",
              f"  {'group':6}{'op':16}{'calls':>7}{'per call':>12}{'total':>12}  phase"]
    for c in collectives:
        lines.append(f"  {c.group:6}{c.op:16}{c.calls:7d}{_size(c.bytes_per_call):>12}{_size(c.total_bytes):>12}  "
                     f"{c.phase}{' - ' + c.note if c.note else ''}")
    return "\n".join(lines)


def plan_main(argv: list[str]) -> int:
    from launch.cli import split_launch_options

    launch, config, rest = split_launch_options(argv)
    overrides: dict[str, Any] = parse_overrides(rest)
    fields = {f.name: f.type for f in dataclasses.fields(PlanOptions)}
    values = {k: overrides.pop(k) for k in list(overrides) if k in fields}
    values |= {k: v for k, v in launch.items() if k in ("nproc_per_node", "nnodes")}
    casts = {"device_memory_gb": float, "supervised_fraction": float, "reserve_gb": float, "image_size": int,
             "images_per_sample": int, "nproc_per_node": int, "nnodes": lambda x: int(str(x).split(":")[0]),
             "device": str}
    try:
        options = PlanOptions(**{k: casts[k](v) for k, v in values.items()})
    except ValueError as exc:
        raise ConfigError(f"plan options: {exc}") from None
    if options.device not in ("gpu", "cpu") or not 0 < options.supervised_fraction <= 1:
        raise ConfigError("plan options: --device gpu|cpu, --supervised_fraction in (0, 1]")
    planned = build(config, overrides, options)
    collectives = communication(planned.setup, cpu=options.device == "cpu", stage=planned.memory.stage)
    print(render(planned, collectives, options))
    if planned.problems:
        return 2
    if not planned.memory.fits(int(options.device_memory_gb * GiB)):
        attempts = advise(config, overrides, options)
        print("\nwhat would make it fit (re-planned with each change, in order):")
        for a in attempts:
            flags = " ".join(f"--{k} {str(v).lower() if isinstance(v, bool) else v}" for k, v in a.overrides.items())
            print(f"  {'FITS' if a.fits else 'no  '}  {a.change:60} total {_gib(a.total)}   {flags}")
        if not any(a.fits for a in attempts):
            print("  nothing tried fits: more devices, or a smaller model")
    return 0
