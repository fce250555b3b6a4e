"""`qwen2vl-ap`: the one command line. Training commands validate the config in the parent process, then start
one worker per device with `paddle.distributed.launch` (launch/train.py, launch/launcher.py), so the same
command scales to several nodes with `--nnodes/--master/--rank`."""
from __future__ import annotations

import sys
import warnings
from typing import Callable

from network.log import setup_logging

USAGE = """usage: qwen2vl-ap COMMAND [--config FILE|PRESET] [--key value ...]

training (started on every device with paddle.distributed.launch):
  sft         full fine-tuning (no arguments: the tiny CPU demo on 2 processes)
  lora        LoRA fine-tuning (no arguments: the tiny CPU LoRA demo)
  demo        sft on the tiny default, merge the checkpoint, answer held-out questions (accuracy before/after)

planning:
  plan        will it fit? per-rank memory and communication for a config, without starting workers

inference:
  infer       answer prompts with images/videos (single, batch JSONL, --tensor_parallel_degree N)
  serve       OpenAI-compatible server: /v1/chat/completions (stream, images, videos), batching, --lora
  eval        generate answers for a dataset and score them (exact_match, anls, bleu, ...), --nproc_per_node N

checkpoints:
  merge-ckpt  merge a distributed checkpoint into one model directory (streaming, bounded memory)
  merge-lora  fold LoRA adapters into the base weights (paddlenlp adapter files or a LoRA checkpoint)
  convert     HF safetensors <-> PaddleMIX model_state.pdparams
  inspect     tensors, shapes, slices per rank and completeness of a checkpoint or model directory

launch options (passed to paddle.distributed.launch): --nproc_per_node N --nnodes M --master HOST:PORT --rank R
Any config key can be overridden: --learning_rate 1e-5 --tensor_parallel_degree 2 ...
"""


def _ckpt_tool(name: str) -> Callable[[list[str]], int]:
    def run(argv: list[str]) -> int:
        from ckpt_tools import cli

        return getattr(cli, name)(argv)

    return run


# Each command imports its module when it runs, so `qwen2vl-ap merge-ckpt` never loads the engine.
def _plan(argv: list[str]) -> int:
    from launch.plan import plan_main

    return plan_main(argv)


def _infer(argv: list[str]) -> int:
    from launch.infer import infer_main

    return infer_main(argv)


def _serve(argv: list[str]) -> int:
    from launch.serve import serve_main

    return serve_main(argv)


def _eval(argv: list[str]) -> int:
    from launch.evaluate import eval_main

    return eval_main(argv)


def _demo(argv: list[str]) -> int:
    from launch.demo import demo_main

    return demo_main(argv)


def _training(command: str) -> Callable[[list[str]], int]:
    def run(argv: list[str]) -> int:
        from launch.train import launch_training

        return launch_training(command, argv)[0]

    return run


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "plan": _plan,
    "infer": _infer,
    "serve": _serve,
    "eval": _eval,
    "merge-ckpt": _ckpt_tool("merge_ckpt_main"),
    "merge-lora": _ckpt_tool("merge_lora_main"),
    "convert": _ckpt_tool("convert_main"),
    "inspect": _ckpt_tool("inspect_main"),
    "sft": _training("sft"),
    "lora": _training("lora"),
    "demo": _demo,
}


# Third-party warnings every run prints that say nothing about the user's run (workers keep them in their logs).
KNOWN_WARNINGS = ("No ccache found",)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    for message in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"qwen2vl-ap: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    from launch.launcher import simulate_gpu_if_requested

    simulate_gpu_if_requested()
    from autoparallel.config import ConfigError

    try:
        return COMMANDS[command](rest)
    except ConfigError as exc:
        print(f"qwen2vl-ap {command}: config error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
