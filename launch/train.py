"""`qwen2vl-ap sft|lora` in the parent process: validate and write the run config (launch/prepare.py), then start
one worker per device (launch/worker.py -> the engine's Trainer)."""
from __future__ import annotations

import os
import socket
from pathlib import Path

from launch.launcher import WorkerLaunch, split_launch_options
from launch.prepare import prepare_run
from network.log import logger

WORKER = Path(__file__).with_name("worker.py")


def node_log_dir(output_dir: Path, launch: dict[str, str]) -> Path:
    """`output_dir/logs`, or `logs/node{rank}` on several nodes: the launcher names worker logs by local rank, so
    nodes sharing output_dir would otherwise write into the same `workerlog.0`."""
    if int(launch.get("nnodes", "1").split(":")[-1]) <= 1:
        return output_dir / "logs"
    return output_dir / "logs" / f"node{launch.get('rank', f'-{socket.gethostname()}-{os.getpid()}')}"


def launch_training(command: str, argv: list[str]) -> tuple[int, str]:
    """Validate and write the run config, start the workers; returns (exit code, output_dir)."""
    launch, config, overrides = split_launch_options(argv)
    run_config_path, nproc, output_dir = prepare_run(command, config, overrides, launch)
    nproc = int(launch.pop("nproc_per_node", nproc))
    logger.info("starting %s workers for %s (output_dir=%s)", nproc, command, output_dir)
    log_dir = Path(launch.pop("log_dir", None) or node_log_dir(Path(output_dir), launch))
    code = WorkerLaunch(WORKER, [command, str(run_config_path)], nproc, log_dir, launch).run()
    if code != 0:
        logger.error("%s failed (exit code %d); worker logs: %s", command, code, log_dir)
    return code, output_dir
