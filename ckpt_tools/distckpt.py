"""A Paddle dist checkpoint (`dist.save_state_dict` output) opened for lazy, per-tensor reading.

Layout: `{uid}.metadata` (pickled `Metadata`: per tensor the list of saved slices with global offset, local
shape and dtype; per slice the file holding it) and one `{rank}_{uid}.distcp` (pickle) or
`{rank}_{uid}.safetensors` file per rank. Replicated tensors (dp) are deduplicated by Paddle at save time, so
every slice is stored once; mp Shard(d) and sharding-stage-3 Shard(0) are plain slices (uneven sizes split as
`ceil` chunks), `is_flattened` slices (ShardedWeight) hold a flat element range of their block.

Opening indexes every data file (no tensor data is read) and checks the checkpoint: files present and whole,
every slice found with its shape, every element of every tensor covered exactly once. `read(key)` assembles
one global tensor by copying each slice straight from its file into place.
"""
from __future__ import annotations

import math
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np

from network.formats import (CheckpointError, PADDLE_DTYPES, ArrayRef, FormatError, Metadata, index_file, load_metadata,
                                read_bytes_into)

DIST_DIR = "dist_ckpt"
_METADATA_RE = re.compile(r"^(\d+)\.metadata$")
_CHUNK_BYTES = 64 << 20  # staging buffer for slices that are not contiguous in the global tensor
_MAX_OPEN_FILES = 64
# Paddle optimizer state keys: `{param.name}_{accumulator}_{n}` and master weights.
OPTIMIZER_KEY = re.compile(r"(_(moment1|moment2|moment2_max|beta1_pow_acc|beta2_pow_acc|velocity|"
                           r"mean_square|mean_grad|inf_norm|squared)_\d+$)|^master_weights\.|^optimizer\.")


Box = tuple[tuple[int, ...], tuple[int, ...]]  # (global offset, shape)


@dataclass
class Slice:
    """One saved piece of a tensor: a box of the global tensor, or a flat element range of a box."""
    offset: tuple[int, ...]
    shape: tuple[int, ...]
    file: str  # file name inside the checkpoint directory
    flat_range: Optional[tuple[int, int]] = None
    ref: Optional[ArrayRef] = None

    def pieces(self) -> list[tuple[int, Box]]:
        """(first element in the stored data, global box) runs that together make up this slice."""
        if self.flat_range is None:
            return [(0, (self.offset, self.shape))]
        start, stop = self.flat_range
        return [(s - start, (tuple(o + b for o, b in zip(self.offset, off)), shp))
                for s, (off, shp) in _flat_range_boxes(self.shape, start, stop)]

    def describe(self) -> str:
        where = f"offset {list(self.offset)} shape {list(self.shape)}"
        if self.flat_range:
            where += f" elements {list(self.flat_range)}"
        return f"{where} in {self.file}"


@dataclass
class TensorEntry:
    key: str
    shape: tuple[int, ...]
    dtype: str  # Paddle dtype name
    slices: list[Slice] = field(default_factory=list)

    @property
    def np_dtype(self) -> np.dtype:
        return PADDLE_DTYPES[self.dtype]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.np_dtype.itemsize


def _flat_range_boxes(shape: tuple[int, ...], start: int, stop: int) -> list[tuple[int, Box]]:
    """Split elements [start, stop) of a C-order block into boxes; returns (first element, box) in order."""
    if start >= stop:
        return []
    if len(shape) <= 1:
        return [(start, ((start,), (stop - start,)))]
    inner = math.prod(shape[1:])
    first, last = start // inner, (stop - 1) // inner

    def nested(row: int, a: int, b: int) -> list[tuple[int, Box]]:
        return [(row * inner + s, ((row, *o), (1, *shp))) for s, (o, shp) in _flat_range_boxes(shape[1:], a, b)]

    if first == last:
        return nested(first, start - first * inner, stop - first * inner)
    out = []
    if start % inner:
        out += nested(first, start % inner, inner)
        first += 1
    full_end = stop // inner
    if full_end > first:
        out.append((first * inner, ((first,) + (0,) * (len(shape) - 1), (full_end - first, *shape[1:]))))
    if stop % inner:
        out += nested(full_end, 0, stop % inner)
    return out


def _overlap(a: Box, b: Box) -> bool:
    return all(ao < bo + bs and bo < ao + as_ for ao, as_, bo, bs in zip(a[0], a[1], b[0], b[1]))


def resolve_dist_dir(path: str) -> str:
    """Accept `checkpoint-N` or `checkpoint-N/dist_ckpt` (or any directory holding a `.metadata`)."""
    if os.path.isdir(os.path.join(path, DIST_DIR)):
        return os.path.join(path, DIST_DIR)
    return path


