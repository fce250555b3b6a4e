"""The planned run: a run config (`autoparallel.config.RunConfig`) and planner options -> the `PlanSetup`
(model shapes, degrees, workload) and the memory plan of every pipeline stage. Nothing is built or started.

Planner options:
- device: gpu (default) plans bf16 runs with flash attention as on CUDA; cpu plans what this CPU build runs
  (fp32 — bf16 is ignored there — and the exact math attention).
- image_size: side in pixels of the square image assumed per sample, before `image_resolution`, min/max_pixels
  (default: the largest the config allows: image_resolution, else sqrt(max_pixels)).
- image_hw, longest_sample: what `qwen2vl-ap plan` read from the data (launch/plan.py): the largest image's
  original (height, width), used instead of image_size's square, and the longest sample in tokens (padded as the
  loader pads), the sequence length planned unless packing fills rows to max_seq_length.
- supervised_fraction: share of positions whose next token is supervised (logits are computed only there).
- reserve_gb: CUDA context, communication buffers and allocator slack, not modelled (default 1 on gpu).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path

from autoparallel.config import RunConfig, model_config
from autoparallel.planning.memory import GiB, LoraSpec, MemoryPlan, PlanSetup, Workload, stage_memory_plans
from network.config import Qwen2VLConfig
from network.image_processing import Qwen2VLImageProcessor
from network.log import logger
from placements.degrees import degree_problems

# Shapes are all the planner needs: a Hub id that is not a local directory plans with its preset.
HUB_PRESETS = {"Qwen/Qwen2-VL-2B-Instruct": "qwen2-vl-2b", "Qwen/Qwen2-VL-2B": "qwen2-vl-2b",
               "Qwen/Qwen2-VL-7B-Instruct": "qwen2-vl-7b", "Qwen/Qwen2-VL-7B": "qwen2-vl-7b",
               "Qwen/Qwen2-VL-72B-Instruct": "qwen2-vl-72b", "Qwen/Qwen2-VL-72B": "qwen2-vl-72b",
               "Qwen/QVQ-72B-Preview": "qvq-72b-preview",
               "Qwen/Qwen2.5-VL-3B-Instruct": "qwen2.5-vl-3b", "Qwen/Qwen2.5-VL-7B-Instruct": "qwen2.5-vl-7b",
               "Qwen/Qwen2.5-VL-32B-Instruct": "qwen2.5-vl-32b", "Qwen/Qwen2.5-VL-72B-Instruct": "qwen2.5-vl-72b"}


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
    image_hw: tuple[int, int] | None = None
    longest_sample: int | None = None


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
    preset = _hub_fallback(name)
    return Qwen2VLConfig.preset(preset) if preset else model_config(name)


def plan_run(cfg: RunConfig, options: PlanOptions) -> Planned:
    """The `PlanSetup` and memory plan of a run config."""
    model = _model_config(cfg.model.model_name_or_path)
    world = options.nproc_per_node * options.nnodes if options.nproc_per_node else None
    if world and cfg.parallel.data_parallel_degree is None:
        try:  # as the launcher does: derived from the world size (a world that fits none is a problem below)
            cfg.parallel.resolve_data_parallel(world)
        except ValueError:
            pass
    degrees = cfg.parallel.degrees()
    # Planning a GPU run on a CPU machine: the CPU build's own limits do not apply.
    problems = degree_problems(degrees, model, world, allow_pipeline=True, cpu_build=options.device == "cpu")
    v = model.vision_config
    processor = Qwen2VLImageProcessor(**cfg.data.pixel_overrides, patch_size=v.patch_size,
                                      temporal_patch_size=v.temporal_patch_size, merge_size=v.spatial_merge_size)
    side = options.image_size or cfg.data.image_resolution or math.isqrt(processor.max_pixels)
    height, width = options.image_hw or (side, side)
    grid = processor.grid_thw(height, width)
    rh, rw = processor.resized_hw(height, width)
    image_tokens = grid[0] * grid[1] * grid[2] // v.spatial_merge_size ** 2
    image_note = (f"{options.images_per_sample} image/sample of {height}x{width} px -> {rh}x{rw} -> grid "
                  f"{grid[0]}x{grid[1]}x{grid[2]} = {grid[0] * grid[1] * grid[2]} patches, {image_tokens} tokens")
    if image_tokens * options.images_per_sample >= cfg.data.max_seq_length:
        image_note += (f" (WARNING: more than max_seq_length={cfg.data.max_seq_length}; such samples are cut or "
                       "skipped by the data pipeline: pass --image_size for your data)")
    half = cfg.model.bf16 and options.device == "gpu"
    lora = LoraSpec(cfg.lora.lora_rank, tuple(cfg.lora.lora_target_modules)) if cfg.uses_lora else None
    seq_len = cfg.data.max_seq_length
    if options.longest_sample and not cfg.data.packing:
        seq_len = min(seq_len, options.longest_sample)
    workload = Workload(batch=cfg.train.per_device_train_batch_size, seq_len=seq_len, image_grid=grid,
                        images_per_sample=options.images_per_sample,
                        supervised_fraction=options.supervised_fraction, recompute=cfg.model.recompute,
                        vit_recompute=cfg.model.recompute_vit,
                        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps)
    setup = PlanSetup(config=model, degrees=degrees, workload=workload, dtype="bfloat16" if half else "float32",
                      trainable=cfg.model.trainable(), lora=lora, flash_attention=half,
                      layers_per_stage=tuple(cfg.parallel.layers_per_stage) or None)
    reserve = options.reserve_gb if options.reserve_gb is not None else (1.0 if options.device == "gpu" else 0.0)
    stages = stage_memory_plans(setup, int(reserve * GiB))
    return Planned(cfg, setup, max(stages, key=lambda m: m.total), image_note, problems, stages)


def step_workload(workload: Workload, seq_len: int, patches: int, loss_positions: int) -> Workload:
    """`workload` as one step actually ran it (the trainer's per-step `seq_len`, `patches`, `loss_positions` in
    metrics.jsonl), where the planned one assumes every sample fills the length it plans and the largest image:
    the padded sequence length, this rank's patches and the loss positions."""
    # The planner takes ceil(fraction x tokens) positions: half a position below the count lands on it exactly.
    return dataclasses.replace(workload, seq_len=seq_len, rank_patches=patches,
                               supervised_fraction=(loss_positions - 0.5) / (workload.batch * seq_len))
