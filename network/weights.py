"""Checkpoint I/O: the one key/layout table, lazy safetensors reading, `.pdparams`, and writers.

Names are HF Hub names everywhere (`visual.*`, `model.*`, `lm_head.weight`), which are also the
PaddleMIX `model_state.pdparams` names. Layouts differ only for Linear weights: HF stores [out, in],
Paddle `nn.Linear` holds [in, out]. Conv3d, Embedding and norm weights are stored identically.

In memory every tensor is a numpy array; bf16 uses `ml_dtypes.bfloat16` (a paddlenlp dependency),
because plain numpy has no bf16 dtype.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator

import ml_dtypes
import numpy as np
import paddle

from network.log import logger

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PADDLE_WEIGHTS = "model_state.pdparams"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # HF's default shard size

# The table: every Linear weight (transposed between HF [out, in] and Paddle [in, out]).
LINEAR_WEIGHTS = re.compile(
    r"^(model\.layers\.\d+\.self_attn\.[qkvo]_proj"
    r"|model\.layers\.\d+\.mlp\.(gate|up|down)_proj"
    r"|visual\.blocks\.\d+\.attn\.(qkv|proj)"
    r"|visual\.blocks\.\d+\.mlp\.fc[12]"
    r"|visual\.merger\.mlp\.[02]"
    r"|lm_head)\.weight$"
)
# HF >= 4.52 in-memory names -> Hub/Paddle names.
_RENAMES = ((re.compile(r"^model\.language_model\."), "model."), (re.compile(r"^model\.visual\."), "visual."))
# Non-persistent buffers some old exports contain; never parameters.
_IGNORED = re.compile(r"rotary_emb\.inv_freq$|rotary_pos_emb\.inv_freq$")

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


def canonical_name(name: str) -> str:
    for pattern, repl in _RENAMES:
        name = pattern.sub(repl, name)
    return name


def is_linear_weight(name: str) -> bool:
    return LINEAR_WEIGHTS.match(name) is not None


def to_paddle_layout(name: str, array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array.T) if is_linear_weight(name) else array


to_hf_layout = to_paddle_layout  # a 2-D transpose is its own inverse


# ---- readers ---------------------------------------------------------------------------------------------
def read_safetensors(file: str) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (name, array) lazily from one safetensors file, in file order.

    The header is parsed here and tensors are views into a read-only memmap, so nothing is read until
    used. `safetensors.numpy` is not used because it cannot return BF16 (numpy has no bf16 dtype) and
    loads whole files at once.
    """
    with open(file, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    header.pop("__metadata__", None)
    data = np.memmap(file, dtype=np.uint8, mode="r", offset=8 + header_len) if header else None
    for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        if info["dtype"] not in _ST_DTYPES:
            raise ValueError(f"{file}: tensor '{name}' has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        yield name, data[begin:end].view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])


def _tensor_to_numpy(t: paddle.Tensor) -> np.ndarray:
    array = t.numpy()
    # Paddle hands out bf16 as raw uint16 bits.
    return array.view(ml_dtypes.bfloat16) if t.dtype == paddle.bfloat16 else array


def checkpoint_files(path: str) -> list[str]:
    """Weight files of a checkpoint directory, by preference: sharded safetensors, single, pdparams."""
    index = os.path.join(path, SAFE_INDEX)
    if os.path.exists(index):
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(path, s) for s in shards]
    for name in (SAFE_WEIGHTS, PADDLE_WEIGHTS):
        if os.path.exists(os.path.join(path, name)):
            return [os.path.join(path, name)]
    raise FileNotFoundError(f"no {SAFE_INDEX}, {SAFE_WEIGHTS} or {PADDLE_WEIGHTS} in {path}")


def iter_checkpoint(path: str) -> Iterator[tuple[str, np.ndarray, str]]:
    """Yield (Hub name, array in Paddle layout, source file) tensor by tensor."""
    for file in checkpoint_files(path):
        if file.endswith(".pdparams"):
            state = paddle.load(file)
            for name in list(state):
                value = state.pop(name)
                array = _tensor_to_numpy(value) if isinstance(value, paddle.Tensor) else np.asarray(value)
                yield canonical_name(name), array, file  # already Paddle layout
        else:
            for name, array in read_safetensors(file):
                name = canonical_name(name)
                yield name, to_paddle_layout(name, array), file


def load_weights(model: paddle.nn.Layer, path: str) -> None:
    """Load a checkpoint directory into `model`, checking names and shapes against its state_dict."""
    params = model.state_dict()
    tied = model.config.tie_word_embeddings
    seen, problems = set(), []
    for name, array, file in iter_checkpoint(path):
        if _IGNORED.search(name) or (tied and name == "lm_head.weight"):
            continue  # tied heads reuse model.embed_tokens.weight
        if name not in params:
            problems.append(f"unexpected key '{name}' in {file}")
            continue
        target = params[name]
        if list(array.shape) != list(target.shape):
            problems.append(
                f"shape mismatch for '{name}' in {file}: model expects {list(target.shape)}, "
                f"checkpoint has {list(array.shape)} (both in Paddle layout)"
            )
            continue
        target.set_value(_to_paddle(array, target.dtype))
        seen.add(name)
    missing = [n for n in params if n not in seen]
    files = ", ".join(checkpoint_files(path))
    problems += [f"missing key '{n}' (not found in {files})" for n in missing]
    if problems:
        raise ValueError(f"cannot load {path}:\n  " + "\n  ".join(problems))
    logger.info("loaded %d tensors from %s", len(seen), path)


def _to_paddle(array: np.ndarray, dtype) -> paddle.Tensor:
    if array.dtype == ml_dtypes.bfloat16:
        if dtype == paddle.bfloat16:  # keep the bits, no fp32 round trip
            return paddle.to_tensor(np.ascontiguousarray(array).view(np.uint16), dtype="bfloat16")
        array = array.astype(np.float32)
    return paddle.to_tensor(np.ascontiguousarray(array)).astype(dtype)


# ---- writers ---------------------------------------------------------------------------------------------
def iter_hf_state(model: paddle.nn.Layer) -> Iterator[tuple[str, np.ndarray]]:
    """Stream (Hub name, array in HF layout) one parameter at a time, in the model's parameter order."""
    for name, tensor in model.state_dict().items():
        yield name, to_hf_layout(name, _tensor_to_numpy(tensor))


def _write_safetensors_file(file: str, tensors: list[tuple[str, np.ndarray]]) -> None:
    header, offset = {"__metadata__": {"format": "pt"}}, 0  # "pt" so transformers accepts the file
    for name, array in tensors:
        size = array.nbytes
        header[name] = {
            "dtype": _ST_NAMES[array.dtype], "shape": list(array.shape), "data_offsets": [offset, offset + size]
        }
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format aligns the data section to 8 bytes
    with open(file, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for _, array in tensors:
            f.write(np.ascontiguousarray(array).tobytes())


def write_safetensors(
    tensors: Iterable[tuple[str, np.ndarray]], path: str, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
) -> list[str]:
    """Write HF-layout tensors as `model.safetensors`, or as shards plus `model.safetensors.index.json`
    once they exceed `max_shard_bytes`. Holds at most one shard in memory. Returns the files written."""
    os.makedirs(path, exist_ok=True)
    temp_files, shard, shard_bytes, weight_map, total = [], [], 0, {}, 0

    def flush() -> None:
        temp = os.path.join(path, f".shard-{len(temp_files):05d}.tmp")
        _write_safetensors_file(temp, shard)
        temp_files.append((temp, [n for n, _ in shard]))

    for name, array in tensors:
        if shard and shard_bytes + array.nbytes > max_shard_bytes:
            flush()
            shard, shard_bytes = [], 0
        shard.append((name, array))
        shard_bytes += array.nbytes
        total += array.nbytes
    if shard or not temp_files:
        flush()

    if len(temp_files) == 1:
        final = os.path.join(path, SAFE_WEIGHTS)
        os.replace(temp_files[0][0], final)
        return [final]
    written = []
    for i, (temp, names) in enumerate(temp_files, start=1):
        final = f"model-{i:05d}-of-{len(temp_files):05d}.safetensors"
        os.replace(temp, os.path.join(path, final))
        weight_map.update({n: final for n in names})
        written.append(os.path.join(path, final))
    with open(os.path.join(path, SAFE_INDEX), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return written + [os.path.join(path, SAFE_INDEX)]


def _remove_stale_weights(path: str) -> None:
    # Loading prefers the index, then model.safetensors, then pdparams: old files would shadow new ones.
    stale = [n for n in os.listdir(path) if n in (SAFE_WEIGHTS, SAFE_INDEX, PADDLE_WEIGHTS)
             or re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", n)]
    for name in stale:
        os.remove(os.path.join(path, name))


def save_weights(model: paddle.nn.Layer, path: str, format: str = "safetensors",
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
    """Save as HF safetensors (HF layout) or PaddleMIX-style `model_state.pdparams` (Paddle layout)."""
    os.makedirs(path, exist_ok=True)
    _remove_stale_weights(path)
    if format == "safetensors":
        write_safetensors(iter_hf_state(model), path, max_shard_bytes)
    elif format == "paddle":
        paddle.save(model.state_dict(), os.path.join(path, PADDLE_WEIGHTS))
    else:
        raise ValueError(f"format must be 'safetensors' or 'paddle', got {format!r}")