def is_dist_checkpoint(path: str) -> bool:
    path = resolve_dist_dir(path)
    return os.path.isdir(path) and any(_METADATA_RE.match(n) for n in os.listdir(path))


class DistCheckpoint:
    """Open with `DistCheckpoint(path)`; `problems` lists everything wrong, `check()` raises on the first ones."""

    def __init__(self, path: str, unique_id: Optional[int] = None):
        self.path = resolve_dist_dir(path)
        if not os.path.isdir(self.path):
            raise CheckpointError(f"{path}: no such checkpoint directory")
        uids = sorted(int(m.group(1)) for n in os.listdir(self.path) if (m := _METADATA_RE.match(n)))
        if not uids:
            raise CheckpointError(f"{self.path}: no *.metadata file (not a Paddle dist checkpoint)")
        if unique_id is not None and unique_id not in uids:
            raise CheckpointError(f"{self.path}: no {unique_id}.metadata (found ids {uids})")
        self.unique_id = uids[-1] if unique_id is None else unique_id  # newest, as Paddle's loader picks
        self.metadata_file = os.path.join(self.path, f"{self.unique_id}.metadata")
        try:
            self.metadata: Metadata = load_metadata(self.metadata_file)
        except FormatError as exc:
            raise CheckpointError(str(exc)) from None
        self.problems: list[str] = []
        self.file_refs: dict[str, dict[str, ArrayRef]] = {}
        self.tensors: OrderedDict[str, TensorEntry] = OrderedDict()
        self._handles: OrderedDict[str, object] = OrderedDict()
        self._build()

    # ---- indexing and validation -------------------------------------------------------------------------
    def _build(self) -> None:
        by_slice: dict[tuple, list[tuple[int, str]]] = {}
        for idx, file in self.metadata.storage_metadata.items():
            slot = (idx.tensor_key, tuple(idx.global_offset), idx.flattened_range)
            by_slice.setdefault(slot, []).append((idx.replica_id or 0, file))
        needed = sorted({f for files in by_slice.values() for _, f in files})
        for file in needed:
            full = os.path.join(self.path, file)
            owners = sorted({k[0] for k, files in by_slice.items() if any(f == file for _, f in files)})
            holds = f"(holds slices of {len(owners)} tensors, e.g. '{owners[0]}')"
            if not os.path.isfile(full):
                self.problems.append(f"missing file {file} in {self.path} {holds}")
                continue
            try:
                self.file_refs[file] = index_file(full)
            except FormatError as exc:
                self.problems.append(f"{exc} {holds}")
        for key, metas in self.metadata.state_dict_metadata.items():
            self._add_tensor(key, metas, by_slice)

    def _add_tensor(self, key: str, metas: list, by_slice: dict) -> None:
        first = metas[0]
        if first.dtype not in PADDLE_DTYPES:
            self.problems.append(f"tensor '{key}': unsupported dtype {first.dtype}")
            return
        shape = tuple(first.global_shape) if first.global_shape is not None else tuple(
            max(m.global_offset[d] + m.local_shape[d] for m in metas) for d in range(len(first.local_shape)))
        entry = TensorEntry(key, shape, first.dtype)
        self.tensors[key] = entry
        for m in metas:
            flat = tuple(m.flattened_range) if m.is_flattened and m.flattened_range is not None else None
            sl = Slice(tuple(m.global_offset), tuple(m.local_shape), "?", flat)
            entry.slices.append(sl)
            if m.dtype != first.dtype or (m.global_shape is not None and tuple(m.global_shape) != shape):
                self.problems.append(f"tensor '{key}': slice {list(sl.offset)} says {m.dtype} "
                                     f"{list(m.global_shape or [])}, another says {first.dtype} {list(shape)}")
            files = sorted(by_slice.get((key, sl.offset, flat), []))
            if not files:
                self.problems.append(f"tensor '{key}': slice at offset {list(sl.offset)} has no storage entry in "
                                     f"{os.path.basename(self.metadata_file)}")
                continue
            sl.file = files[0][1]
            refs = self.file_refs.get(sl.file)
            if refs is None:
                continue  # the file's own problem is reported already
            ref = refs.get(key)
            want = (flat[1] - flat[0],) if flat else sl.shape
            if ref is None:
                self.problems.append(f"tensor '{key}': slice {sl.describe()} is listed in the metadata but absent "
                                     f"from the file")
            elif ref.numel != math.prod(want) or (not flat and ref.shape != sl.shape):
                self.problems.append(f"tensor '{key}': {sl.file} stores shape {list(ref.shape)}, the metadata "
                                     f"expects {list(want)} at offset {list(sl.offset)}")
            elif ref.dtype.itemsize != entry.np_dtype.itemsize:
                self.problems.append(f"tensor '{key}': {sl.file} stores {ref.dtype}, the metadata says {entry.dtype}")
            else:
                sl.ref = ref
        self._check_coverage(entry)

    def _check_coverage(self, entry: TensorEntry) -> None:
        boxes = [(box, sl) for sl in entry.slices for _, box in sl.pieces()]
        for (off, shp), sl in boxes:
            if len(off) != len(entry.shape) or any(o < 0 or o + s > g for o, s, g in zip(off, shp, entry.shape)):
                self.problems.append(f"tensor '{entry.key}' {list(entry.shape)}: slice {sl.describe()} lies outside "
                                     f"the tensor")
                return
        for i, (a, sa) in enumerate(boxes):
            for b, sb in boxes[i + 1:]:
                if sa is not sb and _overlap(a, b):
                    self.problems.append(f"tensor '{entry.key}': overlapping slices {sa.describe()} and "
                                         f"{sb.describe()}")
                    return
        covered = sum(math.prod(shp) for (_, shp), _ in boxes)
        total = math.prod(entry.shape)
        if covered != total:
            self.problems.append(f"tensor '{entry.key}' {list(entry.shape)}: slices cover {covered} of {total} "
                                 f"elements (missing slices; saved pieces: "
                                 f"{'; '.join(sl.describe() for sl in entry.slices)})")

    def check(self) -> None:
        if len(self.problems) == 1:
            raise CheckpointError(f"checkpoint {self.path} is incomplete or inconsistent: {self.problems[0]}")
        if self.problems:
            shown = "\n  ".join(self.problems[:20])
            more = f"\n  ... and {len(self.problems) - 20} more" if len(self.problems) > 20 else ""
            raise CheckpointError(f"checkpoint {self.path} is incomplete or inconsistent:\n  {shown}{more}")

    # ---- reading -------------------------------------------------------------------------------------------
    def keys(self) -> Iterator[str]:
        return iter(self.tensors)

    def _handle(self, file: str):
        f = self._handles.pop(file, None)
        if f is None:
            if len(self._handles) >= _MAX_OPEN_FILES:
                self._handles.popitem(last=False)[1].close()
            f = open(os.path.join(self.path, file), "rb", buffering=0)
        self._handles[file] = f
        return f

    def read(self, key: str) -> np.ndarray:
        """The global tensor `key` (dtype per metadata; bf16 as ml_dtypes.bfloat16)."""
        entry = self.tensors[key]
        out = np.empty(entry.shape, dtype=entry.np_dtype)
        for sl in entry.slices:
            if sl.ref is None:
                raise CheckpointError(f"tensor '{key}': slice {sl.describe()} is unreadable")
            for first, (off, shp) in sl.pieces():
                dest = out[tuple(slice(o, o + s) for o, s in zip(off, shp))]
                self._copy(key, sl, first * entry.np_dtype.itemsize, dest)
        return out

    def _copy(self, key: str, sl: Slice, byte_start: int, dest: np.ndarray) -> None:
        ref = sl.ref
        if ref.inline is not None:
            data = np.frombuffer(ref.inline, dtype=dest.dtype)
            dest[...] = data[byte_start // dest.itemsize:][:dest.size].reshape(dest.shape)
            return
        f = self._handle(sl.file)
        try:
            self._copy_region(f, ref.offset + byte_start, dest)
        except FormatError as exc:
            raise CheckpointError(f"tensor '{key}': {exc}") from None

    def _copy_region(self, f, pos: int, dest: np.ndarray) -> None:
        if dest.flags.c_contiguous:
            read_bytes_into(f, pos, dest)
            return
        # e.g. a Shard(1) slice: rows are strided in the global tensor; stage a bounded number of rows.
        row_bytes = dest[0].size * dest.itemsize
        if row_bytes > _CHUNK_BYTES:
            for i in range(dest.shape[0]):
                self._copy_region(f, pos + i * row_bytes, dest[i])
            return
        rows = max(1, _CHUNK_BYTES // max(row_bytes, 1))
        for r in range(0, dest.shape[0], rows):
            part = dest[r:r + rows]
            tmp = np.empty(part.shape, dtype=dest.dtype)
            read_bytes_into(f, pos + r * row_bytes, tmp)
            part[...] = tmp

    def close(self) -> None:
        while self._handles:
            self._handles.popitem()[1].close()

    def __enter__(self) -> "DistCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- selection -----------------------------------------------------------------------------------------
    def split_keys(self, prefix: Optional[str] = None) -> tuple[list[str], list[str]]:
        """(model keys, optimizer keys). With `prefix`, model keys are those under `prefix.` (PaddleNLP's
        `{"model": ..., "optimizer": ...}` nesting); the prefix is stripped by the caller."""
        optim = [k for k in self.tensors if OPTIMIZER_KEY.search(k)]
        model = [k for k in self.tensors if not OPTIMIZER_KEY.search(k)
                 and (prefix is None or k.startswith(prefix + "."))]
        return model, optim
