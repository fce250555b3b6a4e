"""The file formats every weight and checkpoint is stored in, read without running code.

Random access to tensors inside Paddle pickles (`.distcp`, `.pdparams`, `.metadata`) and safetensors files.

`paddle.save(state_dict)` pickles (protocol 4) a dict of numpy arrays. Each array's bytes are one BINBYTES /
BINBYTES8 payload, and payloads >= 64 KiB are written outside pickle frames. `index_pickle` runs a pure-Python
unpickler that records each payload's file offset and seeks past it instead of reading it, so indexing a file
reads only its small opcode frames and no tensor data; `read_into` then copies one tensor (or one slice of it)
straight from the file into its destination. Peak memory is therefore one tensor, for pickles exactly as for
safetensors. Both unpicklers only resolve the few globals these files use (numpy arrays/dtypes, Paddle's
checkpoint metadata classes), so loading an untrusted file cannot run code, and they never import paddle.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import struct
from dataclasses import dataclass, field
from typing import Any, Optional

import ml_dtypes
import numpy as np

# Paddle dtype names (metadata) -> numpy. bf16 has no numpy dtype: ml_dtypes provides one with the same bits.
PADDLE_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32), "float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float64": np.dtype(np.float64), "int64": np.dtype(np.int64), "int32": np.dtype(np.int32),
    "int16": np.dtype(np.int16), "int8": np.dtype(np.int8), "uint8": np.dtype(np.uint8),
    "uint16": np.dtype(np.uint16), "bool": np.dtype(np.bool_),
}
SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "U16": np.dtype(np.uint16),
    "BOOL": np.dtype(np.bool_),
}
SAFETENSORS_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
NAME_TABLE_KEY = "StructuredToParameterName@@"  # paddle.save's parameter-name table inside .pdparams/.distcp
_READ_BLOCK = 1 << 30  # one read() syscall moves at most ~2 GiB on Linux


class FormatError(ValueError):
    """A file is truncated, corrupt or not in a supported layout (the message names the file)."""


class CheckpointError(ValueError):
    """A checkpoint that is incomplete, inconsistent or cannot be written; the message names the tensor(s),
    file(s) or path. The one such error of the project: ckpt_tools and the engine's checkpoints both raise it."""


@dataclass(frozen=True)
class ArrayRef:
    """Where one stored array lives: raw C-order bytes at `offset` in `file` (or `inline` for tiny arrays)."""
    file: str
    offset: int
    shape: tuple[int, ...]
    dtype: np.dtype
    inline: Optional[bytes] = None

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


# ---- Paddle checkpoint metadata (mirrors of paddle.distributed.flex_checkpoint.dcp.metadata) -------------
@dataclass(frozen=True)
class LocalTensorMetadata:
    global_offset: tuple
    local_shape: tuple
    dtype: str
    global_shape: Optional[tuple] = None
    is_flattened: bool = False
    flattened_range: Optional[tuple] = None


@dataclass(frozen=True)
class LocalTensorIndex:
    tensor_key: str
    global_offset: tuple
    is_flattened: bool = False
    flattened_range: Optional[tuple] = None
    replica_id: Optional[int] = None
    local_shape: Optional[tuple] = None


@dataclass
class Metadata:
    state_dict_metadata: dict = field(default_factory=dict)
    storage_metadata: dict = field(default_factory=dict)
    flat_mapping: dict = field(default_factory=dict)


_METADATA_CLASSES = {c.__name__: c for c in (LocalTensorMetadata, LocalTensorIndex, Metadata)}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        # The module moved between Paddle versions (distributed.checkpoint -> flex_checkpoint.dcp).
        if module.startswith("paddle.distributed.") and module.endswith(".metadata") and name in _METADATA_CLASSES:
            return _METADATA_CLASSES[name]
        raise pickle.UnpicklingError(f"unexpected global {module}.{name}")


def load_metadata(path: str) -> Metadata:
    """Read a dist checkpoint's `{uid}.metadata` without importing paddle."""
    try:
        with open(path, "rb") as f:
            meta = _MetadataUnpickler(f).load()
    except (EOFError, pickle.UnpicklingError, AttributeError, TypeError, ValueError) as exc:
        raise FormatError(f"{path}: unreadable checkpoint metadata ({type(exc).__name__}: {exc})") from None
    if not isinstance(meta, Metadata) or not isinstance(meta.state_dict_metadata, dict):
        raise FormatError(f"{path}: not a Paddle dist-checkpoint metadata file")
    return meta


