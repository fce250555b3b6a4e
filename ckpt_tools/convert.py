"""convert: HF safetensors (single or sharded) <-> PaddleMIX `model_state.pdparams`, tensor by tensor.

Sources are `network.weights.index_weights` (every layout a model directory may hold; HF >= 4.52
`model.language_model.*` names become Hub names) and Linear weights are transposed per
`network.weights.is_linear_weight`. Source tensors are read from their file offsets one at a time (`.pdparams`
through the lazy pickle index), so peak memory is the largest tensor.
"""
from __future__ import annotations

import math
import os
import time
from typing import Optional

from ckpt_tools.merge import FORMATS, export_tensors, normalize_dtype, validate_against_config
from ckpt_tools.model_dir import atomic_output_dir, copy_model_files
from network.log import logger
from network.process_memory import peak_rss_bytes
from network.weights import index_weights


def convert(in_dir: str, out_dir: str, to: str, dtype: Optional[str] = None, shard_size: Optional[int] = None,
            progress: bool = True) -> dict:
    """Convert a model directory to `to` ("safetensors": HF layout, loadable by transformers; "paddle":
    PaddleMIX `model_state.pdparams`) in the new directory `out_dir`, copying config/tokenizer files."""
    if to not in FORMATS:
        raise ValueError(f"to must be one of {FORMATS}, got {to!r}")
    start = time.time()
    sources = index_weights(in_dir)
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
