"""A training run's configuration: the sections, their cross-checks, and the parent-process preparation that
happens before any worker starts (so a bad config fails fast with exit code 2 and no process left behind)."""
from __future__ import annotations

import os
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from autoparallel.args import ModelArgs, TrainingArgs
from autoparallel.checkpoint import check_writable, resolve_resume_path, CheckpointError
from autoparallel.data.config import DataConfig
from autoparallel.data.records import DataError, load_meta
from autoparallel.mesh import DegreeError, ParallelDegrees, validate_degrees
from launch.config import ConfigError, RunConfig, load_run_config
from network.config import PRESETS, Qwen2VLConfig

DEFAULT_CONFIGS = {"sft": "tiny_sft", "lora": "tiny_lora"}
RUN_CONFIG_FILE = "run_config.yaml"


@dataclass
class ParallelArgs:
    data_parallel_degree: int = 1
    tensor_parallel_degree: int = 1
    sharding_parallel_degree: int = 1
    pipeline_parallel_degree: int = 1
    sharding: str = ""  # PaddleMIX's --sharding: "", "stage1", "stage2" or "stage3"
    sequence_parallel: bool = False  # decoder activations sequence-sharded inside the mp group
    # Decoder layers per pipeline stage (empty: balanced by the cost model in placements/).
    layers_per_stage: list[int] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        if self.sharding not in ("", "stage1", "stage2", "stage3"):
            raise ValueError(f"sharding={self.sharding!r} must be one of stage1, stage2, stage3 (or empty)")
        if self.sequence_parallel and self.tensor_parallel_degree < 2:
            raise ValueError("sequence_parallel=true needs tensor_parallel_degree > 1 (it shards within the mp group)")
        if self.sequence_parallel and self.pipeline_parallel_degree > 1:
            raise ValueError("sequence_parallel=true with pipeline_parallel_degree > 1 is not supported yet")

    def degrees(self) -> ParallelDegrees:
        return ParallelDegrees(
            data_parallel_degree=self.data_parallel_degree,
            tensor_parallel_degree=self.tensor_parallel_degree,
            sharding_parallel_degree=self.sharding_parallel_degree,
            sharding_stage=int(self.sharding[-1]) if self.sharding else 0,
            pipeline_parallel_degree=self.pipeline_parallel_degree,
            sequence_parallel=self.sequence_parallel,
        )


def section_classes(command: str) -> dict[str, type]:
    sections: dict[str, type] = {"model": ModelArgs, "data": DataConfig, "train": TrainingArgs,
                                 "parallel": ParallelArgs}
    if command == "lora":
        from autoparallel.lora import LoraArgs

        sections["lora"] = LoraArgs
    return sections


def model_config(model_name_or_path: str) -> Qwen2VLConfig:
    """A preset name, or a local directory holding config.json (nothing is downloaded)."""
    if model_name_or_path in PRESETS:
        return Qwen2VLConfig.preset(model_name_or_path)
    path = Path(model_name_or_path)
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"model_name_or_path={model_name_or_path!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a "
            "local directory with config.json (models are never downloaded: copy the checkpoint locally)")
    return Qwen2VLConfig.from_pretrained(str(path))


def validate(cfg: RunConfig, world_size: Optional[int]) -> Qwen2VLConfig:
    """Cross-section checks: degrees vs world size and model shape, data and resume paths."""
    config = model_config(cfg.model_name_or_path)
    try:
        validate_degrees(cfg.parallel.degrees(), config, world_size, allow_pipeline=True,
                         per_device_batch_size=cfg.per_device_train_batch_size,
                         gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                         global_batch_size=cfg.global_batch_size)
    except DegreeError as exc:
        raise ConfigError(str(exc)) from None
    if cfg.meta_path is None and cfg.synthetic_data_dir is None:
        raise ConfigError("meta_path is not set (or set synthetic_data_dir for the generated demo dataset)")
    for key in ("meta_path", "eval_meta_path"):
        value = getattr(cfg, key)
        if value is None:
            continue
        if not Path(value).is_file():
            raise ConfigError(f"{key}={value!r}: file not found")
        try:  # the meta file and the annotation/root paths it names (cheap: annotations are not parsed here)
            load_meta(value)
        except DataError as exc:
            raise ConfigError(f"{key}: {exc}") from None
    if cfg.pipeline_parallel_degree > 1 and cfg.evaluation_strategy != "no":
        raise ConfigError("evaluation with pipeline_parallel_degree > 1 is not supported yet: "
                          "set evaluation_strategy: no (or evaluate the merged model with qwen2vl-ap infer)")
    if cfg.pipeline_parallel_degree > 1 and "lora" in cfg.sections:
        raise ConfigError("LoRA with pipeline_parallel_degree > 1 is not supported yet")
    if cfg.evaluation_strategy == "steps" and cfg.eval_steps <= 0:
        raise ConfigError("evaluation_strategy=steps needs eval_steps > 0")
    return config


