"""Checkpoint I/O: the one key/layout table and the one reader and writer of every model-directory layout.

Names are HF Hub names everywhere (`visual.*`, `model.*`, `lm_head.weight`), which are also the
PaddleMIX `model_state.pdparams` names. Layouts differ only for Linear weights: HF stores [out, in],
Paddle `nn.Linear` holds [in, out]. Conv3d, Embedding and norm weights are stored identically.

A model directory holds one of four weight layouts, found by `weight_files` in this order:
`model.safetensors.index.json` + shards, `model.safetensors`, `model_state.pdparams.index.json` + shards,
`model_state.pdparams` (safetensors in HF layout, pdparams in Paddle layout). Every writer of the project
(`save_weights`, merge-ckpt, merge-lora, convert) writes one of them, and `index_weights` reads all of them
lazily through `network.formats`: tensor data is read one tensor at a time, and `.pdparams` pickles go through
its restricted unpickler, so a crafted weight file cannot run code.

In memory every tensor is a numpy array; bf16 uses `ml_dtypes.bfloat16` (a paddlenlp dependency),
because plain numpy has no bf16 dtype.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Callable

import ml_dtypes
import numpy as np
import paddle
from paddle.utils.dlpack import from_dlpack

from network.device import check_device_resident, note_host_tensor, weights_zero_copy
from network.formats import ArrayRef, FormatError, index_file, index_safetensors, read_ref, read_ref_slice
from network.log import logger
from network.writers import DEFAULT_SHARD_BYTES, PlannedTensor, ShardedWriter, transpose_copy

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PADDLE_WEIGHTS = "model_state.pdparams"
PADDLE_INDEX = "model_state.pdparams.index.json"
DEFAULT_MAX_SHARD_BYTES = DEFAULT_SHARD_BYTES
_BF16 = np.dtype(ml_dtypes.bfloat16)

# The table: every Linear weight (transposed between HF [out, in] and Paddle [in, out]).
LINEAR_WEIGHTS = re.compile(
    r"^(model\.layers\.\d+\.self_attn\.[qkvo]_proj"
    r"|model\.layers\.\d+\.mlp\.(gate|up|down)_proj"
    r"|visual\.blocks\.\d+\.attn\.(qkv|proj)"
    r"|visual\.blocks\.\d+\.mlp\.(fc[12]|(gate|up|down)_proj)"  # Qwen2-VL fc1/fc2, Qwen2.5-VL SwiGLU
    r"|visual\.merger\.mlp\.[02]"
    r"|lm_head)\.weight$"
)
# HF >= 4.52 in-memory names -> Hub/Paddle names.
_RENAMES = ((re.compile(r"^model\.language_model\."), "model."), (re.compile(r"^model\.visual\."), "visual."))
# Non-persistent buffers some old exports contain; never parameters.
_IGNORED = re.compile(r"rotary_emb\.inv_freq$|rotary_pos_emb\.inv_freq$")


def canonical_name(name: str) -> str:
    for pattern, repl in _RENAMES:
        name = pattern.sub(repl, name)
    return name


def is_linear_weight(name: str) -> bool:
    return LINEAR_WEIGHTS.match(name) is not None


def to_paddle_layout(name: str, array: np.ndarray) -> np.ndarray:
    return transpose_copy(array) if is_linear_weight(name) else array


to_hf_layout = to_paddle_layout  # a 2-D transpose is its own inverse


# ---- reading ---------------------------------------------------------------------------------------------
@dataclass
class SourceTensor:
    """One stored tensor: Hub name, stored shape and dtype, its layout and how to read it (lazily)."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    layout: str  # "paddle" (Linear [in, out]) or "hf" (Linear [out, in])
    read: Callable[[], np.ndarray]  # the array as stored (layout above)
    origin: str  # file(s) shown in messages
    ref: ArrayRef | None = None  # where it is stored, when it is one array of one file (slices read from there)

    @property
    def transposed(self) -> bool:
        """Stored transposed relative to Paddle (an HF-layout Linear weight)."""
        return self.layout == "hf" and is_linear_weight(self.name)

    @property
    def paddle_shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.shape)) if self.transposed else self.shape

    def read_paddle(self) -> np.ndarray:
        """The array in Paddle layout."""
        array = self.read()
        return to_paddle_layout(self.name, array) if self.layout == "hf" else array

    def read_paddle_slice(self, dim: int, start: int, stop: int) -> np.ndarray:
        """`read_paddle()[..., start:stop, ...]` on Paddle-layout `dim`, reading only that range of the file
        (a column range of an HF Linear weight is a row range of the stored [out, in] array)."""
        stored_dim = len(self.shape) - 1 - dim if self.transposed else dim
        if self.ref is None:
            full = self.read()
            array = full[(slice(None),) * stored_dim + (slice(start, stop),)]
        else:
            array = read_ref_slice(self.ref, stored_dim, start, stop).view(self.dtype)
        return transpose_copy(array) if self.transposed else np.ascontiguousarray(array)


