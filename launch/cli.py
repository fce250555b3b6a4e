"""`qwen2vl-ap`: the one command line. Training commands validate the config here, in the parent process,
then start one worker per device with `paddle.distributed.launch` (so the same command scales to several
nodes with `--nnodes/--master/--rank`)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Callable

from network.log import logger, setup_logging

# Options consumed by paddle.distributed.launch rather than by the run config.
LAUNCH_OPTIONS = ("nproc_per_node", "nnodes", "master", "rank", "log_dir", "job_id")

USAGE = """usage: qwen2vl-ap COMMAND [--config FILE|PRESET] [--key value ...]

training (started on every device with paddle.distributed.launch):
  sft         full fine-tuning (no arguments: the tiny CPU demo on 2 processes)
  lora        LoRA fine-tuning (no arguments: the tiny CPU LoRA demo)
  demo        sft on the tiny default, merge the checkpoint, answer held-out questions (accuracy before/after)

planning:
  plan        will it fit? per-rank memory and communication for a config, without starting workers

inference:
  infer       answer prompts with images/videos (single, batch JSONL, --tensor_parallel_degree N)

checkpoints:
  merge-ckpt  merge a distributed checkpoint into one model directory (streaming, bounded memory)
  merge-lora  fold LoRA adapters into the base weights (paddlenlp adapter files or a LoRA checkpoint)
  convert     HF safetensors <-> PaddleMIX model_state.pdparams
  inspect     tensors, shapes, slices per rank and completeness of a checkpoint or model directory

launch options (passed to paddle.distributed.launch): --nproc_per_node N --nnodes M --master HOST:PORT --rank R
Any config key can be overridden: --learning_rate 1e-5 --tensor_parallel_degree 2 ...
"""


def split_launch_options(argv: list[str]) -> tuple[dict[str, str], str | None, list[str]]:
    """Separate launcher options and `--config` from config overrides."""
    launch: dict[str, str] = {}
    config = None
    rest: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        key, _, inline = token[2:].partition("=") if token.startswith("--") else ("", "", "")
        key = key.replace("-", "_")
        if key in LAUNCH_OPTIONS or key == "config":
            if inline:
                value = inline
            elif i + 1 < len(argv):
                value = argv[i + 1]
                i += 1
            else:
                raise SystemExit(f"qwen2vl-ap: --{key} needs a value")
            if key == "config":
                config = value
            else:
                launch[key] = value
        else:
            rest.append(token)
        i += 1
    return launch, config, rest


def run_workers(command: str, run_config_path: Path, launch: dict[str, str], nproc: int, log_dir: Path) -> int:
    """Start the workers and wait; Ctrl-C or a failure stops the whole process group."""
    args = [sys.executable, "-m", "paddle.distributed.launch", "--log_dir", str(log_dir)]
    launch.setdefault("nproc_per_node", str(nproc))
    for key, value in launch.items():
        args += [f"--{key}", value]
    args += [str(Path(__file__).with_name("worker.py")), command, str(run_config_path)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                     env.get("PYTHONPATH")]))
    proc = subprocess.Popen(args, env=env, start_new_session=True)
    # A scheduler stopping this command (SIGTERM) must stop the workers too: they live in the launcher's session.
    previous = signal.signal(signal.SIGTERM, lambda signum, _: os.killpg(proc.pid, signum))
    try:
        return proc.wait()
    except KeyboardInterrupt:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def node_log_dir(output_dir: Path, launch: dict[str, str]) -> Path:
    """`output_dir/logs`, or `logs/node{rank}` on several nodes: the launcher names worker logs by local rank, so
    nodes sharing output_dir would otherwise write into the same `workerlog.0`."""
    if int(launch.get("nnodes", "1").split(":")[-1]) <= 1:
        return output_dir / "logs"
    return output_dir / "logs" / f"node{launch.get('rank', f'-{socket.gethostname()}-{os.getpid()}')}"


def launch_training(command: str, argv: list[str]) -> tuple[int, str]:
    """Validate and write the run config, start the workers; returns (exit code, output_dir)."""
    from autoparallel.run_config import prepare_run

    launch, config, overrides = split_launch_options(argv)
    run_config_path, nproc, output_dir = prepare_run(command, config, overrides, launch)
    logger.info("starting %s workers for %s (output_dir=%s)", launch.get("nproc_per_node", nproc), command,
                output_dir)
    log_dir = Path(launch.pop("log_dir", None) or node_log_dir(Path(output_dir), launch))
    code = run_workers(command, run_config_path, launch, nproc, log_dir)
    if code != 0:
        logger.error("%s failed (exit code %d); worker logs: %s", command, code, log_dir)
    return code, output_dir


def _ckpt_tool(name: str) -> Callable[[list[str]], int]:
    def run(argv: list[str]) -> int:
        from ckpt_tools import cli

        return getattr(cli, name)(argv)

    return run


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "plan": lambda argv: __import__("launch.plan", fromlist=["plan_main"]).plan_main(argv),
    "infer": lambda argv: __import__("launch.infer", fromlist=["infer_main"]).infer_main(argv),
    "merge-ckpt": _ckpt_tool("merge_ckpt_main"),
    "merge-lora": _ckpt_tool("merge_lora_main"),
    "convert": _ckpt_tool("convert_main"),
    "inspect": _ckpt_tool("inspect_main"),
    "sft": lambda argv: launch_training("sft", argv)[0],
    "lora": lambda argv: launch_training("lora", argv)[0],
    "demo": lambda argv: __import__("launch.demo", fromlist=["demo_main"]).demo_main(argv),
}


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    from autoparallel.cpu_compat import prefer_mkl_avx2

    prefer_mkl_avx2()  # before any matmul of this process; workers inherit it
    if command not in COMMANDS:
        print(f"qwen2vl-ap: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    from launch.config import ConfigError

    try:
        return COMMANDS[command](rest)
    except ConfigError as exc:
        print(f"qwen2vl-ap {command}: config error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
