"""`qwen2vl-ap plan`: will this run fit? Per-rank memory and per-step communication for a run config, before
launch — no model is built and no worker is started (the planning lives in autoparallel/planning/).

    qwen2vl-ap plan --config qwen2vl_2b_sft_auto [--key value ...] [--nproc_per_node N --nnodes M]
                    [--device_memory_gb 80] [--device gpu|cpu] [--image_size PX] [--images_per_sample 1]
                    [--supervised_fraction 0.25] [--reserve_gb 1]

Every run-config key works as in `sft`/`lora` (same sections, same override parsing); the planner options are
described in autoparallel/planning/setup.py. When the training data is there (`--meta_path M` or `--dataset A,B`),
the plan reads its length table (measured now when missing, as `sft`'s parent does): the longest sample, the most
images per sample and the largest image replace max_seq_length, --images_per_sample and --image_size unless those
options are given.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

from autoparallel.config import ConfigError, RunConfig
from autoparallel.planning.communication import communication
from autoparallel.planning.fit import Attempt
from autoparallel.planning.fit import advise as advise_run
from autoparallel.planning.memory import GiB
from autoparallel.planning.render import gib, render_report
from autoparallel.planning.setup import PlanOptions, Planned, plan_run
from launch.config import launch_defaults, load_run_config, parse_overrides, read_yaml, resolve_config_path
from launch.launcher import split_launch_options


def _command(config: str | None, overrides: dict[str, Any]) -> str:
    """lora when the config (or the command line) sets LoRA keys, else sft."""
    keys = set(overrides)
    if config:
        keys |= set(read_yaml(resolve_config_path(config)))
    return "lora" if any(k == "lora" or k.startswith("lora_") for k in keys) else "sft"


def load(config: str | None, overrides: dict[str, Any]) -> RunConfig:
    return load_run_config(_command(config, overrides), config, overrides)


def build(config: str | None, overrides: dict[str, Any], options: PlanOptions) -> Planned:
    """The run config (file or preset, then `overrides`) planned."""
    return plan_run(load(config, overrides), options)


def advise(config: str | None, overrides: dict[str, Any], options: PlanOptions) -> list[Attempt]:
    return advise_run(load(config, overrides), options)


def data_options(cfg: RunConfig, options: PlanOptions, given: set[str]) -> tuple[PlanOptions, Optional[str]]:
    """`options` with the training data's profile (survey.DataProfile; the options in `given` win) and its line;
    unchanged when the data is not there (a preset's own paths)."""
    if not (cfg.data.dataset or (cfg.data.meta_path and os.path.isfile(cfg.data.meta_path))):
        return options, None
    from autoparallel.data.dataset import SFTDataset
    from autoparallel.data.records import DataError
    from autoparallel.data.survey import data_profile
    from autoparallel.engine.trainer import build_processor_for
    from network.hub import ModelNotFoundError
    from network.processor import Qwen2VLProcessor

    try:
        processor = build_processor_for(cfg)
    except ModelNotFoundError:  # a Hub id planned with its preset's shapes: the embedded tokenizer's lengths
        processor = Qwen2VLProcessor.from_pretrained(None)
    try:
        dataset = SFTDataset(cfg.data, processor)
        dataset.index_lengths()
        profile = data_profile(dataset)
    except DataError as exc:
        raise ConfigError(f"plan: {exc}") from None
    return dataclasses.replace(options, **profile.plan_options(given)), profile.note()


def plan_main(argv: list[str]) -> int:
    launch, config, rest = split_launch_options(argv)
    overrides: dict[str, Any] = parse_overrides(rest)
    fields = {f.name for f in dataclasses.fields(PlanOptions)} - {"image_hw", "longest_sample"}  # from the data
    values = {k: overrides.pop(k) for k in list(overrides) if k in fields}
    if "data_parallel_degree" not in overrides:  # as `sft`: the file's process count, dp derived from it
        launch = {**launch_defaults(_command(config, overrides), config), **launch}
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
    cfg = load(config, overrides)
    # A path given on the command line must exist (the plan would describe data that is not there); a preset's
    # own paths (PaddleMIX's meta files) are planned from their shapes alone, as the plan reads no data.
    for key, path in (("meta_path", cfg.data.meta_path), ("eval_meta_path", cfg.train.eval_meta_path)):
        if key in overrides and path is not None and not os.path.isfile(path):
            raise ConfigError(f"{key}={path!r}: file not found")
    options, note = data_options(cfg, options, set(values))
    if note:
        print(note)
    planned = plan_run(cfg, options)
    collectives = communication(planned.setup, cpu=options.device == "cpu", stage=planned.memory.stage)
    print(render_report(planned, collectives, options))
    if planned.problems:
        return 2
    if not planned.memory.fits(int(options.device_memory_gb * GiB)):
        attempts = advise_run(cfg, options)
        print("\nwhat would make it fit (re-planned with each change, in order):")
        for a in attempts:
            flags = " ".join(f"--{k} {str(v).lower() if isinstance(v, bool) else v}" for k, v in a.overrides.items())
            print(f"  {'FITS' if a.fits else 'no  '}  {a.change:60} total {gib(a.total)}   {flags}")
        if not any(a.fits for a in attempts):
            print("  nothing tried fits: more devices, or a smaller model")
    return 0
