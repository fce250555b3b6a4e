"""CLI handlers for `qwen2vl-ap merge-ckpt | merge-lora | convert | inspect` (registered by launch/cli.py).

Each returns a process exit code: 0 success, 1 bad or incomplete input (message logged), 2 usage error.
Logging is configured by the caller (`network.log.setup_logging`), as for every other subcommand.
"""
from __future__ import annotations

import argparse
import json
from typing import Callable

from network.formats import CheckpointError, FormatError
from network.log import logger

_INPUT_ERRORS = (CheckpointError, FormatError, FileNotFoundError, FileExistsError, ValueError)


def _size(text: str) -> int:
    """Bytes from '5GB', '500MB', '2GiB' or a plain integer."""
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}
    low = text.strip().lower()
    for unit, factor in units.items():
        if low.endswith(unit):
            return int(float(low[: -len(unit)]) * factor)
    return int(low)


def _run(argv: list[str], parser: argparse.ArgumentParser, body: Callable[[argparse.Namespace], int]) -> int:
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help / usage errors; callers want a code
        return int(exc.code or 0)
    try:
        return body(args)
    except _INPUT_ERRORS as exc:
        logger.error("%s", exc)
        return 1


_FORMAT_HELP = "safetensors: HF layout (transformers/vLLM); paddle: model_state.pdparams (PaddleMIX)"
_DTYPES = ["bf16", "fp16", "fp32", "bfloat16", "float16", "float32"]


def _add_output_options(p: argparse.ArgumentParser, dtype_default_help: str) -> None:
    """--out/--dtype/--shard_size/--no_progress: the options of every command that writes a model directory."""
    p.add_argument("--out", required=True, help="new output directory (must not exist or be empty)")
    p.add_argument("--dtype", choices=_DTYPES, default=None,
                   help=f"cast floating weights (default: {dtype_default_help})")
    p.add_argument("--shard_size", type=_size, default=None,
                   help="max bytes per weight file, e.g. 5GB (default: 5GB safetensors, one file paddle)")
    p.add_argument("--no_progress", action="store_true")


def _print_summary(summary: dict) -> int:
    print(json.dumps(summary, indent=2))
    return 0


def merge_ckpt_main(argv: list[str]) -> int:
    from ckpt_tools.merge import merge_dist_checkpoint

    p = argparse.ArgumentParser(prog="qwen2vl-ap merge-ckpt",
                                description="Merge a dist checkpoint into one model directory (streaming).")
    p.add_argument("--ckpt", required=True, help="checkpoint-N or checkpoint-N/dist_ckpt")
    p.add_argument("--format", choices=["safetensors", "paddle"], default="safetensors", help=_FORMAT_HELP)
    p.add_argument("--prefix", default=None, help="keep only keys under 'PREFIX.' and strip it")
    p.add_argument("--include_optimizer", action="store_true", help="also write optimizer states")
    _add_output_options(p, "as saved")

    def body(a: argparse.Namespace) -> int:
        return _print_summary(merge_dist_checkpoint(a.ckpt, a.out, a.format, a.dtype, a.prefix, a.include_optimizer,
                                                    a.shard_size, progress=not a.no_progress))

    return _run(argv, p, body)


def merge_lora_main(argv: list[str]) -> int:
    from ckpt_tools.lora_merge import merge_lora

    p = argparse.ArgumentParser(prog="qwen2vl-ap merge-lora",
                                description="Fold LoRA adapters into base weights: W + A @ B * scaling (streaming).")
    p.add_argument("--base", default=None,
                   help="base model directory (HF safetensors, model_state.pdparams, merge-ckpt output) or dist "
                        "checkpoint (default: the base a preset run's checkpoint-N holds, else the "
                        "base_model_name_or_path of the adapter's lora_config.json)")
    p.add_argument("--lora", required=True,
                   help="LoRA checkpoint-N (or its dist_ckpt) of `qwen2vl-ap lora`, or a directory with "
                        "lora_config.json + lora_model_state.pdparams (ours or paddlenlp's)")
    p.add_argument("--format", choices=["safetensors", "paddle"], default="safetensors", help=_FORMAT_HELP)
    _add_output_options(p, "the base dtype")

    def body(a: argparse.Namespace) -> int:
        return _print_summary(merge_lora(a.base, a.lora, a.out, a.format, a.dtype, a.shard_size,
                                         progress=not a.no_progress))

    return _run(argv, p, body)


def convert_main(argv: list[str]) -> int:
    from ckpt_tools.convert import convert

    p = argparse.ArgumentParser(prog="qwen2vl-ap convert",
                                description="Convert HF safetensors <-> PaddleMIX model_state.pdparams.")
    p.add_argument("--in", dest="in_dir", required=True, help="model directory")
    p.add_argument("--to", choices=["paddle", "safetensors"], required=True, help=_FORMAT_HELP)
    _add_output_options(p, "as stored")

    def body(a: argparse.Namespace) -> int:
        return _print_summary(convert(a.in_dir, a.out, a.to, a.dtype, a.shard_size, progress=not a.no_progress))

    return _run(argv, p, body)


def inspect_main(argv: list[str]) -> int:
    from ckpt_tools.inspect import inspect_path

    p = argparse.ArgumentParser(prog="qwen2vl-ap inspect",
                                description="List tensors/shapes/dtypes/slices and check completeness.")
    p.add_argument("path", help="checkpoint-N, checkpoint-N/dist_ckpt or a model directory")
    p.add_argument("--max_slices", type=int, default=8, help="slices listed per tensor")

    def body(a: argparse.Namespace) -> int:
        report = inspect_path(a.path)
        print(report.render(a.max_slices))
        return 0 if report.complete else 1

    return _run(argv, p, body)
