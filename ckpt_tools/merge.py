"""merge-ckpt: a dist checkpoint (any parallel layout) -> one model directory, one tensor in memory at a time.

Peak memory = the largest tensor (assembled in its saved dtype) + one 64 MiB conversion chunk + a fixed
overhead (Python, numpy and paddle imported by `network.weights` for its key table: ~0.4 GiB). Paddle's own
route (`load_merged_state_dict` + `paddle.save`) holds every rank file and the merged model at once.
"""
from __future__ import annotations

import math
import os
import time
from typing import Callable, Optional

import ml_dtypes
import numpy as np
from tqdm import tqdm

from ckpt_tools.distckpt import DIST_DIR, DistCheckpoint, resolve_dist_dir
from ckpt_tools.model_dir import atomic_output_dir, check_shapes, copy_model_files, expected_shapes
from network.formats import CheckpointError
from network.log import logger
from network.lora import LORA_SUFFIXES
from network.process_memory import peak_rss_bytes
from network.weights import SourceTensor, is_linear_weight
from network.writers import DEFAULT_SHARD_BYTES, PlannedTensor, ShardedWriter

DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16),
          "float32": np.dtype(np.float32)}
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
FORMATS = ("safetensors", "paddle")
_FLOAT_KINDS = {np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64), np.dtype(ml_dtypes.bfloat16)}


def normalize_dtype(dtype: Optional[str]) -> Optional[np.dtype]:
    if dtype is None:
        return None
    name = DTYPE_ALIASES.get(dtype, dtype)
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES) + sorted(DTYPE_ALIASES)}, got {dtype!r}")
    return DTYPES[name]


def plan_tensors(tensors: list[SourceTensor], fmt: str, dtype: Optional[np.dtype]) -> list[PlannedTensor]:
    """Output name/shape/dtype per tensor: HF layout for safetensors, Paddle layout for pdparams; floating
    tensors cast to `dtype` when given (integer tensors keep theirs)."""
    target = "hf" if fmt == "safetensors" else "paddle"
    plan = []
    for t in tensors:
        transpose = t.layout != target and is_linear_weight(t.name)
        out_dtype = dtype if dtype is not None and t.dtype in _FLOAT_KINDS else t.dtype
        plan.append(PlannedTensor(t.name, tuple(reversed(t.shape)) if transpose else t.shape, out_dtype, transpose))
    return plan


def export_tensors(tensors: list[SourceTensor], directory: str, fmt: str, stem: str, dtype: Optional[np.dtype],
                   shard_size: Optional[int], progress: bool, desc: str) -> tuple[list[str], int]:
    """Write `tensors` in order into `directory`; returns (files written, bytes written)."""
    plan = plan_tensors(tensors, fmt, dtype)
    if shard_size is None and fmt == "safetensors":
        shard_size = DEFAULT_SHARD_BYTES
    writer = ShardedWriter(directory, fmt, stem, plan, shard_size)
    try:
        with tqdm(total=writer.total_bytes, unit="B", unit_scale=True, desc=desc, disable=not progress) as bar:
            for t, p in zip(tensors, plan):
                array = t.read()
                writer.write(t.name, array)
                del array  # release before the next tensor is assembled
                bar.update(p.nbytes)
        return writer.finish(), writer.total_bytes
    finally:
        writer.abort()


def validate_against_config(tensors: list[SourceTensor], model_dir: str) -> None:
    expected = expected_shapes(model_dir)
    if expected is None:
        logger.warning("no config.json in %s: tensor shapes are not checked against the model", model_dir)
        return
    found = {t.name: t.paddle_shape for t in tensors}
    problems = check_shapes(found, expected, model_dir, {t.name: t.origin for t in tensors})
    if problems:
        raise CheckpointError("checkpoint does not match its config:\n  " + "\n  ".join(problems[:20]))
    extra = [n for n in found if n not in expected]
    if extra:
        logger.warning("%d tensors are not parameters of the configured model (kept): %s", len(extra), extra[:5])


