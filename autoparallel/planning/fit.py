"""What would make it fit: re-plan a run with candidate changes (ZeRO stage, recompute, smaller batches, context
parallel, image size, more tensor parallel), alone and then stacked, and report each attempt."""
from __future__ import annotations

import dataclasses
from typing import Any

from autoparallel.config import ConfigError, RunConfig
from autoparallel.planning.memory import GiB, PlanSetup
from autoparallel.planning.setup import PlanOptions, Planned, plan_run
from network.image_processing import DEFAULT_MIN_PIXELS

Change = tuple[str, dict[str, Any]]


def _candidates(cfg: RunConfig, setup: PlanSetup) -> list[list[Change]]:
    """Groups of alternative changes, in the order to try them: cheapest in speed first (ZeRO stage,
    recompute), then less work per step (batch), then context parallel (one sample's tokens over more ranks,
    the data unchanged), then smaller images ({} = searched in `advise`), then more tensor parallel. Within a
    group, milder options come first."""
    d, groups = setup.degrees, []
    if d.dp > 1:
        stages = []
        for stage in range(d.sharding_stage + 1, 4):
            change: dict[str, Any] = {"sharding": f"stage{stage}"}
            if d.sharding_stage == 0:
                change |= {"data_parallel_degree": 1, "sharding_parallel_degree": d.dp}
            stages.append((f"sharding stage{d.sharding_stage} -> stage{stage}", change))
        groups.append(stages)
    if not cfg.model.recompute:
        groups.append([("recompute on", {"recompute": True})])
    b, acc, batches = cfg.train.per_device_train_batch_size, cfg.train.gradient_accumulation_steps, []
    while b > 1:
        b //= 2
        factor = cfg.train.per_device_train_batch_size // b
        batches.append((f"per_device_train_batch_size {cfg.train.per_device_train_batch_size} -> {b} (accumulation "
                         f"x{factor})", {"per_device_train_batch_size": b, "gradient_accumulation_steps": acc * factor}))
    groups += [batches, _context_parallel_options(setup), [("max_pixels", {})]]
    world, mp, tps = d.dp * d.mp, d.mp * 2, []
    key = "sharding_parallel_degree" if d.sharding_stage else "data_parallel_degree"
    while mp <= world and world % mp == 0:
        dp = world // mp
        tps.append((f"tensor_parallel_degree {d.mp} -> {mp} ({key} {dp})",
                    {"tensor_parallel_degree": mp, key: dp, "gradient_accumulation_steps": acc * d.dp // dp}))
        mp *= 2
    groups.append(tps)
    return [g for g in groups if g]


def _context_parallel_options(setup: PlanSetup) -> list[Change]:
    """Raise the context degree on the same ranks (taken from data parallel / sharding) while the heads and
    KV heads still split over it (Ulysses); not with tensor parallel or pipeline stages (not supported)."""
    d, config, options = setup.degrees, setup.config, []
    if d.mp > 1 or d.pipeline_parallel_degree > 1:
        return options
    key = "sharding_parallel_degree" if d.sharding_stage else "data_parallel_degree"
    cp, ranks = d.cp * 2, d.dp * d.cp
    while ranks % cp == 0 and config.num_attention_heads % cp == 0 and config.num_key_value_heads % cp == 0:
        dp = ranks // cp
        if d.sharding_stage and dp == 1:
            break  # ZeRO over one rank is refused; stage changes come from the sharding group
        options.append((f"context_parallel_degree {d.cp} -> {cp} ({key} {dp})",
                        {"context_parallel_degree": cp, key: dp,
                         "gradient_accumulation_steps": setup.workload.gradient_accumulation_steps * d.dp // dp}))
        cp *= 2
    return options


@dataclasses.dataclass
class Attempt:
    change: str
    overrides: dict[str, Any]
    total: int
    fits: bool


def _largest_max_pixels(base: Planned, cfg: RunConfig, options: PlanOptions, limit: int) -> Attempt | None:
    """The largest max_pixels (whole 28x28 merged tokens) that fits, by bisection (memory grows with it)."""
    factor = base.setup.config.vision_config.patch_size * base.setup.config.vision_config.spatial_merge_size
    t, h, w = base.setup.workload.image_grid
    min_pixels = cfg.data.min_pixels or DEFAULT_MIN_PIXELS
    lo, hi = max(1, -(-min_pixels // factor ** 2)), h * w // 4 - 1
    best = None
    while lo <= hi:
        mid = (lo + hi) // 2
        change = {"max_pixels": mid * factor ** 2, "min_pixels": min(min_pixels, mid * factor ** 2)}
        planned = plan_run(cfg.with_overrides(change, "plan"), options)
        if planned.memory.total <= limit and not planned.problems:
            best, lo = Attempt(f"max_pixels <= {mid * factor ** 2} ({mid} tokens per image)", change,
                               planned.memory.total, True), mid + 1
        else:
            hi = mid - 1
    return best


def advise(cfg: RunConfig, options: PlanOptions) -> list[Attempt]:
    """Re-plan with each candidate change alone; stop at the first that fits. If none fits alone, stack the
    groups in the same order (the mildest option of a group that fits, else its strongest) until it fits;
    the last attempt then lists every change it needed."""
    limit = int(options.device_memory_gb * GiB)
    base = plan_run(cfg, options)
    groups = _candidates(cfg, base.setup)
    attempts: list[Attempt] = []

    def attempt(label: str, change: dict[str, Any], on: dict[str, Any]) -> Attempt | None:
        try:
            on_cfg = cfg.with_overrides(on, "plan") if on else cfg
            if not change:  # the max_pixels search
                return _largest_max_pixels(plan_run(on_cfg, options), on_cfg, options, limit)
            planned = plan_run(on_cfg.with_overrides(change, "plan"), options)
        except ConfigError:
            return None
        if planned.problems:
            return None
        return Attempt(label, change, planned.memory.total, planned.memory.total <= limit)

    for label, change in (option for group in groups for option in group):
        result = attempt(label, change, {})
        if result is not None:
            attempts.append(result)
            if result.fits:
                return attempts
    flat = cfg.to_flat_dict()
    stacked: dict[str, Any] = {}
    labels, combined = [], None
    for group in groups:
        results = [r for r in (attempt(label, change, stacked) for label, change in group) if r is not None]
        if not results:
            continue
        chosen = next((r for r in results if r.fits), results[-1])
        stacked |= chosen.overrides
        labels.append(chosen.change)
        combined = Attempt(" + ".join(labels), {k: v for k, v in stacked.items() if flat.get(k) != v},
                           chosen.total, chosen.fits)
        if chosen.fits:
            break
    return attempts + ([combined] if combined else [])
