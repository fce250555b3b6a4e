"""A byte-offset index of an annotation file, built once and cached keyed by the file's content, so a process
reads one record at a time instead of holding millions as Python objects.

`index_annotation(path)` returns `AnnotationIndex`: `spans` int64 [n, 2] (start, end byte of each record in `data_path`,
memory-mapped, so every rank shares the page cache) and `record(i)`. A UTF-8 JSONL file is indexed in place; a JSON
list (or UTF-16/32 text) is written once as a normalised UTF-8 JSONL copy beside the index. The cache lives in
`.qwen2vl-ap-index/` next to the annotation file, or under the temp directory when that is not writable; its file
names carry a hash of the annotation's bytes, so an edited file is re-indexed and a copied one is not.
`validation_cache(index, key)` stores what the parent's validation found (valid mask, skip reasons, counts), so the
workers and later runs start from it instead of parsing every record again; `save_lengths` / `load_lengths` store
each record's probed token counts and media counts (SFTDataset.index_lengths), keyed by the content and by
everything that changes a probe, so the ranks plan global batches without probing a sample.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Union

import numpy as np

from autoparallel.data.annotation_file import decode_text, detect_encoding, parse_json_values
from autoparallel.data.schema import DataError

INDEX_VERSION = 1
_CHUNK = 8 << 20
SPAN_SLICE = 1 << 16  # records whose spans `AnnotationIndex.records` reads at once


@dataclass
class AnnotationIndex:
    source: str  # the annotation file named in messages
    data_path: str  # the UTF-8 JSONL file the spans point into
    spans: np.ndarray  # int64 [n, 2], memory-mapped
    key: str  # content hash (+ index version)
    cache_dir: str

    def __len__(self) -> int:
        return len(self.spans)

    _data: Optional[mmap.mmap] = None  # opened on first read (after a fork, each process maps it itself)

    def __getstate__(self) -> dict:  # a mapping does not pickle; the receiving process maps the file again
        return {**self.__dict__, "_data": None}

    def record(self, i: int) -> Any:
        start, end = self.spans[i].tolist()
        return self._decode(i, start, self._bytes()[start:end])

    def records(self) -> Iterator[Any]:
        """Every record in order, in one pass (validation). The spans are turned into Python numbers a slice at a
        time: all at once they would cost the parent memory in proportion to the records."""
        data = self._bytes()
        for base in range(0, len(self.spans), SPAN_SLICE):
            for i, (start, end) in enumerate(self.spans[base:base + SPAN_SLICE].tolist(), base):
                yield self._decode(i, start, data[start:end])

    def _bytes(self) -> Union[mmap.mmap, bytes]:
        if self._data is None:
            with open(self.data_path, "rb") as f:
                self._data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.fstat(f.fileno()).st_size \
                    else b""
        return self._data

    def _decode(self, i: int, start: int, raw: bytes) -> Any:
        try:
            return json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            return DataError(self.source, i, f"text is not valid UTF-8 (byte 0x{raw[e.start]:02x}); save the "
                                             "annotation file as UTF-8", kind="invalid text")
        except json.JSONDecodeError as e:
            return DataError(self.source, i, f"invalid JSON{self._line(start)}: {e}", kind="invalid JSON")

    def _line(self, start: int) -> str:
        """' on line N' of the annotation file itself (its normalised copy has no lines the user knows)."""
        if self.data_path != self.source:
            return ""
        with open(self.data_path, "rb") as f:
            newlines = f.read(start).count(b"\n")
        return f" on line {newlines + 1}"


def _content_key(path: str) -> str:
    digest = hashlib.blake2b(digest_size=12)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return f"v{INDEX_VERSION}-{digest.hexdigest()}"


def _cache_dir(path: str) -> str:
    beside = os.path.join(os.path.dirname(os.path.abspath(path)), ".qwen2vl-ap-index")
    try:
        os.makedirs(beside, exist_ok=True)
        if os.access(beside, os.W_OK):
            return beside
    except OSError:
        pass
    fallback = os.path.join(tempfile.gettempdir(), "qwen2vl-ap-index")
    os.makedirs(fallback, exist_ok=True)
    return fallback


def _save(array: np.ndarray, path: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp.npy"
    np.save(tmp, array)
    os.replace(tmp, path)  # atomic: ranks building the same index at once never read half of it


_SPACE = np.zeros(256, bool)
_SPACE[list(b" \t\n\r\x0b\x0c")] = True  # what bytes.strip() strips


def _line_spans(path: str) -> np.ndarray:
    """(start, end) of every non-blank line of a UTF-8 file (end excludes the newline; a BOM is skipped). Found
    with numpy a chunk at a time: a Python object per line would cost the parent memory in proportion to the
    records."""
    starts, ends = [], []
    line_start, line_has_text, offset = 0, False, 0  # the line running into the next chunk
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            data = np.frombuffer(chunk, np.uint8)
            newlines = np.flatnonzero(data == 10)
            pieces = np.concatenate([[0], newlines + 1])  # each piece ends with its newline but the last
            pieces = pieces[pieces < len(data)]
            has_text = np.logical_or.reduceat(~_SPACE[data], pieces) if len(pieces) else np.zeros(0, bool)
            if len(newlines):
                first = has_text[0] or line_has_text
                text = np.concatenate([[first], has_text[1:len(newlines)]])
                line_starts = np.concatenate([[line_start], offset + newlines[:-1] + 1])
                starts.append(line_starts[text])
                ends.append((offset + newlines)[text])
                line_start, line_has_text = offset + int(newlines[-1]) + 1, False
            if len(pieces) > len(newlines):  # text after the chunk's last newline
                line_has_text = line_has_text or bool(has_text[-1])
            offset += len(data)
    if line_has_text:
        starts.append(np.asarray([line_start]))
        ends.append(np.asarray([offset]))
    spans = np.stack([np.concatenate(starts or [np.zeros(0)]), np.concatenate(ends or [np.zeros(0)])], 1)
    spans = spans.astype(np.int64)
    if len(spans) and spans[0, 0] == 0:
        with open(path, "rb") as f:
            if f.read(3) == b"\xef\xbb\xbf":
                spans[0, 0] = 3
    return spans


def _is_utf8_jsonl(path: str) -> bool:
    """UTF-8 text whose first non-blank line is one whole JSON object (else: a JSON list, a pretty-printed
    object or UTF-16/32, normalised into a copy)."""
    with open(path, "rb") as f:
        if not detect_encoding(f.read(4)).startswith("utf-8"):
            return False
        f.seek(0)
        for line in f:
            if line.strip():
                try:
                    return isinstance(json.loads(line.decode("utf-8-sig", "surrogateescape")), dict)
                except json.JSONDecodeError:
                    return False
    return False


def index_annotation(path: str) -> AnnotationIndex:
    """The cached index of an annotation file (built on first use)."""
    key, cache = _content_key(path), _cache_dir(path)
    spans_path = os.path.join(cache, f"{key}.spans.npy")
    copy_path = os.path.join(cache, f"{key}.jsonl")
    data_path = path if _is_utf8_jsonl(path) else copy_path
    if not os.path.exists(spans_path):
        if data_path == copy_path:
            with open(path, "rb") as f:
                text, _ = decode_text(f.read(), path)
            records, _ = parse_json_values(text, path)
            records = [records] if isinstance(records, dict) else records
            if not isinstance(records, list):
                raise DataError(path, None, f"expected a JSON list of records or JSONL, got a JSON "
                                            f"{type(records).__name__}")
            tmp = f"{copy_path}.{os.getpid()}.tmp"
            # surrogateescape writes bytes that were not UTF-8 back as they were: record(i) names them
            with open(tmp, "w", encoding="utf-8", errors="surrogateescape") as out:
                for record in records:  # invalid JSONL lines stay invalid lines
                    out.write((record.reason if isinstance(record, DataError) else
                               json.dumps(record, ensure_ascii=False)) + "\n")
            os.replace(tmp, copy_path)
        _save(_line_spans(data_path), spans_path)
    spans = np.load(spans_path, mmap_mode="r").view(np.ndarray)  # still file-backed; plain indexing is faster
    return AnnotationIndex(path, data_path, spans, key, cache)


@dataclass
class Validation:
    """What validating every record of an index under one (format, root) found."""

    valid: np.ndarray  # bool [n]
    errors: list[tuple[int, str, str]]  # (record index, reason, kind) of the invalid ones
    added_placeholders: int
    unread_keys: dict[str, int]
    own_system: int  # records carrying their own system prompt
    missing: list[tuple[int, str, str]]  # (record index, reason, path) of valid records with a missing media file


def validation_path(index: AnnotationIndex, setting: str) -> str:
    digest = hashlib.blake2b(setting.encode(), digest_size=8).hexdigest()
    return os.path.join(index.cache_dir, f"{index.key}.valid-{digest}")


def load_validation(index: AnnotationIndex, setting: str) -> Optional[Validation]:
    base = validation_path(index, setting)
    if not (os.path.exists(base + ".npy") and os.path.exists(base + ".json")):
        return None
    with open(base + ".json", encoding="utf-8") as f:
        meta = json.load(f)
    return Validation(np.load(base + ".npy", mmap_mode="r"), [tuple(e) for e in meta["errors"]],
                      meta["added_placeholders"], meta["unread_keys"], meta["own_system"],
                      [tuple(m) for m in meta["missing"]])


def save_validation(index: AnnotationIndex, setting: str, found: Validation) -> None:
    base = validation_path(index, setting)
    meta = {"errors": found.errors, "added_placeholders": found.added_placeholders,
            "unread_keys": found.unread_keys, "own_system": found.own_system, "missing": found.missing}
    tmp = f"{base}.{os.getpid()}.tmp.json"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(meta, f)
    _save(found.valid, base + ".npy")
    os.replace(tmp, base + ".json")  # written last: its presence means the mask is complete


def lengths_path(index: AnnotationIndex, setting: str) -> str:
    """The length table of an index under one probing setting (everything that changes a sample's tokens)."""
    digest = hashlib.blake2b(setting.encode(), digest_size=8).hexdigest()
    return os.path.join(index.cache_dir, f"{index.key}.lengths-{digest}.npy")


def load_lengths(index: AnnotationIndex, setting: str) -> Optional[np.ndarray]:
    """int32 [n, k] per record of the annotation (dataset.py LENGTH_COLUMNS), memory-mapped; None when not built."""
    path = lengths_path(index, setting)
    return np.load(path, mmap_mode="r").view(np.ndarray) if os.path.exists(path) else None


def save_lengths(index: AnnotationIndex, setting: str, table: np.ndarray) -> None:
    _save(table, lengths_path(index, setting))
