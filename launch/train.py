"""`qwen2vl-ap sft|lora` in the parent process: validate and write the run config (launch/prepare.py), then start
one worker per device (launch/worker.py -> the engine's Trainer).

The console stays quiet: the launcher's output goes to `log_dir/launcher.log`, rank 0's log lines and progress
bar are relayed from it, and a failure ends with one line saying why (a worker's error line, or the rank a signal
killed). `--verbose` relays everything, tracebacks included."""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from launch.launcher import ERROR_DIR_ENV, ConsoleRelay, WorkerLaunch, describe_failure, split_launch_options
from launch.prepare import node_count, prepare_run
from network.log import logger

WORKER = Path(__file__).with_name("worker.py")
LAUNCHER_LOG = "launcher.log"


def node_log_dir(output_dir: Path, launch: dict[str, str]) -> Path:
    """`output_dir/logs`, or `logs/node{rank}` on several nodes: the launcher names worker logs by local rank, so
    nodes sharing output_dir would otherwise write into the same `workerlog.0`."""
    if node_count(launch) <= 1 and int(launch.get("nnodes", "1").split(":")[-1]) <= 1:
        return output_dir / "logs"
    return output_dir / "logs" / f"node{launch.get('rank', f'-{socket.gethostname()}-{os.getpid()}')}"


def launch_training(command: str, argv: list[str]) -> tuple[int, str]:
    """Validate and write the run config, start the workers; returns (exit code, output_dir)."""
    verbose = "--verbose" in argv
    launch, config, overrides = split_launch_options([a for a in argv if a != "--verbose"])
    run_config_path, nproc, output_dir = prepare_run(command, config, overrides, launch)
    launch.pop("nproc_per_node", None)
    logger.info("starting %s workers for %s (output_dir=%s)", nproc, command, output_dir)
    log_dir = Path(launch.pop("log_dir", None) or node_log_dir(Path(output_dir), launch)).resolve()
    log_dir.mkdir(parents=True, exist_ok=True)
    for stale in log_dir.glob("error.rank*"):  # a previous run's failure must not be reported for this one
        stale.unlink()
    launcher_log = log_dir / LAUNCHER_LOG
    job = WorkerLaunch(WORKER, [command, str(run_config_path)], nproc, log_dir, launch,
                       env={ERROR_DIR_ENV: str(log_dir)})
    relay = ConsoleRelay(launcher_log, verbose)
    with open(launcher_log, "w") as sink:
        code = job.run(stdout=sink, poll=relay)
    relay.close()
    if code != 0:
        reason = describe_failure(log_dir, launcher_log.read_text(errors="replace"), code)
        print(f"qwen2vl-ap {command}: error: {reason} (worker logs: {log_dir})", file=sys.stderr)
        if any(log_dir.glob("error.rank*")):
            # A worker reported its error; the launcher's own code is that of whichever rank it stopped last.
            code = 1
    return code, output_dir
