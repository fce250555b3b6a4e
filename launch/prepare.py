"""Parent side of `qwen2vl-ap sft|lora`: cross-section checks and the preparation that happens before any worker
starts (so a bad config fails fast with exit code 2 and no process left behind)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from autoparallel.config import RUN_CONFIG_FILE, ConfigError, RunConfig, model_config
from autoparallel.data.dataset import SFTDataset
from autoparallel.data.records import DataError, RecordStore
from autoparallel.data.survey import survey
from autoparallel.engine.checkpoint import check_writable, resolve_resume_path
from autoparallel.engine.trainer import build_processor_for
from autoparallel.engine.training_eval import evaluation_problem
from launch.config import launch_defaults, load_run_config, parse_overrides
from network.config import Qwen2VLConfig
from network.formats import CheckpointError
from network.log import logger
from placements.degrees import DegreeError, validate_degrees
from placements.qwen2_vl import trainable_problem


def validate(cfg: RunConfig, world_size: Optional[int]) -> Qwen2VLConfig:
    """Cross-section checks: degrees vs world size and model shape, data and resume paths."""
    config = model_config(cfg.model.model_name_or_path)
    try:
        validate_degrees(cfg.parallel.degrees(), config, world_size, allow_pipeline=True,
                         per_device_batch_size=cfg.train.per_device_train_batch_size,
                         gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
                         global_batch_size=cfg.train.global_batch_size)
    except DegreeError as exc:
        raise ConfigError(str(exc)) from None
    problem = trainable_problem(config, cfg.model.trainable())
    if problem:
        raise ConfigError(problem)
    if cfg.data.meta_path is None and not cfg.data.dataset and cfg.data.synthetic_data_dir is None:
        raise ConfigError("meta_path is not set (or dataset, or synthetic_data_dir for the generated demo dataset)")
    train_key = "meta_path" if cfg.data.meta_path is not None else "dataset"
    for key, value in ((train_key, cfg.data.meta_path), ("eval_meta_path", cfg.train.eval_meta_path)):
        if value is None and (key != "dataset" or not cfg.data.dataset):
            continue
        if value is not None and not Path(value).is_file():
            raise ConfigError(f"{key}={value!r}: file not found")
        try:
            check_records(cfg, value, train=key != "eval_meta_path")
        except DataError as exc:
            raise ConfigError(f"{key}: {exc}") from None
    if cfg.parallel.pipeline_parallel_degree > 1 and cfg.train.evaluation_strategy != "no":
        raise ConfigError("evaluation with pipeline_parallel_degree > 1 is not supported yet: "
                          "set evaluation_strategy: no (or evaluate the merged model with qwen2vl-ap infer)")
    if cfg.parallel.pipeline_parallel_degree > 1 and cfg.uses_lora:
        raise ConfigError("LoRA with pipeline_parallel_degree > 1 is not supported yet")
    if cfg.parallel.pipeline_parallel_degree > 1 and not cfg.model.freeze_vit:
        raise ConfigError("freeze_vit: false with pipeline_parallel_degree > 1 is not supported yet (not tested): "
                          "train the ViT with dp/mp/sharding layouts")
    if cfg.data.packing and cfg.parallel.sequence_parallel:
        raise ConfigError("packing with sequence_parallel is not supported yet (packed rows are not tested with "
                          "sequence-sharded activations): drop one of them")
    if cfg.train.evaluation_strategy == "steps" and cfg.train.eval_steps <= 0:
        raise ConfigError("evaluation_strategy=steps needs eval_steps > 0")
    problem = evaluation_problem(cfg)
    if problem:
        raise ConfigError(problem)
    return config


def check_records(cfg: RunConfig, meta_path: Optional[str], train: bool) -> None:
    """What is cheap to find before workers start: the meta and annotation files parse, every record is valid
    (placeholder counts, roles, JSON) and its media files exist (RecordStore, once per file content), the
    training set fills one global batch, and every sample's length against max_seq_length (with readable media
    headers), measured once per content and setting into the length table the ranks then plan from. Decoding media stays with the workers (their errors are relayed as one line too). With
    skip_bad_samples, bad records are skipped and counted instead."""
    skip = cfg.data.skip_bad_samples
    store = RecordStore(meta_path, cfg.data.data_seed, skip_bad=skip, dataset=cfg.data.dataset if train else None,
                        dataset_dir=cfg.data.dataset_dir, val_size=cfg.data.val_size if train else 0.0)
    if store.missing_media and not skip:
        raise store.missing_media[0]
    warning = store.unread_keys_warning()
    if warning:
        logger.warning("%s", warning)
    if store.own_system and any("system_prompt" in layer for _, layer in cfg.sources):
        logger.warning("%s: %d of %d records carry their own system prompt, which replaces system_prompt for them",
                       store.meta_path, store.own_system, store.num_records)
    # Lengths need the tokenizer: measured here, "every sample is too long" (a preset's max_seq_length with
    # videos) is one line instead of an error inside the workers.
    dataset = SFTDataset(cfg.data, build_processor_for(cfg), meta_path=meta_path, records=store)
    dataset.index_lengths()
    found = survey(dataset)
    if found.errors and not skip:
        raise found.errors[0]
    problem = found.too_long_problem()
    if problem:
        raise DataError(store.meta_path, None, problem, kind="too long")
    warning = found.too_long_warning()
    if warning:
        logger.warning("%s: %s", store.meta_path, warning)
    per_device = cfg.train.per_device_train_batch_size if train else cfg.train.per_device_eval_batch_size
    dp = cfg.parallel.degrees().dp
    if train and len(store) < per_device * dp:
        raise DataError(store.meta_path, None, f"the dataset has {len(store)} samples, fewer than one global batch of "
                                         f"{per_device * dp} (per_device_train_batch_size {per_device} x {dp} "
                                         "data-parallel ranks)", kind="too small")
    held, evaluated = len(store.held_out_ids), cfg.train.per_device_eval_batch_size * dp
    if train and held and cfg.train.evaluation_strategy != "no" and held < evaluated:
        raise DataError(store.meta_path, None, f"val_size={cfg.data.val_size:g} holds out {held} records, fewer than "
                                         f"one evaluation batch of {evaluated} (per_device_eval_batch_size "
                                         f"{cfg.train.per_device_eval_batch_size} x {dp} data-parallel ranks)",
                        kind="too small")


def _ensure_synthetic_data(cfg: RunConfig) -> None:
    """The demo dataset is generated on first use and referenced from the config."""
    if cfg.data.meta_path is not None or cfg.data.dataset or cfg.data.synthetic_data_dir is None:
        return
    from autoparallel.data.synthetic import eval_meta_path, make_synthetic_dataset

    cfg.data.meta_path = str(make_synthetic_dataset(cfg.data.synthetic_data_dir))
    if cfg.train.evaluation_strategy != "no" and cfg.train.eval_meta_path is None and not cfg.data.val_size:
        cfg.train.eval_meta_path = str(eval_meta_path(cfg.data.synthetic_data_dir))


def check_launch_options(launch: dict[str, str]) -> None:
    """Launcher options are checked here too, so a typo fails before paddle.distributed.launch waits for peers."""
    problems = []
    if launch.get("run_mode", "collective") != "collective":
        problems.append(f"--run_mode {launch['run_mode']!r} is not supported (only collective)")
    devices = launch.get("devices")
    if devices is not None and not all(d.strip() for d in devices.split(",")):
        problems.append(f"--devices {devices!r} must be a comma-separated list of device ids")
    nproc = launch.get("nproc_per_node", "")
    if devices is not None and nproc.isdigit() and int(nproc) != len(devices.split(",")):
        problems.append(f"--nproc_per_node {nproc} disagrees with --devices {devices!r}")
    for key in ("nproc_per_node", "rank"):
        if key in launch and not launch[key].isdigit():
            problems.append(f"--{key} {launch[key]!r} must be a non-negative integer")
    if launch.get("nproc_per_node") == "0":
        problems.append("--nproc_per_node must be >= 1")
    nnodes = launch.get("nnodes", str(len(launch["ips"].split(","))) if "ips" in launch else "1")
    parts = nnodes.split(":")
    if len(parts) > 2 or not all(part.isdigit() and int(part) >= 1 for part in parts):
        problems.append(f"--nnodes {nnodes!r} must be N or MIN:MAX with N >= 1")
    else:
        max_nodes = int(parts[-1])
        if launch.get("rank", "").isdigit() and int(launch["rank"]) >= max_nodes:
            problems.append(f"--rank {launch['rank']} must be < --nnodes {nnodes}")
        if max_nodes > 1 and "master" not in launch and "ips" not in launch:
            problems.append(f"--nnodes {nnodes} needs --master HOST:PORT (an address of node 0 every node reaches)")
        if "ips" in launch and len(launch["ips"].split(",")) != max_nodes:
            problems.append(f"--ips {launch['ips']!r} lists {len(launch['ips'].split(','))} nodes but --nnodes is "
                            f"{nnodes}")
    master = launch.get("master")
    if master is not None:
        host, _, port = master.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            problems.append(f"--master {master!r} must be HOST:PORT")
    if problems:
        raise ConfigError("; ".join(problems))


def node_count(launch: dict[str, str]) -> int:
    """Nodes of the job: --nnodes (its minimum when elastic), else the length of --ips, else 1."""
    if "nnodes" in launch:
        return int(launch["nnodes"].split(":")[0])
    return len(launch["ips"].split(",")) if "ips" in launch else 1


def prepare_run(command: str, config: Optional[str], argv_overrides: list[str],
                launch: dict[str, str]) -> tuple[Path, int, str]:
    """Parent side of `qwen2vl-ap sft|lora`: resolve, validate and write the run config.

    Returns (run config path, processes per node, output_dir)."""
    cfg = load_run_config(command, config, parse_overrides(argv_overrides))
    if cfg.parallel.data_parallel_degree is None:  # the file's process count, from which dp is derived
        launch = {**launch_defaults(command, config), **launch}
    check_launch_options(launch)
    notice = cfg.compatibility_notice()
    if notice:
        logger.info("%s", notice)
    nnodes = node_count(launch)
    if "nproc_per_node" in launch:
        nproc = int(launch["nproc_per_node"])
    elif "devices" in launch:
        nproc = len(launch["devices"].split(","))
    else:
        nproc = max(1, cfg.parallel.degrees().world_size // nnodes)
    try:
        cfg.parallel.resolve_data_parallel(nproc * nnodes)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    _ensure_synthetic_data(cfg)
    validate(cfg, nproc * nnodes)
    d, train = cfg.parallel.degrees(), cfg.train
    stage = f" (sharding stage{d.sharding_stage})" if d.sharding_stage else ""
    logger.info("%s%s: %s on %d processes = dp %d%s x mp %d x pp %d; global batch %d = %d per device x %d "
                "accumulation x %d", command, " (LoRA)" if cfg.uses_lora else "", cfg.model.model_name_or_path,
                d.world_size, d.dp, stage, d.mp, d.pipeline_parallel_degree,
                train.per_device_train_batch_size * train.gradient_accumulation_steps * d.dp,
                train.per_device_train_batch_size, train.gradient_accumulation_steps, d.dp)
    try:
        check_writable(cfg.train.output_dir)
        resolve_resume_path(cfg.train.resume_from_checkpoint, cfg.train.output_dir)
    except CheckpointError as exc:
        raise ConfigError(str(exc)) from None
    path = Path(cfg.train.output_dir) / RUN_CONFIG_FILE
    # Atomic: on several nodes sharing output_dir, every node's parent writes this file while workers read it.
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    cfg.save_yaml(tmp)
    os.replace(tmp, path)
    return path, nproc, cfg.train.output_dir

