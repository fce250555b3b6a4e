"""convert: HF safetensors (single or sharded) <-> PaddleMIX `model_state.pdparams`, tensor by tensor.

Names go through `network.weights.canonical_name` (HF >= 4.52 `model.language_model.*` -> Hub names) and
Linear weights are transposed per `network.weights.is_linear_weight`. Source tensors are read from their
file offsets one at a time (`.pdparams` through the lazy pickle index), so peak memory is the largest tensor.
"""
from __future__ import annotations

import json
import math
import os
import re
import time
from typing import Optional

import ml_dtypes
import numpy as np

from ckpt_tools.formats import ArrayRef, FormatError, index_file, read_ref
from ckpt_tools.merge import (FORMATS, SourceTensor, export_tensors, normalize_dtype, peak_rss_bytes,
                              validate_against_config)
from ckpt_tools.model_dir import atomic_output_dir, copy_model_files
from network.log import logger
from network.weights import PADDLE_WEIGHTS, SAFE_INDEX, SAFE_WEIGHTS, canonical_name

PADDLE_INDEX = PADDLE_WEIGHTS + ".index.json"
_BUFFERS = re.compile(r"inv_freq$")  # non-persistent rotary buffers some exports contain


def weight_files(model_dir: str) -> tuple[list[str], str]:
    """(weight files, layout "hf"|"paddle") of a model directory, preferring safetensors like the loaders."""
    for index, layout in ((SAFE_INDEX, "hf"), (PADDLE_INDEX, "paddle")):
        path = os.path.join(model_dir, index)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            return [os.path.join(model_dir, s) for s in shards], layout
    for name, layout in ((SAFE_WEIGHTS, "hf"), (PADDLE_WEIGHTS, "paddle")):
        if os.path.isfile(os.path.join(model_dir, name)):
            return [os.path.join(model_dir, name)], layout
    raise FileNotFoundError(f"no {SAFE_INDEX}, {SAFE_WEIGHTS}, {PADDLE_INDEX} or {PADDLE_WEIGHTS} in {model_dir}")


def model_sources(model_dir: str) -> list[SourceTensor]:
    """Every weight of a model directory as a lazily read SourceTensor (Hub names, file order)."""
    files, layout = weight_files(model_dir)
    sources: dict[str, SourceTensor] = {}
    for file in files:
        if not os.path.isfile(file):
            raise FormatError(f"{file}: listed in the index but missing")
        for raw_name, ref in index_file(file).items():
            name = canonical_name(raw_name)
            if _BUFFERS.search(name):
                continue
            if name in sources:
                raise FormatError(f"tensor '{name}' appears twice: in {sources[name].origin} and {file}")
            dtype = ref.dtype
            if layout == "paddle" and dtype == np.uint16:
                dtype = np.dtype(ml_dtypes.bfloat16)  # paddle.save stores bf16 as uint16 bits
            sources[name] = SourceTensor(name, ref.shape, dtype, layout, _reader(ref, dtype), file)
    return list(sources.values())


def _reader(ref: ArrayRef, dtype: np.dtype):
    return lambda: read_ref(ref).view(dtype)


def convert(in_dir: str, out_dir: str, to: str, dtype: Optional[str] = None, shard_size: Optional[int] = None,
            progress: bool = True) -> dict:
    """Convert a model directory to `to` ("safetensors": HF layout, loadable by transformers; "paddle":
    PaddleMIX `model_state.pdparams`) in the new directory `out_dir`, copying config/tokenizer files."""
    if to not in FORMATS:
        raise ValueError(f"to must be one of {FORMATS}, got {to!r}")
    start = time.time()
    sources = model_sources(in_dir)
    validate_against_config(sources, in_dir)
    with atomic_output_dir(out_dir) as tmp:
        files, nbytes = export_tensors(sources, tmp, to, "model" if to == "safetensors" else "model_state",
                                       normalize_dtype(dtype), shard_size, progress, "convert")
        files += copy_model_files(in_dir, tmp)
    summary = {"output": os.path.abspath(out_dir), "format": to, "tensors": len(sources), "bytes": nbytes,
               "largest_tensor_bytes": max(math.prod(s.shape) * s.dtype.itemsize for s in sources),
               "seconds": round(time.time() - start, 2), "peak_rss_bytes": peak_rss_bytes(), "files": files}
    logger.info("converted %d tensors from %s to %s (%s) in %.1f s", len(sources), in_dir, out_dir, to,
                summary["seconds"])
    return summary
