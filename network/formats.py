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
import math
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
        return math.prod(self.shape)  # Python ints: a crafted shape cannot wrap around as np.int64 would

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
        in_frame = frame is not None and frame.tell() < len(frame.getbuffer())
        # a small payload sits inside the current frame; large payloads follow their frame, unframed
        offset = self._frame_start + frame.tell() if in_frame else self._f.tell()
        if offset + length > self._size:
            raise FormatError(f"truncated: a {length}-byte tensor payload at byte {offset} ends beyond the "
                              f"file size {self._size}")
        if in_frame:
            # CPython's C unpickler treats frames as read-ahead hints and reads a payload across a frame's end;
            # seeking only to the frame's end would parse the payload's tail as opcodes (a file that indexes as
            # one thing and unpickles as another), so a payload must end inside its frame.
            if frame.tell() + length > len(frame.getbuffer()):
                raise FormatError(f"a {length}-byte payload at byte {offset} runs past the end of its pickle "
                                  f"frame (crafted or corrupt)")
            frame.seek(length, io.SEEK_CUR)
        else:
            self._unframer.current_frame = None
            self._f.seek(length, io.SEEK_CUR)
        self.append(_Payload(offset, length))

    def trailing_bytes(self) -> int:
        """Bytes after the STOP opcode: paddle.save writes none, so any are crafted (or another file appended)."""
        frame = self._unframer.current_frame
        unread = len(frame.getbuffer()) - frame.tell() if frame is not None else 0
        return unread + self._size - self._f.tell()

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
    if any(s < 0 for s in shape):
        raise FormatError(f"{file}: tensor '{key}' has a negative dimension in its shape {list(shape)}")
    if fortran and len(shape) > 1:
        raise FormatError(f"{file}: tensor '{key}' is stored in Fortran order, which is not supported")
    expected = math.prod(shape) * dtype.itemsize
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
            unpickler = _IndexingUnpickler(f, size)
            obj = unpickler.load()
            trailing = unpickler.trailing_bytes()
    except FormatError as exc:
        raise FormatError(f"{file}: {exc}") from None
    except (EOFError, pickle.UnpicklingError, struct.error, ValueError, TypeError, IndexError) as exc:
        raise FormatError(f"{file}: truncated or not a Paddle state-dict pickle ({type(exc).__name__}: {exc})") \
            from None
    if trailing:
        raise FormatError(f"{file}: {trailing} bytes follow the end of the pickle (crafted or corrupt)")
    if not isinstance(obj, dict):
        raise FormatError(f"{file}: expected a pickled dict of tensors, got {type(obj).__name__}")
    if "UnpackBigParamInfor@@" in obj:
        raise FormatError(f"{file}: saved with pickle protocol 2/3 (tensors split in parts); re-save with protocol 4")
    return {k: _array_ref(file, k, v) for k, v in obj.items() if k != NAME_TABLE_KEY}


def _safetensors_entry(file: str, name: str, info: Any, base: int) -> tuple[ArrayRef, int, int]:
    """One header entry checked against the format (dtype known, shape of non-negative ints, offsets matching
    the shape's byte count); returns the reference and its [begin, end) data offsets."""
    if not isinstance(info, dict):
        raise FormatError(f"tensor '{name}': header entry is a {type(info).__name__}, not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise FormatError(f"tensor '{name}': missing or unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise FormatError(f"tensor '{name}': shape {shape!r} is not a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise FormatError(f"tensor '{name}': data_offsets {offsets!r} are not [begin, end] with 0 <= begin <= end")
    begin, end = offsets
    ref = ArrayRef(file, offset=base + begin, shape=tuple(shape), dtype=SAFETENSORS_DTYPES[dtype])
    if end - begin != ref.nbytes:
        raise FormatError(f"tensor '{name}' has {end - begin} bytes, its shape {shape} {dtype} needs {ref.nbytes}")
    return ref, begin, end


def index_safetensors(file: str) -> dict[str, ArrayRef]:
    """Tensor name -> ArrayRef from a safetensors header, validated in full: every entry well-formed, every
    tensor inside the file and no two tensors sharing bytes (so a crafted header cannot make a tensor read the
    header or another tensor's data)."""
    size = os.path.getsize(file)
    try:
        with open(file, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                raise FormatError(f"truncated: header length {header_len} exceeds the file size {size}")
            header = json.loads(f.read(header_len))
        if not isinstance(header, dict):
            raise FormatError(f"the header is a JSON {type(header).__name__}, not an object")
        header.pop("__metadata__", None)
        base, refs, spans = 8 + header_len, {}, []
        for name, info in header.items():
            ref, begin, end = _safetensors_entry(file, name, info, base)
            if base + end > size:
                raise FormatError(f"truncated: tensor '{name}' ends at byte {base + end}, the file has {size}")
            refs[name] = ref
            spans.append((begin, end, name))
    except FormatError as exc:
        raise FormatError(f"{file}: {exc}") from None
    except (struct.error, ValueError, TypeError, KeyError, RecursionError) as exc:  # JSON errors are ValueErrors
        raise FormatError(f"{file}: truncated or not a safetensors file ({type(exc).__name__}: {exc})") from None
    spans.sort()
    for (_, prev_end, prev), (begin, _, name) in zip(spans, spans[1:]):
        if begin < prev_end:
            raise FormatError(f"{file}: tensors '{prev}' and '{name}' overlap (data_offsets share bytes)")
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