def weight_files(path: str) -> tuple[list[str], str]:
    """(weight files, layout "hf" | "paddle") of a model directory, in the preference order above."""
    for single, index, layout in ((SAFE_WEIGHTS, SAFE_INDEX, "hf"), (PADDLE_WEIGHTS, PADDLE_INDEX, "paddle")):
        index_path = os.path.join(path, index)
        if os.path.isfile(index_path):
            try:
                with open(index_path, encoding="utf-8") as f:
                    shards = sorted(set(json.load(f)["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
                raise FormatError(f"{index_path}: not a weight index ({type(exc).__name__}: {exc})") from None
            return [os.path.join(path, s) for s in shards], layout
        if os.path.isfile(os.path.join(path, single)):
            return [os.path.join(path, single)], layout
    raise FileNotFoundError(f"no {SAFE_INDEX}, {SAFE_WEIGHTS}, {PADDLE_INDEX} or {PADDLE_WEIGHTS} in {path}")


def index_weights(path: str) -> list[SourceTensor]:
    """Every weight of a model directory as a lazily read `SourceTensor` (Hub names, file order); no tensor data
    is read. Rotary `inv_freq` buffers of old exports are left out."""
    files, layout = weight_files(path)
    sources: dict[str, SourceTensor] = {}
    for file in files:
        if not os.path.isfile(file):
            raise FormatError(f"{file}: listed in the index but missing")
        for raw_name, ref in index_file(file).items():
            name = canonical_name(raw_name)
            if _IGNORED.search(name):
                continue
            if name in sources:
                raise FormatError(f"tensor '{name}' appears twice: in {sources[name].origin} and {file}")
            dtype = ref.dtype
            if layout == "paddle" and dtype == np.uint16:
                dtype = _BF16  # paddle.save stores bf16 as uint16 bits
            sources[name] = SourceTensor(name, ref.shape, dtype, layout,
                                         lambda ref=ref, dtype=dtype: read_ref(ref).view(dtype), file, ref)
    return list(sources.values())


def weights_fingerprint(path: str) -> str:
    """Identity of a model directory's weights, cheap at any size: a hash of every tensor's name, stored shape and
    dtype and the bytes of its first and last stored rows (fine-tuning changes nearly every row; hashing every
    byte of a 72B checkpoint would take minutes). It depends on the stored layout: the same weights converted
    between safetensors and pdparams, or to another dtype, fingerprint differently."""
    digest = hashlib.sha256()
    for source in sorted(index_weights(path), key=lambda s: s.name):
        digest.update(f"|{source.name}|{source.layout}|{source.shape}|{source.dtype}".encode())
        if not source.shape:
            digest.update(source.read().tobytes())
        for row in sorted({0, source.shape[0] - 1} if source.shape and source.shape[0] else set()):
            digest.update(read_ref_slice(source.ref, 0, row, row + 1).tobytes())
    return digest.hexdigest()


def iter_checkpoint(path: str) -> Iterator[tuple[str, np.ndarray, str]]:
    """Yield (Hub name, array in Paddle layout, source file) tensor by tensor."""
    for source in index_weights(path):
        yield source.name, source.read_paddle(), source.origin


def read_safetensors(file: str) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (name, array) from one safetensors file in file order, as views into a read-only memmap (nothing is
    read until used)."""
    refs = sorted(index_safetensors(file).items(), key=lambda kv: kv[1].offset)
    data = np.memmap(file, dtype=np.uint8, mode="r") if refs else None
    for name, ref in refs:
        yield name, data[ref.offset: ref.offset + ref.nbytes].view(ref.dtype).reshape(ref.shape)


def match_weights(model: paddle.nn.Layer, path: str, names: Iterable[str] | None = None, part: bool = False
                  ) -> list[tuple[paddle.Tensor, SourceTensor]]:
    """(parameter, its stored tensor) for every entry of `model.state_dict()` (or only those in `names`), checking
    names and (global) shapes; one error lists every problem. `part`: the model is a part of the checkpoint's (a
    pipeline stage), so stored tensors it does not have are skipped. Nothing is read."""
    params = model.state_dict()
    wanted = set(params if names is None else names)
    tied = model.config.tie_word_embeddings
    pairs, seen, problems = [], set(), []
    for source in index_weights(path):
        name, file = source.name, source.origin
        if tied and name == "lm_head.weight":
            continue  # tied heads reuse model.embed_tokens.weight
        if name not in params:
            if not part:
                problems.append(f"unexpected key '{name}' in {file}")
            continue
        if name not in wanted:
            continue
        target = params[name]
        if list(source.paddle_shape) != list(target.shape):
            problems.append(
                f"shape mismatch for '{name}' in {file}: model expects {list(target.shape)}, "
                f"checkpoint has {list(source.paddle_shape)} (both in Paddle layout)"
            )
            continue
        pairs.append((target, source))
        seen.add(name)
    missing = [n for n in params if n in wanted and n not in seen]
    files = ", ".join(weight_files(path)[0])
    problems += [f"missing key '{n}' (not found in {files})" for n in missing]
    if problems:
        raise ValueError(f"cannot load {path}:\n  " + "\n  ".join(problems))
    return pairs


def assign(param: paddle.Tensor, value: paddle.Tensor) -> None:
    """Give `param` the data of `value` (same shape and dtype); also materialises a parameter created under
    `paddle.LazyGuard` (no init function runs)."""
    check_device_resident(param.name, value)
    if param._is_initialized():
        param.set_value(value)
    else:
        value._share_underline_tensor_to(param)
        param._init_func = None


def load_weights(model: paddle.nn.Layer, path: str) -> None:
    """Load a checkpoint directory into `model` (eager or built under `paddle.LazyGuard`), one tensor at a time,
    each in its parameter's dtype; checks names and shapes against its state_dict."""
    pairs = match_weights(model, path)
    for target, source in pairs:
        assign(target, to_paddle(source.read_paddle(), target.dtype))
    logger.info("loaded %d tensors from %s", len(pairs), path)


def to_paddle(array: np.ndarray, dtype) -> paddle.Tensor:
    """A numpy array (bf16 as ml_dtypes) as a Paddle tensor of `dtype` on the expected place, bf16 bits kept as they
    are. On the CPU place the tensor takes over the array's memory through DLPack for fp32 results (no second copy
    of each weight at load time; the caller must not reuse the array). On a GPU place it is created there: a
    zero-copy tensor would stay in host memory and be copied to the device at every op that reads it (N4)."""
    if array.dtype == _BF16:
        bits = np.ascontiguousarray(array).view(np.uint16)
        if dtype == paddle.bfloat16:  # keep the bits, no fp32 round trip (DLPack would type them uint16)
            return paddle.to_tensor(bits, dtype="bfloat16")
        # bf16 is the top half of fp32: widening is a shift (exact, and much faster than ml_dtypes' astype).
        wide = bits.astype(np.uint32)
        wide <<= 16
        array = wide.view(np.float32)
    if weights_zero_copy():
        tensor = _share(np.ascontiguousarray(array))
    else:
        tensor = paddle.to_tensor(np.ascontiguousarray(array), place=paddle.framework._current_expected_place())
    return tensor if tensor.dtype == dtype else tensor.astype(dtype)


def _share(array: np.ndarray) -> paddle.Tensor:
    if not array.flags.writeable:  # DLPack export needs a writable array
        array = array.copy()
    return note_host_tensor(from_dlpack(array))


# ---- writing ---------------------------------------------------------------------------------------------
def _tensor_to_numpy(t: paddle.Tensor) -> np.ndarray:
    array = t.numpy()
    # Paddle hands out bf16 as raw uint16 bits.
    return array.view(_BF16) if t.dtype == paddle.bfloat16 else array


_NUMPY_DTYPES = {paddle.float32: np.dtype(np.float32), paddle.float16: np.dtype(np.float16), paddle.bfloat16: _BF16,
                 paddle.float64: np.dtype(np.float64), paddle.int64: np.dtype(np.int64),
                 paddle.int32: np.dtype(np.int32)}


def iter_hf_state(model: paddle.nn.Layer) -> Iterator[tuple[str, np.ndarray]]:
    """Stream (Hub name, array in HF layout) one parameter at a time, in the model's parameter order."""
    for name, tensor in model.state_dict().items():
        yield name, to_hf_layout(name, _tensor_to_numpy(tensor))


def _write(directory: str, fmt: str, tensors: list[tuple[PlannedTensor, Callable[[], np.ndarray]]],
           max_shard_bytes: int | None) -> list[str]:
    writer = ShardedWriter(directory, fmt, "model" if fmt == "safetensors" else "model_state",
                           [p for p, _ in tensors], max_shard_bytes)
    try:
        for planned, read in tensors:
            writer.write(planned.name, read())
        return [os.path.join(directory, f) for f in writer.finish()]
    finally:
        writer.abort()


def write_safetensors(tensors: Iterable[tuple[str, np.ndarray]], path: str,
                      max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[str]:
    """Write HF-layout tensors as `model.safetensors`, or as shards plus `model.safetensors.index.json`
    once they exceed `max_shard_bytes`. Returns the files written."""
    os.makedirs(path, exist_ok=True)
    items = list(tensors)
    planned = [(PlannedTensor(n, tuple(a.shape), a.dtype), lambda a=a: a) for n, a in items]
    return _write(path, "safetensors", planned, max_shard_bytes)


def _remove_stale_weights(path: str) -> None:
    # Loading prefers the safetensors index, then model.safetensors, then pdparams: old files would shadow new ones.
    stale = [n for n in os.listdir(path) if n in (SAFE_WEIGHTS, SAFE_INDEX, PADDLE_WEIGHTS, PADDLE_INDEX)
             or re.fullmatch(r"model(_state)?-\d{5}-of-\d{5}\.(safetensors|pdparams)", n)]
    for name in stale:
        os.remove(os.path.join(path, name))


def save_weights(model: paddle.nn.Layer, path: str, format: str = "safetensors",
                 max_shard_bytes: int | None = None) -> list[str]:
    """Save as HF safetensors (HF layout; shards of `max_shard_bytes`, default 5 GB) or PaddleMIX-style
    `model_state.pdparams` (Paddle layout; one file unless `max_shard_bytes` is given). One tensor is converted
    at a time. Returns the files written."""
    if format not in ("safetensors", "paddle"):
        raise ValueError(f"format must be 'safetensors' or 'paddle', got {format!r}")
    os.makedirs(path, exist_ok=True)
    _remove_stale_weights(path)
    if format == "safetensors" and max_shard_bytes is None:
        max_shard_bytes = DEFAULT_MAX_SHARD_BYTES
    transpose = format == "safetensors"
    planned = []
    for name, tensor in model.state_dict().items():
        flip = transpose and is_linear_weight(name)
        dtype = _NUMPY_DTYPES[tensor.dtype]
        shape = tuple(tensor.shape)
        planned.append((PlannedTensor(name, tuple(reversed(shape)) if flip else shape, dtype, flip),
                        lambda t=tensor: _tensor_to_numpy(t)))
    return _write(path, format, planned, max_shard_bytes)