# ---- small state pickles (RNG states) -----------------------------------------------------------------------
NUMPY_ARRAY_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): np.core.multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): np.core.multiarray._reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _AllowListUnpickler(pickle.Unpickler):
    def __init__(self, f: io.BufferedReader, allowed: dict[tuple[str, str], Any]):
        super().__init__(f)
        self._allowed = allowed

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"unexpected global {module}.{name}") from None


def load_restricted_pickle(path: str | os.PathLike, allowed: dict[tuple[str, str], Any]) -> Any:
    """Unpickle a small state file resolving only the `allowed` globals ((module, name) -> object), so a crafted
    file cannot run code; anything else is a FormatError naming the file."""
    try:
        with open(path, "rb") as f:
            return _AllowListUnpickler(f, allowed).load()
    except (EOFError, pickle.UnpicklingError, AttributeError, TypeError, ValueError, IndexError) as exc:
        raise FormatError(f"{path}: refused to load ({type(exc).__name__}: {exc})") from None


# ---- lazy pickle index -------------------------------------------------------------------------------------
@dataclass
class _Payload:
    offset: int
    length: int


class _LazyArray:
    """Stands in for np.ndarray while unpickling: keeps shape/dtype and where the bytes are."""

    def __init__(self, *_args: Any):
        self.state: Optional[tuple] = None

    def __setstate__(self, state: tuple) -> None:
        self.state = state


def _reconstruct(cls: Any, shape: Any, typecode: Any) -> _LazyArray:
    return _LazyArray()


_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _IndexingUnpickler(pickle._Unpickler):  # the Python implementation: its opcode table can be extended
    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, f: io.BufferedReader, size: int):
        super().__init__(f)
        self._f, self._size, self._frame_start = f, size, 0

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _PICKLE_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"unexpected global {module}.{name} (not a tensor state dict)") from None

    def _load_frame(self) -> None:
        (size,) = struct.unpack("<Q", self.read(8))
        self._frame_start = self._f.tell()
        self._unframer.load_frame(size)

    def _skip_payload(self, length: int) -> None:
        frame = self._unframer.current_frame
        if frame is not None and frame.tell() < len(frame.getbuffer()):
            offset = self._frame_start + frame.tell()  # small payload inside the current frame
            frame.seek(length, io.SEEK_CUR)
        else:
            self._unframer.current_frame = None  # large payloads follow their frame, unframed
            offset = self._f.tell()
            self._f.seek(length, io.SEEK_CUR)
        if offset + length > self._size:
            raise FormatError(f"truncated: a {length}-byte tensor payload at byte {offset} ends beyond the "
                              f"file size {self._size}")
        self.append(_Payload(offset, length))

    def _load_binbytes(self) -> None:
        self._skip_payload(struct.unpack("<I", self.read(4))[0])

    def _load_binbytes8(self) -> None:
        self._skip_payload(struct.unpack("<Q", self.read(8))[0])

    dispatch[pickle.FRAME[0]] = _load_frame
    dispatch[pickle.BINBYTES[0]] = _load_binbytes
    dispatch[pickle.BINBYTES8[0]] = _load_binbytes8


def _array_ref(file: str, key: str, value: Any) -> ArrayRef:
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], _LazyArray):
        value = value[1]  # paddle.save of a non-state-dict stores tensors as (name, array)
    if not isinstance(value, _LazyArray) or value.state is None:
        raise FormatError(f"{file}: entry '{key}' is not a numpy array ({type(value).__name__})")
    _version, shape, dtype, fortran, data = value.state
    shape = tuple(int(s) for s in shape)
    if fortran and len(shape) > 1:
        raise FormatError(f"{file}: tensor '{key}' is stored in Fortran order, which is not supported")
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if isinstance(data, _Payload):
        if data.length != expected:
            raise FormatError(f"{file}: tensor '{key}' has {data.length} bytes, shape {list(shape)} {dtype} "
                              f"needs {expected}")
        return ArrayRef(file, data.offset, shape, dtype)
    if not isinstance(data, bytes) or len(data) != expected:
        raise FormatError(f"{file}: tensor '{key}' has malformed data")
    return ArrayRef(file, -1, shape, dtype, inline=data)