def _ensure_synthetic_data(cfg: RunConfig) -> None:
    """The demo dataset is generated on first use and referenced from the config."""
    if cfg.meta_path is not None or cfg.synthetic_data_dir is None:
        return
    from autoparallel.data.synthetic import eval_meta_path, make_synthetic_dataset

    cfg.data.meta_path = str(make_synthetic_dataset(cfg.synthetic_data_dir))
    if cfg.evaluation_strategy != "no" and cfg.eval_meta_path is None:
        cfg.train.eval_meta_path = str(eval_meta_path(cfg.synthetic_data_dir))


def check_launch_options(launch: dict[str, str]) -> None:
    """Launcher options are checked here too, so a typo fails before paddle.distributed.launch waits for peers."""
    problems = []
    for key in ("nproc_per_node", "rank"):
        if key in launch and not launch[key].isdigit():
            problems.append(f"--{key} {launch[key]!r} must be a non-negative integer")
    if launch.get("nproc_per_node") == "0":
        problems.append("--nproc_per_node must be >= 1")
    nnodes = launch.get("nnodes", "1")
    parts = nnodes.split(":")
    if len(parts) > 2 or not all(part.isdigit() and int(part) >= 1 for part in parts):
        problems.append(f"--nnodes {nnodes!r} must be N or MIN:MAX with N >= 1")
    else:
        max_nodes = int(parts[-1])
        if launch.get("rank", "").isdigit() and int(launch["rank"]) >= max_nodes:
            problems.append(f"--rank {launch['rank']} must be < --nnodes {nnodes}")
        if max_nodes > 1 and "master" not in launch:
            problems.append(f"--nnodes {nnodes} needs --master HOST:PORT (an address of node 0 every node reaches)")
    master = launch.get("master")
    if master is not None:
        host, _, port = master.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            problems.append(f"--master {master!r} must be HOST:PORT")
    if problems:
        raise ConfigError("; ".join(problems))


def load(command: str, config: Optional[str], overrides: dict[str, Any]) -> RunConfig:
    return load_run_config(section_classes(command), config, overrides, DEFAULT_CONFIGS[command])


def prepare_run(command: str, config: Optional[str], argv_overrides: list[str],
                launch: dict[str, str]) -> tuple[Path, int, str]:
    """Parent side of `qwen2vl-ap sft|lora`: resolve, validate and write the run config.

    Returns (run config path, processes per node, output_dir)."""
    from launch.config import parse_overrides

    cfg = load(command, config, parse_overrides(argv_overrides))
    check_launch_options(launch)
    nnodes = int(launch.get("nnodes", "1").split(":")[0])
    degrees = cfg.parallel.degrees()
    nproc = int(launch.get("nproc_per_node", max(1, degrees.world_size // nnodes)))
    _ensure_synthetic_data(cfg)
    validate(cfg, nproc * nnodes)
    try:
        check_writable(cfg.output_dir)
        resolve_resume_path(cfg.resume_from_checkpoint, cfg.output_dir)
    except CheckpointError as exc:
        raise ConfigError(str(exc)) from None
    path = Path(cfg.output_dir) / RUN_CONFIG_FILE
    # Atomic: on several nodes sharing output_dir, every node's parent writes this file while workers read it.
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    cfg.save_yaml(tmp)
    os.replace(tmp, path)
    return path, nproc, cfg.output_dir


def load_resolved(command: str, path: str) -> RunConfig:
    """Worker side: the config the parent resolved (no further defaults applied)."""
    return load(command, path, {})
