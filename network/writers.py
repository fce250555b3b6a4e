"""Streaming weight writers: sharded safetensors and Paddle pickles (`.pdparams`) with an index.

All tensor names, shapes and dtypes are known before any data is written (from checkpoint metadata or file
headers), so shards and headers are planned up front and each tensor is then written straight to its file in
bounded chunks, transposed and cast on the way. Nothing but the tensor being written is held in memory.

`.pdparams` is written as the same pickle `paddle.save(state_dict)` produces (protocol 4: a dict of numpy
arrays, bf16 as uint16 bits, plus the `StructuredToParameterName@@` name table through which `paddle.load`
turns the arrays back into tensors), but opcode by opcode, so the dict never exists in memory.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from typing import BinaryIO, Optional

import ml_dtypes
import numpy as np

from network.formats import NAME_TABLE_KEY, SAFETENSORS_NAMES

DEFAULT_SHARD_BYTES = 5 * 10**9  # HF's default
_CHUNK_BYTES = 64 << 20
_TILE_ROWS = 64
_BF16 = np.dtype(ml_dtypes.bfloat16)


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]  # as written (after the transpose)
    dtype: np.dtype  # as written
    transpose: bool = False  # the array handed to `write` is 2-D and is written transposed

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def file_names(fmt: str, stem: str, count: int) -> tuple[list[str], Optional[str]]:
    """Shard file names and the index name (None for a single file), HF / PaddleNLP style."""
    ext = "safetensors" if fmt == "safetensors" else ("pdopt" if stem == "optimizer" else "pdparams")
    if count == 1:
        return [f"{stem}.{ext}"], None
    return [f"{stem}-{i:05d}-of-{count:05d}.{ext}" for i in range(1, count + 1)], f"{stem}.{ext}.index.json"


def _as_bytes(array: np.ndarray) -> memoryview:
    return memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))


def transpose_copy(array: np.ndarray) -> np.ndarray:
    """`np.ascontiguousarray(array.T)` of a 2-D array, copied in tiles of rows: one strided copy of a large
    weight is several times slower (it walks memory column by column)."""
    out = np.empty((array.shape[1], array.shape[0]), array.dtype)
    for i in range(0, array.shape[0], _TILE_ROWS):
        out[:, i:i + _TILE_ROWS] = array[i:i + _TILE_ROWS].T
    return out


def write_array(f: BinaryIO, array: np.ndarray, out_dtype: np.dtype, transpose: bool = False) -> None:
    """Write `array` (or `array.T`) in C order as `out_dtype`, converting at most ~64 MiB at a time."""
    chunk = max(1, _CHUNK_BYTES // max(array.itemsize, out_dtype.itemsize, 4))
    if transpose:
        rows = array.shape[0]
        step = max(1, chunk // max(rows, 1))
        buf = np.empty((min(step, array.shape[1]), rows), dtype=out_dtype)
        for j in range(0, array.shape[1], step):
            strip = array[:, j:j + step]
            out = buf[:strip.shape[1]]
            for i in range(0, rows, _TILE_ROWS):  # tiled: ~6x faster than one strided copy of the strip
                out[:, i:i + _TILE_ROWS] = strip[i:i + _TILE_ROWS].T
            f.write(_as_bytes(out))
        return
    flat = array.reshape(-1)
    for i in range(0, flat.size, chunk):
        part = flat[i:i + chunk]
        f.write(_as_bytes(part if part.dtype == out_dtype else part.astype(out_dtype)))


# ---- pickle opcodes ----------------------------------------------------------------------------------------
def _small(obj) -> bytes:
    """Pickle opcodes (no memo) for the small constants in numpy's array/dtype reduce tuples."""
    if obj is None:
        return b"N"
    if obj is True or obj is False:
        return b"\x88" if obj else b"\x89"
    if isinstance(obj, int):
        if 0 <= obj < 256:
            return b"K" + bytes([obj])
        if -(2**31) <= obj < 2**31:
            return b"J" + struct.pack("<i", obj)
        raw = obj.to_bytes((obj.bit_length() + 8) // 8, "little", signed=True)
        return b"\x8a" + bytes([len(raw)]) + raw
    if isinstance(obj, str):
        raw = obj.encode("utf-8")
        return (b"\x8c" + bytes([len(raw)]) if len(raw) < 256 else b"X" + struct.pack("<I", len(raw))) + raw
    if isinstance(obj, tuple):
        return b")" if not obj else b"(" + b"".join(_small(x) for x in obj) + b"t"
    raise TypeError(f"cannot pickle {type(obj).__name__} here")


def _pickle_array_head(shape: tuple[int, ...], dtype: np.dtype, nbytes: int) -> bytes:
    """Opcodes of `np.ndarray.__reduce__` up to the raw data (BINBYTES8 length header included)."""
    _, dtype_args, dtype_state = dtype.__reduce__()
    return (b"cnumpy.core.multiarray\n_reconstruct\n" b"cnumpy\nndarray\n" b"K\x00\x85" b"C\x01b" b"\x87R"
            b"(" + _small(1) + _small(tuple(int(s) for s in shape))
            + b"cnumpy\ndtype\n" + _small(dtype_args) + b"R" + _small(dtype_state) + b"b"
            + _small(False) + b"\x8e" + struct.pack("<Q", nbytes))


_PICKLE_ARRAY_TAIL = b"tb"  # close the state tuple, BUILD


class ShardedWriter:
    """Write the planned tensors, in plan order, into `fmt` files named after `stem` under `directory`."""

    def __init__(self, directory: str, fmt: str, stem: str, tensors: list[PlannedTensor],
                 shard_size: Optional[int] = None, hf_metadata: bool = True):
        if fmt not in ("safetensors", "paddle"):
            raise ValueError(f"format must be 'safetensors' or 'paddle', got {fmt!r}")
        self.directory, self.fmt, self.hf_metadata = directory, fmt, hf_metadata
        shards: list[list[PlannedTensor]] = [[]]
        size = 0
        for t in tensors:  # greedy in order, like HF; a tensor above the limit gets a shard of its own
            if shards[-1] and shard_size is not None and size + t.nbytes > shard_size:
                shards.append([])
                size = 0
            shards[-1].append(t)
            size += t.nbytes
        self.shards = shards
        self.names, self.index_name = file_names(fmt, stem, len(shards))
        self.total_bytes = sum(t.nbytes for t in tensors)
        self._order = [(i, t) for i, shard in enumerate(shards) for t in shard]
        self._next = 0
        self._file: Optional[BinaryIO] = None

    @property
    def files(self) -> list[str]:
        return self.names + ([self.index_name] if self.index_name else [])

    def write(self, name: str, array: np.ndarray) -> None:
        shard_no, planned = self._order[self._next]
        if name != planned.name:
            raise RuntimeError(f"writer expected '{planned.name}' next, got '{name}'")
        src_shape = tuple(reversed(array.shape)) if planned.transpose else tuple(array.shape)
        if src_shape != planned.shape:
            raise ValueError(f"'{name}': planned shape {list(planned.shape)}, got {list(src_shape)}")
        if self._file is None:
            self._open(shard_no)
        if self.fmt == "paddle":
            stored = np.dtype(np.uint16) if planned.dtype == _BF16 else planned.dtype  # Paddle's bf16 convention
            self._file.write(_small(name) + _pickle_array_head(planned.shape, stored, planned.nbytes))
        write_array(self._file, array, planned.dtype, planned.transpose)
        if self.fmt == "paddle":
            self._file.write(_PICKLE_ARRAY_TAIL + b"s")  # SETITEM into the top-level dict
        self._next += 1
        if self._next == len(self._order) or self._order[self._next][0] != shard_no:
            self._close(shard_no)

    def _open(self, shard_no: int) -> None:
        self._file = open(os.path.join(self.directory, self.names[shard_no]), "wb")
        if self.fmt == "paddle":
            self._file.write(b"\x80\x04}")  # PROTO 4, EMPTY_DICT
            return
        header: dict = {"__metadata__": {"format": "pt"}} if self.hf_metadata else {}
        offset = 0
        for t in self.shards[shard_no]:
            header[t.name] = {"dtype": SAFETENSORS_NAMES[t.dtype], "shape": list(t.shape),
                              "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # data section 8-byte aligned
        self._file.write(struct.pack("<Q", len(blob)) + blob)

    def _close(self, shard_no: int) -> None:
        if self.fmt == "paddle":
            table = b"".join(_small(t.name) * 2 + b"s" for t in self.shards[shard_no])
            self._file.write(_small(NAME_TABLE_KEY) + b"}" + table + b"s.")  # name table, SETITEM, STOP
        self._file.close()
        self._file = None

    def finish(self) -> list[str]:
        """Write the index (if sharded); returns the file names written."""
        if self._next != len(self._order):
            raise RuntimeError(f"writer finished after {self._next} of {len(self._order)} tensors")
        if self.index_name:
            weight_map = {t.name: self.names[i] for i, t in self._order}
            with open(os.path.join(self.directory, self.index_name), "w", encoding="utf-8") as f:
                json.dump({"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}, f, indent=2)
        return self.files

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