def model_dir_of(ckpt: str) -> str:
    """Directory with config.json/tokenizer files: `checkpoint-N` for both accepted spellings."""
    dist_dir = resolve_dist_dir(ckpt)
    if os.path.basename(os.path.normpath(dist_dir)) == DIST_DIR:
        return os.path.dirname(os.path.normpath(dist_dir))
    return dist_dir


def merge_dist_checkpoint(ckpt: str, out: str, format: str = "safetensors", dtype: Optional[str] = None,
                          prefix: Optional[str] = None, include_optimizer: bool = False,
                          shard_size: Optional[int] = None, progress: bool = True) -> dict:
    """Merge `checkpoint-N` (or `checkpoint-N/dist_ckpt`) into the model directory `out`.

    format: "safetensors" (HF layout, `model.safetensors` or shards of `shard_size` bytes, default 5 GB, plus
    index) or "paddle" (`model_state.pdparams` in PaddleMIX layout; sharded with an index only when
    `shard_size` is given). dtype casts floating tensors (None keeps the saved dtype). prefix selects keys
    under `prefix.` and strips it. include_optimizer also writes optimizer states (saved dtype, Paddle
    layout, Paddle's names) to `optimizer.safetensors` / `optimizer.pdopt`.
    Raises CheckpointError (incomplete/inconsistent input), FileExistsError (non-empty `out`).
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    out_dtype = normalize_dtype(dtype)
    start = time.time()
    model_dir = model_dir_of(ckpt)
    with DistCheckpoint(ckpt) as ck:
        ck.check()
        model_keys, optim_keys = ck.split_keys(prefix)
        if not model_keys:
            raise CheckpointError(f"{ck.path}: no model tensors" + (f" under prefix '{prefix}.'" if prefix else ""))
        if all(k.endswith(LORA_SUFFIXES) for k in model_keys):
            raise CheckpointError(f"{ck.path} holds LoRA adapters only (the run read its base from disk): fold them "
                                  f"into the base with `qwen2vl-ap merge-lora --lora {ckpt} --out DIR`")

        def source(key: str, name: str) -> SourceTensor:
            entry = ck.tensors[key]
            return SourceTensor(name, entry.shape, entry.np_dtype, "paddle", lambda: ck.read(key),
                                ", ".join(sorted({s.file for s in entry.slices})))

        strip = len(prefix) + 1 if prefix else 0
        model = [source(k, k[strip:]) for k in model_keys]
        validate_against_config(model, model_dir)
        optim = [source(k, k) for k in optim_keys] if include_optimizer else []
        with atomic_output_dir(out) as tmp:
            files, nbytes = export_tensors(model, tmp, format, "model" if format == "safetensors" else "model_state",
                                           out_dtype, shard_size, progress, "merge")
            if optim:
                more, more_bytes = export_tensors(optim, tmp, format, "optimizer", None, shard_size, progress,
                                                  "optimizer")
                files, nbytes = files + more, nbytes + more_bytes
            files += copy_model_files(model_dir, tmp)
    largest = max(math.prod(t.shape) * t.dtype.itemsize for t in model + optim)
    summary = {
        "output": os.path.abspath(out), "format": format, "tensors": len(model) + len(optim),
        "optimizer_tensors": len(optim), "skipped_optimizer_tensors": 0 if include_optimizer else len(optim_keys),
        "bytes": nbytes, "largest_tensor_bytes": largest, "seconds": round(time.time() - start, 2),
        "peak_rss_bytes": peak_rss_bytes(), "files": files,
    }
    logger.info("merged %d tensors (%.2f GiB) from %s into %s in %.1f s, peak RSS %.2f GiB",
                summary["tensors"], nbytes / 2**30, ckpt, out, summary["seconds"], summary["peak_rss_bytes"] / 2**30)
    return summary
