"""merge-lora: fold LoRA adapters into the base weights, W' = W + (A @ B) * scaling, one tensor in memory at a time.

Inputs (`--lora`, checked in this order):
  1. a dist checkpoint holding `*.lora_A` / `*.lora_B` tensors: `checkpoint-N` of `qwen2vl-ap lora` or its
     `dist_ckpt/`. The adapters are read from the dist checkpoint (the training state itself), `r` / `lora_alpha` /
     `rslora` from `lora_config.json` next to it (in `checkpoint-N`). When `--base` is omitted, the base weights
     are the checkpoint's non-LoRA model tensors (a run on a preset) or, for a checkpoint holding adapters only
     (a run on a model directory or Hub id), the `base_model_name_or_path` its lora_config.json records;
     optimizer states are never written. The base must be the one the adapters were trained on when their
     lora_config.json records its `base_model_fingerprint` (an explicit `--base` that differs is only warned about).
  2. an adapter directory in paddlenlp's format: `lora_config.json` + `lora_model_state.pdparams` (or
     `peft_model.safetensors`), as `save_adapter` / paddlenlp's `LoRAModel.save_pretrained` write them. Keys are
     `{layer}.lora_A` / `{layer}.lora_B` with the plain model's layer names; a leading `model.` (the names of the
     `LoRAModel` wrapper itself) and HF >= 4.52 names are accepted. Other tensors in the file (paddlenlp's
     `trainable_modules` / `trainable_bias`) replace the base tensor of the same name. Without `--base`, the
     base is the `base_model_name_or_path` of its lora_config.json.
`--base`: any model directory `convert` reads (HF safetensors single/sharded, `model_state.pdparams`, output of
merge-ckpt) or a dist checkpoint (its LoRA tensors and optimizer states are left out).

Output: a complete model directory. config.json, generation config, tokenizer and processor files come from the
base directory (`checkpoint-N` for a dist checkpoint), missing ones from the LoRA directory, and without any
tokenizer the embedded Qwen2 tokenizer is written (network.processor). Weights are written in the base's order.

Memory: the largest base tensor (in its stored dtype; plus its `--dtype` copy when that differs) + one fp32 row
block of at most 32 MiB + that tensor's A and B in fp32 + the writer's 64 MiB conversion chunk + the fixed
import overhead of merge-ckpt (~0.4 GiB).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, replace
from typing import Callable, Optional

import ml_dtypes
import numpy as np

from ckpt_tools.distckpt import DistCheckpoint, is_dist_checkpoint
from ckpt_tools.merge import FORMATS, export_tensors, model_dir_of, normalize_dtype, validate_against_config
from ckpt_tools.model_dir import CONFIG, MODEL_FILES, atomic_output_dir, copy_model_files
from network.formats import CheckpointError, index_file, read_ref
from network.hub import ModelNotFoundError, resolve_model_dir
from network.log import logger
from network.lora import LORA_CONFIG_NAME, LORA_SUFFIXES, LORA_WEIGHTS_NAME, LoraArgs, base_mismatch
from network.process_memory import peak_rss_bytes
from network.tokenizer import has_tokenizer_files
from network.weights import SourceTensor, canonical_name, index_weights, is_linear_weight

PEFT_SAFETENSORS = "peft_model.safetensors"  # paddlenlp's unified-checkpoint adapter file
_BLOCK_BYTES = 32 << 20  # fp32 row block of the update
# paddlenlp LoRAConfig variants whose merged weight is not W + A @ B * scaling.
_UNSUPPORTED = ("pissa", "loraga", "use_mora", "lora_use_mixer", "do_qat")


class LoraMergeError(ValueError):
    """The adapter does not fit the base (or is not a plain LoRA); the message names the keys and files."""


@dataclass
class Adapter:
    """One adapted weight: lazily read A [in, r] and B [r, out] (Paddle layout) and where they are stored."""
    key: str  # adapter key without the lora_A/lora_B suffix, as stored
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]
    read_a: Callable[[], np.ndarray]
    read_b: Callable[[], np.ndarray]
    origin: str


@dataclass
class AdapterSet:
    adapters: dict[str, Adapter]  # by stored key (without suffix)
    extra: dict[str, SourceTensor]  # non-LoRA tensors of an adapter file, by stored key
    scaling: float
    source: str  # the file(s) shown in messages
    config_dir: str  # directory of lora_config.json (fallback for tokenizer/processor files)


# ---- reading the adapter ---------------------------------------------------------------------------------------
def _scaling(directory: str) -> float:
    """lora_alpha / r (or / sqrt(r) for rslora) from `directory/lora_config.json`, ours or paddlenlp's."""
    path = os.path.join(directory, LORA_CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {LORA_CONFIG_NAME} in {directory} (needed for r / lora_alpha)")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
        unsupported = [k for k in _UNSUPPORTED if config.get(k)]
        if unsupported:
            raise LoraMergeError(f"{path}: {', '.join(unsupported)} adapters are not merged by W + A @ B * scaling")
        args = LoraArgs(lora=False, lora_rank=int(config["r"]), lora_alpha=float(config["lora_alpha"]),
                        rslora=bool(config.get("rslora", False)), lora_target_modules=[])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise LoraMergeError(f"{path}: not a LoRA config ({type(exc).__name__}: {exc})") from None
    return args.scaling


def recorded_base(directory: str) -> str:
    """The model directory of `base_model_name_or_path` in `directory/lora_config.json` (a Hub id through the
    cache): the base of adapters given without --base. Raises FileNotFoundError saying to pass --base."""
    path = os.path.join(directory, LORA_CONFIG_NAME)
    with open(path, encoding="utf-8") as f:
        name = json.load(f).get("base_model_name_or_path")
    if not name:
        raise FileNotFoundError(f"--base is required: {path} names no base_model_name_or_path")
    try:
        return resolve_model_dir(name)
    except ModelNotFoundError as exc:
        raise FileNotFoundError(f"--base is required: the base_model_name_or_path of {path} is not available "
                                f"({exc})") from None


def _pair(tensors: dict[str, tuple[tuple[int, ...], Callable[[], np.ndarray]]], source: str) -> dict[str, Adapter]:
    """Group `{key}.lora_A` / `{key}.lora_B` entries (shape, reader) into Adapters."""
    adapters = {}
    for name in tensors:
        if name.endswith(".lora_A"):
            key = name[: -len(".lora_A")]
            if key + ".lora_B" not in tensors:
                raise LoraMergeError(f"'{name}' in {source} has no matching '{key}.lora_B'")
            (a_shape, read_a), (b_shape, read_b) = tensors[name], tensors[key + ".lora_B"]
            adapters[key] = Adapter(key, a_shape, b_shape, read_a, read_b, source)
        elif name.endswith(".lora_B") and name[: -len("B")] + "A" not in tensors:
            raise LoraMergeError(f"'{name}' in {source} has no matching '{name[:-1]}A'")
    if not adapters:
        raise LoraMergeError(f"{source} holds no '*.lora_A' / '*.lora_B' tensors")
    return adapters


def adapter_from_files(directory: str) -> AdapterSet:
    """paddlenlp's adapter format: lora_config.json + lora_model_state.pdparams (or peft_model.safetensors)."""
    scaling = _scaling(directory)
    file = next((os.path.join(directory, n) for n in (LORA_WEIGHTS_NAME, PEFT_SAFETENSORS)
                 if os.path.isfile(os.path.join(directory, n))), None)
    if file is None:
        split = sorted(n for n in os.listdir(directory) if n.startswith("lora_model_state.tp"))
        hint = f" (tensor-parallel pieces {split[:2]}: save with merge_tensor_parallel=True)" if split else ""
        raise FileNotFoundError(f"no {LORA_WEIGHTS_NAME} or {PEFT_SAFETENSORS} in {directory}{hint}")
    refs = index_file(file)
    bf16_bits = file.endswith(".pdparams")  # paddle.save stores bf16 as uint16 bits
    dtypes = {k: np.dtype(ml_dtypes.bfloat16) if bf16_bits and r.dtype == np.uint16 else r.dtype
              for k, r in refs.items()}
    tensors = {k: (r.shape, lambda r=r, d=dtypes[k]: read_ref(r).view(d)) for k, r in refs.items()}
    extra = {k: SourceTensor(k, r.shape, dtypes[k], "paddle", tensors[k][1], file)
             for k, r in refs.items() if not k.endswith(LORA_SUFFIXES)}
    return AdapterSet(_pair(tensors, file), extra, scaling, file, directory)


def adapter_from_dist(ck: DistCheckpoint) -> AdapterSet:
    """Adapters stored in a dist checkpoint; the config comes from `checkpoint-N` (or the dist dir itself)."""
    model_keys, _ = ck.split_keys()
    tensors = {k: (ck.tensors[k].shape, lambda k=k: ck.read(k)) for k in model_keys if k.endswith(LORA_SUFFIXES)}
    config_dir = model_dir_of(ck.path)
    if not os.path.isfile(os.path.join(config_dir, LORA_CONFIG_NAME)):
        config_dir = ck.path
    scaling = _scaling(config_dir)
    return AdapterSet(_pair(tensors, ck.path), {}, scaling, ck.path, config_dir)


# ---- matching and merging --------------------------------------------------------------------------------------
def _candidates(key: str) -> list[str]:
    """Base names an adapter key may denote: as stored, HF >= 4.52 names, without `LoRAModel`'s `model.`."""
    names = [key, canonical_name(key)]
    if key.startswith("model."):
        names += [key[len("model."):], canonical_name(key[len("model."):])]
    return list(dict.fromkeys(names))


def _resolve(keys: list[str], base: dict[str, SourceTensor], suffix: str, source: str) -> dict[str, str]:
    """Adapter key -> base tensor name; raises naming every key that matches nothing."""
    found, unmatched = {}, []
    for key in keys:
        name = next((n for n in _candidates(key) if n + suffix in base), None)
        if name is None:
            unmatched.append(key + suffix if suffix else key)
        else:
            found[key] = name + suffix
    if unmatched:
        example = next((n for n in base if is_linear_weight(n)), next(iter(base)))
        raise LoraMergeError(
            f"{len(unmatched)} adapter keys in {source} target tensors the base does not have: "
            f"{', '.join(unmatched[:8])}{' ...' if len(unmatched) > 8 else ''} (base names look like '{example}')")
    return found


def _check_fit(adapter: Adapter, base: SourceTensor) -> None:
    if base.layout == "hf" and not is_linear_weight(base.name):
        raise LoraMergeError(f"'{base.name}' in {base.origin} is stored in HF layout but is not a known Linear "
                             f"weight, so its [in, out] orientation is unknown")
    shape = base.paddle_shape
    a, b = adapter.a_shape, adapter.b_shape
    if len(shape) != 2 or len(a) != 2 or len(b) != 2 or a[1] != b[0] or (a[0], b[1]) != tuple(shape):
        raise LoraMergeError(
            f"adapter '{adapter.key}.lora_A' {list(a)} @ '{adapter.key}.lora_B' {list(b)} in {adapter.origin} does "
            f"not fit base '{base.name}' {list(shape)} ([in, out]) in {base.origin}")
    if base.dtype.kind != "f" and base.dtype != np.dtype(ml_dtypes.bfloat16):
        raise LoraMergeError(f"base '{base.name}' in {base.origin} is {base.dtype}, not a floating weight")


def merged_weight(base: np.ndarray, layout: str, a: np.ndarray, b: np.ndarray, scaling: float,
                  out_dtype: np.dtype) -> np.ndarray:
    """W + (A @ B) * scaling in fp32, cast to `out_dtype`, in row blocks (in place when dtypes agree).
    `base` is [in, out] for layout "paddle", [out, in] for "hf"."""
    a, b = a.astype(np.float32), b.astype(np.float32)
    if layout == "hf":  # rows are output units: the update is (A @ B).T = B.T @ A.T
        a, b = np.ascontiguousarray(b.T), np.ascontiguousarray(a.T)
    out = base if base.dtype == out_dtype else np.empty(base.shape, dtype=out_dtype)
    rows = max(1, _BLOCK_BYTES // (4 * max(base.shape[1], 1)))
    for i in range(0, base.shape[0], rows):
        block = a[i:i + rows] @ b
        block *= np.float32(scaling)
        np.add(block, base[i:i + rows], out=block)  # the ufunc casts the base rows in small buffers
        out[i:i + rows] = block
    return out


def _merged_source(base: SourceTensor, adapter: Adapter, scaling: float, out_dtype: Optional[np.dtype]) -> SourceTensor:
    target = out_dtype if out_dtype is not None else base.dtype

    def read() -> np.ndarray:
        return merged_weight(base.read(), base.layout, adapter.read_a(), adapter.read_b(), scaling, target)

    return replace(base, dtype=target, read=read, origin=f"{base.origin} + {adapter.origin}")


def _replacement(base: SourceTensor, tensor: SourceTensor) -> SourceTensor:
    if tensor.shape != base.paddle_shape:
        raise LoraMergeError(f"'{tensor.name}' {list(tensor.shape)} in {tensor.origin} does not fit base "
                             f"'{base.name}' {list(base.paddle_shape)} (Paddle layout) in {base.origin}")
    return replace(base, shape=tensor.shape, dtype=base.dtype, layout="paddle", origin=tensor.origin,
                   read=lambda: tensor.read().astype(base.dtype))


def plan_merge(base: list[SourceTensor], lora: AdapterSet,
               out_dtype: Optional[np.dtype]) -> tuple[list[SourceTensor], int]:
    """The output tensors (base order) with adapters folded in, and how many were merged."""
    stray = [t for t in base if t.name.endswith(LORA_SUFFIXES)]
    if stray:
        raise LoraMergeError(f"the base holds LoRA tensors ('{stray[0].name}' in {stray[0].origin}, {len(stray)} in "
                             f"all): pass that checkpoint as --lora and a plain model as --base")
    by_name = {t.name: t for t in base}
    targets = _resolve(list(lora.adapters), by_name, ".weight", lora.source)
    replaced = _resolve(list(lora.extra), by_name, "", lora.source)
    changes: dict[str, Callable[[SourceTensor], SourceTensor]] = {}
    for key, name in replaced.items():
        changes[name] = lambda t, key=key: _replacement(t, lora.extra[key])
    for key, name in targets.items():
        _check_fit(lora.adapters[key], by_name[name])
        if name in changes:
            raise LoraMergeError(f"'{name}' is both replaced and adapted by {lora.source}")
        changes[name] = lambda t, key=key: _merged_source(t, lora.adapters[key], lora.scaling, out_dtype)
    return [changes[t.name](t) if t.name in changes else t for t in base], len(targets)


# ---- sources and output files ----------------------------------------------------------------------------------
def _dist_sources(ck: DistCheckpoint) -> list[SourceTensor]:
    """Model tensors of a dist checkpoint, LoRA tensors and optimizer states left out."""
    ck.check()
    model_keys, _ = ck.split_keys()

    def source(key: str) -> SourceTensor:
        entry = ck.tensors[key]
        files = ", ".join(sorted({s.file for s in entry.slices}))
        return SourceTensor(key, entry.shape, entry.np_dtype, "paddle", lambda: ck.read(key), files)

    return [source(k) for k in model_keys if not k.endswith(LORA_SUFFIXES)]


def write_model_files(dst: str, base_dir: str, lora_dir: str) -> list[str]:
    """config/generation/tokenizer/processor files: base dir first, then the LoRA dir, then the embedded tokenizer."""
    primary = base_dir if os.path.isfile(os.path.join(base_dir, CONFIG)) or \
        not os.path.isfile(os.path.join(lora_dir, CONFIG)) else lora_dir
    written = copy_model_files(primary, dst)
    secondary = lora_dir if primary == base_dir else base_dir
    for name in MODEL_FILES:  # files the primary lacks (e.g. a base dir with weights + config only)
        if name not in written and os.path.isfile(os.path.join(secondary, name)):
            shutil.copy2(os.path.join(secondary, name), os.path.join(dst, name))
            written.append(name)
    if not has_tokenizer_files(dst):
        from network.config import Qwen2VLConfig
        from network.processor import Qwen2VLProcessor

        logger.info("no tokenizer in %s or %s: writing the embedded Qwen2 tokenizer and processor files",
                    base_dir, lora_dir)
        before = set(os.listdir(dst))
        has_config = os.path.isfile(os.path.join(dst, CONFIG))
        model_type = Qwen2VLConfig.from_pretrained(dst).model_type if has_config else "qwen2_vl"
        Qwen2VLProcessor.from_pretrained(dst).save_pretrained(dst, model_type)  # keeps a copied preprocessor config
        written += sorted(set(os.listdir(dst)) - before)
    return written


def merge_lora(base: Optional[str], lora: str, out: str, format: str = "safetensors", dtype: Optional[str] = None,
               shard_size: Optional[int] = None, progress: bool = True) -> dict:
    """Fold the adapter `lora` into `base` and write the model directory `out` (see the module docstring for
    the accepted inputs). Raises LoraMergeError / CheckpointError / FormatError / FileNotFoundError /
    FileExistsError with a message naming the keys and files; `out` is then not created."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    out_dtype = normalize_dtype(dtype)
    start = time.time()
    for path, what in ((lora, "--lora"), (base, "--base")):
        if path is not None and not os.path.isdir(path):
            raise FileNotFoundError(f"{what} {path}: no such directory")
    with contextlib.ExitStack() as stack:
        lora_ck = stack.enter_context(DistCheckpoint(lora)) if is_dist_checkpoint(lora) else None
        if lora_ck is not None and any(k.endswith(LORA_SUFFIXES) for k in lora_ck.tensors):
            lora_ck.check()
            adapter = adapter_from_dist(lora_ck)
        else:
            lora_ck = None  # a dist checkpoint without adapters: only adapter files can apply
            adapter = adapter_from_files(lora)
        if base is None and lora_ck is not None and _dist_sources(lora_ck):  # a LoRA run on a preset
            base_sources, base_dir = _dist_sources(lora_ck), model_dir_of(lora)
        elif base is None:  # adapters only: the base the run read, as its lora_config.json records it
            base_dir = recorded_base(adapter.config_dir)
            mismatch = base_mismatch(adapter.config_dir, base_dir)
            if mismatch:
                raise CheckpointError(mismatch)
            base_sources = index_weights(base_dir)
        elif is_dist_checkpoint(base):
            base_sources, base_dir = _dist_sources(stack.enter_context(DistCheckpoint(base))), model_dir_of(base)
        else:
            base_sources, base_dir = index_weights(base), base
            mismatch = base_mismatch(adapter.config_dir, base_dir)
            if mismatch:  # --base is the user's explicit choice: said, not refused
                logger.warning("%s; merging onto --base %s as asked", mismatch, base)
        if not base_sources:
            raise CheckpointError(f"{base or lora}: no base model tensors")
        validate_against_config(base_sources, base_dir)
        tensors, merged = plan_merge(base_sources, adapter, out_dtype)
        logger.info("merging %d adapters (scaling %g) from %s into %d base tensors", merged, adapter.scaling,
                    adapter.source, len(tensors))
        with atomic_output_dir(out) as tmp:
            files, nbytes = export_tensors(tensors, tmp, format, "model" if format == "safetensors" else "model_state",
                                           out_dtype, shard_size, progress, "merge-lora")
            files += write_model_files(tmp, base_dir, adapter.config_dir)
    summary = {
        "output": os.path.abspath(out), "format": format, "tensors": len(tensors), "merged": merged,
        "replaced": len(adapter.extra), "scaling": adapter.scaling, "adapter": adapter.source, "bytes": nbytes,
        "largest_tensor_bytes": max(math.prod(t.shape) * t.dtype.itemsize for t in tensors),
        "seconds": round(time.time() - start, 2), "peak_rss_bytes": peak_rss_bytes(), "files": files,
    }
    logger.info("merge-lora: %d tensors (%d merged, %.2f GiB) into %s in %.1f s, peak RSS %.2f GiB", len(tensors),
                merged, nbytes / 2**30, out, summary["seconds"], summary["peak_rss_bytes"] / 2**30)
    return summary