def index_pickle(file: str) -> dict[str, ArrayRef]:
    """Tensor name -> ArrayRef for a `paddle.save`d state dict, reading no tensor data."""
    size = os.path.getsize(file)
    try:
        with open(file, "rb") as f:
            obj = _IndexingUnpickler(f, size).load()
    except FormatError as exc:
        raise FormatError(f"{file}: {exc}") from None
    except (EOFError, pickle.UnpicklingError, struct.error, ValueError, TypeError, IndexError) as exc:
        raise FormatError(f"{file}: truncated or not a Paddle state-dict pickle ({type(exc).__name__}: {exc})") \
            from None
    if not isinstance(obj, dict):
        raise FormatError(f"{file}: expected a pickled dict of tensors, got {type(obj).__name__}")
    if "UnpackBigParamInfor@@" in obj:
        raise FormatError(f"{file}: saved with pickle protocol 2/3 (tensors split in parts); re-save with protocol 4")
    return {k: _array_ref(file, k, v) for k, v in obj.items() if k != NAME_TABLE_KEY}


def index_safetensors(file: str) -> dict[str, ArrayRef]:
    """Tensor name -> ArrayRef from a safetensors header (checked against the file size)."""
    size = os.path.getsize(file)
    try:
        with open(file, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                raise FormatError(f"truncated: header length {header_len} exceeds the file size {size}")
            header = json.loads(f.read(header_len))
    except (struct.error, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{file}: truncated or not a safetensors file ({exc})") from None
    except FormatError as exc:
        raise FormatError(f"{file}: {exc}") from None
    header.pop("__metadata__", None)
    base, refs = 8 + header_len, {}
    for name, info in header.items():
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise FormatError(f"{file}: tensor '{name}' has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        ref = ArrayRef(file, base + begin, tuple(info["shape"]), SAFETENSORS_DTYPES[info["dtype"]])
        if end - begin != ref.nbytes:
            raise FormatError(f"{file}: tensor '{name}' has {end - begin} bytes, its shape needs {ref.nbytes}")
        if base + end > size:
            raise FormatError(f"{file}: truncated: tensor '{name}' ends at byte {base + end}, file has {size}")
        refs[name] = ref
    return refs


def index_file(file: str) -> dict[str, ArrayRef]:
    return index_safetensors(file) if file.endswith(".safetensors") else index_pickle(file)


# ---- reading ---------------------------------------------------------------------------------------------
def read_bytes_into(f: io.RawIOBase, offset: int, dest: np.ndarray) -> None:
    """Fill the C-contiguous `dest` with the bytes at `offset` of the unbuffered file `f`."""
    view = memoryview(dest.reshape(-1).view(np.uint8))
    f.seek(offset)
    done = 0
    while done < len(view):
        n = f.readinto(view[done:done + _READ_BLOCK])
        if not n:
            raise FormatError(f"{f.name}: truncated: wanted {len(view)} bytes at byte {offset}, got {done}")
        done += n


def read_ref(ref: ArrayRef) -> np.ndarray:
    """Materialise one stored array (a fresh, writable array; nothing else of the file is read)."""
    out = np.empty(ref.shape, dtype=ref.dtype)
    if ref.inline is not None:
        out[...] = np.frombuffer(ref.inline, dtype=ref.dtype).reshape(ref.shape)
        return out
    with open(ref.file, "rb", buffering=0) as f:
        read_bytes_into(f, ref.offset, out)
    return out


def read_ref_slice(ref: ArrayRef, dim: int, start: int, stop: int) -> np.ndarray:
    """Materialise `array[..., start:stop, ...]` (the range on `dim`) of one stored array, reading only the bytes
    it needs: one contiguous read for a range of rows, row blocks through short-lived memory maps otherwise (so
    at most one block of the file is mapped at a time)."""
    shape = list(ref.shape)
    if not 0 <= start <= stop <= shape[dim]:
        raise ValueError(f"{ref.file}: slice {start}:{stop} outside dim {dim} of shape {shape}")
    out_shape = shape[:dim] + [stop - start] + shape[dim + 1:]
    if ref.inline is not None:
        full = np.frombuffer(ref.inline, dtype=ref.dtype).reshape(shape)
        return np.ascontiguousarray(full[(slice(None),) * dim + (slice(start, stop),)])
    out = np.empty(out_shape, dtype=ref.dtype)
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * ref.dtype.itemsize
    if dim == 0:
        with open(ref.file, "rb", buffering=0) as f:
            read_bytes_into(f, ref.offset + start * row_bytes, out)
        return out
    rows_per_block = max(1, _READ_BLOCK // 16 // max(row_bytes, 1))
    inner = (slice(None),) * (dim - 1) + (slice(start, stop),)
    for first in range(0, shape[0], rows_per_block):
        rows = min(rows_per_block, shape[0] - first)
        block = np.memmap(ref.file, dtype=ref.dtype, mode="r", offset=ref.offset + first * row_bytes,
                          shape=(rows, *shape[1:]))
        out[first:first + rows] = block[(slice(None),) + inner]
        del block
    return out
