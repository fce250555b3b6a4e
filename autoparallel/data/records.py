"""Meta files and annotation records of every supported format → validated `Conversation`s; the skip log.

Sources: a PaddleMIX meta JSON `{name: {"annotation": path, "repeat_time": float = 1, "root"?: dir,
"length"?: int}}` ("length" is informational), or LLaMA-Factory's `dataset_info.json` (entries with `file_name`,
`formatting`, `columns`, `tags`: llamafactory.py), from which `dataset` picks entries by name; `dataset` may also
name annotation files directly (ms-swift's `--dataset train.jsonl`). Relative annotation/root paths resolve against
the meta file's directory when they exist there (so a dataset folder can be moved as a whole), else against the
working directory (PaddleMIX's behaviour). A relative media path is used as given (working directory) when that
file exists, else under the entry's `root` (default for `file_name` entries and direct files: their directory, as
LLaMA-Factory's `dataset_dir`): PaddleMIX ignores `root` and its own meta files carry paths that already start
with it, while InternVL-style meta files give paths relative to `root`. When neither exists, the error names both.

`repeat_time` r: r < 1 keeps the first int(N * r) records of the file (PaddleMIX's `raw_data[:int(N * r)]`);
r >= 1 repeats the file floor(r) times plus a seeded sample (without replacement) of the fraction.

Record forms (a JSON list or JSONL, told apart by content: annotation_file.py), with format "auto":
- messages (PaddleMIX, OpenAI, ms-swift): `{"messages": [{"role": "system"|"user"|"assistant", "content": str or
  a content list (content_list.py)}], "images": [...], "videos": [...], "system"?: str}`
- conversations (InternVL/LLaVA, sharegpt): `{"conversations": [{"from": "system"|"human"|"gpt", "value": str}]
  (or role/content), "image" | "images": ..., "video" | "videos": ..., "system"?: str}`
- ms-swift `query`/`response`/`history` and alpaca `instruction`/`input`/`output` (swift.py);
or LLaMA-Factory's sharegpt/alpaca with the entry's columns and tags. Media references: media_refs.py (paths,
`file://`, `data:` URIs, base64, `{"bytes"|"path"}`; a video may be a list of frames).
A conversation is an optional system message, then user/assistant turns alternating, ending with an assistant
answer. A record-level `system` counts as the system message; both at once must agree. `<image>`/`<video>`
placeholders may appear in system and user messages, never in answers, and their counts must equal the numbers of
images/videos (used in order of appearance). A record with images (videos) and no placeholder at all gets one
`<image>\n` (`<video>\n`) per file prepended to its first user message, as PaddleMIX and InternVL do;
`Conversation.added_placeholders` counts them for the data report. Nothing is silently ignored: a record key no
reader uses is counted (`RecordStore.unread_keys`, one warning line), and one that looks like media or a system
prompt is an error, since training without it would quietly train on other data than the user's.
"""
from __future__ import annotations

import copy
import math
import os
import re
import threading
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from autoparallel.data.annotation_file import read_json_file
from autoparallel.data.content_list import flatten_content
from autoparallel.data.llamafactory import ENTRY_KEYS as LF_ENTRY_KEYS
from autoparallel.data.llamafactory import HUB_KEYS as LF_HUB_KEYS
from autoparallel.data.llamafactory import NOT_HONOURED as LF_NOT_HONOURED
from autoparallel.data.llamafactory import entry_format, read_alpaca, read_sharegpt
from autoparallel.data.media_refs import (
    DEFAULT_CACHE_DIR,
    VideoRef,
    local_media,
    local_video,
    media_candidates,
    resolve_media,
)
from autoparallel.data.record_index import (
    AnnotationIndex,
    Validation,
    index_annotation,
    load_validation,
    save_validation,
)
from autoparallel.data.schema import (
    IMAGE_PLACEHOLDER,
    VIDEO_PLACEHOLDER,
    DataError,
    ParsedRecord,
    RecordFormat,
)
from autoparallel.data.swift import ALPACA_KEYS, QUERY_KEYS, read_query_response
from autoparallel.data.swift import read_alpaca as read_swift_alpaca

__all__ = ["IMAGE_PLACEHOLDER", "VIDEO_PLACEHOLDER", "DataError", "media_candidates", "resolve_media"]

_ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}
_MEDIA_LIKE = re.compile(r"image|video|img|frame|picture|photo|audio", re.IGNORECASE)
PADDLEMIX_ENTRY_KEYS = ("annotation", "repeat_time", "root", "length")


class SkipLog:
    """Counts skipped records by kind, each bad record once (however often it is drawn), and keeps a few
    examples of each kind (thread-safe)."""

    MAX_EXAMPLES = 5

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}
        self._seen: set[tuple[str, Optional[int], str]] = set()
        self._lock = threading.Lock()

    def add(self, error: DataError) -> bool:
        """Record a skip; False when this record was already counted."""
        with self._lock:
            key = (error.file, error.index, error.kind)
            if key in self._seen:
                return False
            self._seen.add(key)
            self.counts[error.kind] += 1
            examples = self.examples.setdefault(error.kind, [])
            if len(examples) < self.MAX_EXAMPLES:
                examples.append(str(error))
            return True

    def entries(self) -> list[tuple[str, Optional[int], str]]:
        """(file, record index, kind) of every skipped record, for merging the logs of several ranks."""
        with self._lock:
            return sorted(self._seen, key=repr)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def report(self) -> dict[str, Any]:
        """{"total": n, "by_kind": {kind: n}, "examples": {kind: [message, ...]}}."""
        with self._lock:
            return {"total": self.total, "by_kind": dict(self.counts), "examples": dict(self.examples)}

    def summary(self) -> str:
        if not self.counts:
            return "no samples skipped"
        kinds = ", ".join(f"{kind}: {n}" for kind, n in sorted(self.counts.items()))
        return f"skipped {self.total} samples ({kinds}); e.g. " + "; ".join(
            v[0] for v in self.examples.values()
        )


@dataclass(frozen=True)
class DatasetSource:
    name: str
    annotation: str
    repeat_time: float = 1.0
    root: Optional[str] = None
    length: Optional[int] = None
    format: RecordFormat = RecordFormat()


@dataclass(frozen=True)
class Conversation:
    """One validated record: (user, answer) turns, resolved media paths, and where it came from."""

    file: str
    index: int
    system: Optional[str]
    turns: tuple[tuple[str, Optional[str]], ...]  # answer None only in generation prompts
    images: tuple[str, ...]
    videos: tuple[VideoRef, ...]  # a file or frame directory, or a tuple of frame files
    root: Optional[str] = None  # the meta entry's root: a missing media file's message names both candidates
    added_placeholders: int = 0  # placeholders prepended to the first user message (media without any)
    unread_keys: tuple[str, ...] = ()  # record keys no reader used (reported, counted)


def _resolve_file(path: str, meta_dir: str) -> str:
    beside_meta = os.path.join(meta_dir, path)
    return os.path.abspath(beside_meta if not os.path.isabs(path) and os.path.exists(beside_meta) else path)


def _not_a_meta_file(meta_path: str, value: Any, is_jsonl: bool) -> Optional[str]:
    """Why a parsed meta_path is an annotation file (a list of records) rather than a meta file, if it is."""
    looks_like_records = is_jsonl or isinstance(value, list) or (
        isinstance(value, dict) and any(k in value for k in ("messages", "conversations", "query", "instruction")))
    if not looks_like_records:
        return None
    return ("this is an annotation file (records), not a meta file: pass it as --dataset "
            f"{meta_path} (records read as they are), or wrap it in a meta file "
            f'{{"name": {{"annotation": "{os.path.basename(meta_path)}"}}}}')


def _entry_source(name: str, entry: Any, where: str, meta_dir: str) -> DatasetSource:
    if not isinstance(entry, dict):
        raise DataError(where, None, 'expected an object {"annotation" | "file_name": path, ...}')
    unknown = sorted(set(entry) - set(PADDLEMIX_ENTRY_KEYS) - set(LF_ENTRY_KEYS)
                     - set(LF_HUB_KEYS) - set(LF_NOT_HONOURED))
    if unknown:
        raise DataError(where, None, f"unknown keys {unknown} (PaddleMIX: {list(PADDLEMIX_ENTRY_KEYS)}; "
                                     f"LLaMA-Factory: {list(LF_ENTRY_KEYS)})")
    lf_keys = set(entry) - {"file_name", *PADDLEMIX_ENTRY_KEYS}
    is_lf = "annotation" not in entry and ("file_name" in entry or bool(lf_keys))
    fmt = entry_format(entry, where) if lf_keys else RecordFormat()
    annotation = entry.get("annotation", entry.get("file_name"))
    if not isinstance(annotation, str):
        raise DataError(where, None, 'needs an "annotation" (or "file_name") path')
    repeat_time = entry.get("repeat_time", 1)
    if isinstance(repeat_time, bool) or not isinstance(repeat_time, (int, float)) or repeat_time < 0:
        raise DataError(where, None, f"repeat_time must be a number >= 0, got {repeat_time!r}")
    root = entry.get("root")
    if root is not None and not isinstance(root, str):
        raise DataError(where, None, f"root must be a directory path, got {root!r}")
    annotation = _resolve_file(annotation, meta_dir)
    if not os.path.isfile(annotation):
        raise DataError(where, None, f"annotation file {annotation} does not exist", kind="missing file")
    root = _resolve_file(root, meta_dir) if root else (meta_dir if is_lf else None)  # LF: dataset_dir
    if root is not None and not os.path.isdir(root):
        raise DataError(where, None, f"root {root} is not a directory", kind="missing file")
    return DatasetSource(name, annotation, float(repeat_time), root, entry.get("length"), fmt)


def load_meta(meta_path: str, select: Optional[list[str]] = None) -> list[DatasetSource]:
    """Parse a PaddleMIX meta JSON or a LLaMA-Factory dataset_info.json (every entry, or those `select` names);
    every problem is a DataError naming the meta file and the entry."""
    if not os.path.isfile(meta_path):
        raise DataError(meta_path, None, "meta_path does not exist (expected a PaddleMIX meta JSON or LLaMA-Factory "
                                         "dataset_info.json)", kind="missing file")
    meta, is_jsonl = read_json_file(meta_path)
    hint = _not_a_meta_file(meta_path, meta, is_jsonl)
    if hint:
        raise DataError(meta_path, None, hint)
    if not isinstance(meta, dict) or not meta:
        raise DataError(meta_path, None, "expected a non-empty object {name: {annotation, repeat_time, root}}")
    missing = [n for n in select or [] if n not in meta]
    if missing:
        raise DataError(meta_path, None, f"no entry named {missing[0]!r}; entries: {sorted(meta)}")
    meta_dir = os.path.dirname(os.path.abspath(meta_path))
    names = select or list(meta)
    return [_entry_source(n, meta[n], f"{meta_path} entry {n!r}", meta_dir) for n in names]


def resolve_sources(meta_path: Optional[str], dataset: Optional[list[str]] = None,
                    dataset_dir: Optional[str] = None) -> list[DatasetSource]:
    """The sources of a run: a meta file (all entries, or the `dataset` names picked from it), or `dataset` items
    each an entry of `dataset_dir`/dataset_info.json (LLaMA-Factory) or an annotation file (ms-swift)."""
    if meta_path is not None or not dataset:
        if meta_path is None:
            raise DataError("meta_path", None, "no data: set meta_path, or dataset (with dataset_dir)")
        return load_meta(meta_path, dataset)
    info = os.path.join(dataset_dir or ".", "dataset_info.json")
    entries = read_json_file(info)[0] if os.path.isfile(info) else {}
    sources = []
    for item in dataset:
        if isinstance(entries, dict) and item in entries:
            sources += load_meta(info, [item])
            continue
        path = next((p for p in (item, os.path.join(dataset_dir or ".", item)) if os.path.isfile(p)), None)
        if path is None:
            raise DataError("dataset", None, f"{item!r} is neither an entry of {info}"
                            f"{'' if os.path.isfile(info) else ' (no such file)'} nor an annotation file")
        path = os.path.abspath(path)
        sources.append(DatasetSource(item, path, root=os.path.dirname(path)))
    return sources


def _auto_messages(record: dict, where: tuple[str, int]) -> ParsedRecord:
    """PaddleMIX/OpenAI `messages`, InternVL/LLaVA `conversations` (from/value or role/content)."""
    key = "messages" if "messages" in record else "conversations"
    items = record[key]
    if not isinstance(items, list) or not items:
        raise DataError(*where, "the message list is empty or not a list")
    messages = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise DataError(*where, f"message {i}: expected an object, got {type(item).__name__}")
        role_key, text_key = ("role", "content") if "role" in item or key == "messages" else ("from", "value")
        role = _ROLES.get(item.get(role_key))
        if role is None:
            raise DataError(*where, f"message {i}: {role_key!r} must be one of {sorted(_ROLES)}, got "
                                    f"{item.get(role_key)!r}")
        if not isinstance(item.get(text_key), (str, list)):
            raise DataError(*where, f"message {i}: {text_key!r} must be a string or a content list")
        messages.append((role, item[text_key]))
    images = next((record[k] for k in ("images", "image") if record.get(k) is not None), [])
    videos = next((record[k] for k in ("videos", "video") if record.get(k) is not None), [])
    return ParsedRecord(messages, record.get("system"), images if isinstance(images, list) else [images],
                        videos if isinstance(videos, list) else [videos],
                        {key, "images", "image", "videos", "video", "system"})


def read_record(record: dict, where: tuple[str, int], fmt: RecordFormat) -> ParsedRecord:
    """Dispatch a raw record to its format's reader."""
    if fmt.formatting == "sharegpt":
        return read_sharegpt(record, where, fmt)
    if fmt.formatting == "alpaca":
        return read_alpaca(record, where, fmt)
    if "messages" in record or "conversations" in record:
        return _auto_messages(record, where)
    if all(k in record for k in QUERY_KEYS):
        parsed = read_query_response(record, where)
    elif all(k in record for k in ALPACA_KEYS):
        parsed = read_swift_alpaca(record, where)
    else:
        raise DataError(*where, 'no known record shape: expected "messages", "conversations", "query"/"response" '
                                f'or "instruction"/"output"; record keys are {sorted(record)}')
    for name, keys in (("images", ("images", "image")), ("videos", ("videos", "video"))):
        value = next((record[k] for k in keys if record.get(k) is not None), [])
        getattr(parsed, name).extend(value if isinstance(value, list) else [value])
        parsed.used_keys.update(keys)
    return parsed


def _content(content: Any, role: str, where: tuple[str, int], i: int, parsed: ParsedRecord,
             media: tuple[list, list], unread: list[str]) -> str:
    """A message's text; a content list's media are appended to `media` (images, videos), the keys of its parts
    that nothing reads to `unread`."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise DataError(*where, f"message {i}: content must be a string or a content list, got "
                                f"{type(content).__name__}")
    text, images, videos, not_read = flatten_content(content, where, f"message {i}.content")
    unread.extend(not_read)
    if (images or videos) and role == "assistant":
        raise DataError(*where, f"message {i}: images and videos belong in user messages",
                        kind="placeholder mismatch")
    media[0].extend(images)
    media[1].extend(videos)
    return text


def build_conversation(parsed: ParsedRecord, record: dict, file: str, index: int, root: Optional[str],
                       cache_dir: str = DEFAULT_CACHE_DIR) -> Conversation:
    """Validate a reader's ParsedRecord (module docstring) into a Conversation; raises DataError."""
    where = (file, index)
    unread = sorted(set(record) - parsed.used_keys)
    for key in unread:
        value = record[key]
        if value in (None, "", [], {}):
            continue
        if _MEDIA_LIKE.search(key):
            raise DataError(*where, f"key {key!r} is not read (media are read from "
                                    f"{sorted(k for k in parsed.used_keys if _MEDIA_LIKE.search(k)) or 'no key'}"
                                    "): rename it, or map it in the dataset_info.json entry's columns",
                            kind="unread media")
        if key == "system":
            raise DataError(*where, 'key "system" is not read (the dataset_info.json entry\'s columns do not map '
                                    '"system"), so the default system prompt would replace it: add "system": '
                                    '"system" to columns')
    content_media: tuple[list, list] = ([], [])
    part_keys: list[str] = []
    messages = [(role, _content(c, role, where, i, parsed, content_media, part_keys))
                for i, (role, c) in enumerate(parsed.messages)]
    if (content_media[0] or content_media[1]) and (parsed.images or parsed.videos):
        raise DataError(*where, "media both in content lists and in the record's images/videos: use one place")
    image_refs = content_media[0] or parsed.images
    video_refs = content_media[1] or parsed.videos
    system = None
    if messages and messages[0][0] == "system":
        system = messages.pop(0)[1]
    if parsed.system is not None:
        if not isinstance(parsed.system, str):
            raise DataError(*where, '"system" must be a string')
        if system is not None and system != parsed.system:
            raise DataError(*where, 'two different system prompts: a system message and a "system" field')
        system = parsed.system
    if not messages or len(messages) % 2 or any(
        role != ("user", "assistant")[i % 2] for i, (role, _) in enumerate(messages)
    ):
        raise DataError(file, index, "messages must alternate user/assistant after an optional system message "
                                     "and end with an assistant answer")
    turns = tuple((messages[i][1], messages[i + 1][1]) for i in range(0, len(messages), 2))
    for k, (_, answer) in enumerate(turns):
        if not answer.strip():
            raise DataError(file, index, f"empty answer in turn {k}", kind="empty answer")
        if IMAGE_PLACEHOLDER in answer or VIDEO_PLACEHOLDER in answer:
            raise DataError(file, index, f"media placeholder in the answer of turn {k}", kind="placeholder mismatch")
    images = tuple(local_media(r, where, f"images[{i}]", root, cache_dir) for i, r in enumerate(image_refs))
    videos = tuple(local_video(r, where, f"videos[{i}]", root, cache_dir) for i, r in enumerate(video_refs))
    added = 0
    for placeholder, media in ((VIDEO_PLACEHOLDER, videos), (IMAGE_PLACEHOLDER, images)):  # images end up first
        if media and not any(placeholder in text for text in (system or "", *(user for user, _ in turns))):
            first_user, first_answer = turns[0]
            turns = ((f"{placeholder}\n" * len(media) + first_user, first_answer), *turns[1:])
            added += len(media)
    prompt_text = (system or "") + "".join(user for user, _ in turns)
    for placeholder, media, name in ((IMAGE_PLACEHOLDER, images, "images"), (VIDEO_PLACEHOLDER, videos, "videos")):
        count = prompt_text.count(placeholder)
        if count != len(media):
            raise DataError(file, index, f"{count} {placeholder} placeholders but {len(media)} {name}",
                            kind="placeholder mismatch")
    return Conversation(file, index, system, turns, images, videos, root, added,
                        (*(k for k in unread if record[k] not in (None, "", [], {})), *dict.fromkeys(part_keys)))


def parse_record(record: Any, file: str, index: int, root: Optional[str], fmt: RecordFormat = RecordFormat(),
                 cache_dir: str = DEFAULT_CACHE_DIR) -> Conversation:
    """Validate one raw record of any supported format (see the module docstring); raises DataError."""
    if isinstance(record, DataError):
        raise record
    if not isinstance(record, dict):
        raise DataError(file, index, f"a record must be an object, got {type(record).__name__}")
    parsed = read_record(record, (file, index), fmt)
    for i, (_, content) in enumerate(parsed.messages):
        if content is None:
            raise DataError(file, index, f"message {i}: no text (content/value missing)")
    return build_conversation(parsed, record, file, index, root, cache_dir)


def missing_media_error(conv: Conversation, path: str) -> DataError:
    """The error for a media file that does not exist, naming every place it was looked for."""
    under_root = os.path.join(conv.root, "") if conv.root else None
    if under_root and path.startswith(under_root):  # resolve_media tried the path as given first
        where = f"neither {path[len(under_root):]} (as given) nor {path} (under root) exists"
    else:
        where = path
    return DataError(conv.file, conv.index, f"media file not found: {where}", kind="missing media")


def repeat_indices(num_records: int, repeat_time: float, seed: int, name: str) -> np.ndarray:
    """Indices realising `repeat_time`, int(num_records * repeat_time) in total: below 1 the first records (as
    PaddleMIX), else floor(repeat_time) full copies plus a seeded sample without replacement of the fraction.
    Deterministic in (seed, name)."""
    total = int(num_records * repeat_time)
    if repeat_time < 1:
        return np.arange(total, dtype=np.int64)
    full = min(int(repeat_time), total // max(num_records, 1))
    extra = total - full * num_records
    parts = [np.arange(num_records, dtype=np.int64)] * full
    if extra:
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        parts.append(np.sort(rng.choice(num_records, size=extra, replace=False)).astype(np.int64))
    return _joined(parts)


def _joined(arrays: list[np.ndarray]) -> np.ndarray:
    """The arrays end to end, without a copy of a lone one (a record array can hold millions of entries)."""
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays) if arrays else np.zeros(0, np.int64)


def held_out_records(num_records: int, val_size: float, seed: int, where: str) -> np.ndarray:
    """Sorted indices of the valid records held out by `val_size` (DataConfig): a seeded choice, as many as
    ceil(val_size x num_records) for a fraction (as HF's train_test_split) or val_size for a count."""
    if not val_size:
        return np.zeros(0, np.int64)
    count = int(val_size) if val_size >= 1 else math.ceil(val_size * num_records)
    if count >= num_records:
        raise DataError(where, None, f"val_size={val_size:g} holds out {count} of the {num_records} valid records, "
                                     "leaving none to train on: lower val_size (split_dataset_ratio)",
                        kind="too small")
    rng = np.random.default_rng([seed, zlib.crc32(b"val_size")])
    return np.sort(rng.choice(num_records, size=count, replace=False)).astype(np.int64)


class RecordStore:
    """The records of a run's sources (`resolve_sources`), with `repeat_time` applied: `conversation(i)` for
    sample i, parsed on demand from the annotation's cached byte-offset index (record_index.py), so no process holds
    all records as Python objects. Every record is validated once per file content and reading setting (the first
    process to read it, normally the parent; the result is cached beside the index); records whose media files
    do not exist are listed in `missing_media` (re-checked on every run) and left to the loader. Invalid records raise at construction, or with `skip_bad=True` are left out and counted in
    `skips`; `unread_keys` counts the record keys no reader used, `own_system` the records with their own
    system prompt. `val_size` holds records out (`held_out_records`): they are in no training sample (whatever
    their repeat_time) and `held_out()` is the store of them, each once."""

    def __init__(self, meta_path: Optional[str], seed: int, skip_bad: bool = False, skips: Optional[SkipLog] = None,
                 dataset: Optional[list[str]] = None, dataset_dir: Optional[str] = None,
                 cache_dir: str = DEFAULT_CACHE_DIR, val_size: float = 0.0):
        self.meta_path = meta_path or ",".join(dataset or [])
        self.sources = resolve_sources(meta_path, dataset, dataset_dir)
        self.skips = skips if skips is not None else SkipLog()
        self.cache_dir = cache_dir
        self.indexes: list[AnnotationIndex] = []
        self.added_placeholders = 0  # over valid records (each once, however often repeat_time draws it)
        self.unread_keys: Counter[str] = Counter()
        self.own_system = 0
        self.missing_media: list[DataError] = []  # valid records whose media files do not exist (now)
        self.num_records = 0  # valid records
        per_sample: list[np.ndarray] = []
        record_sources: list[np.ndarray] = []
        record_offsets: list[np.ndarray] = []
        for s, source in enumerate(self.sources):
            index = index_annotation(source.annotation)
            self.indexes.append(index)
            found = self._validation(source, index)
            for j, reason, kind in found.errors:
                error = DataError(source.annotation, j, reason, kind)
                if not skip_bad:
                    raise error
                self.skips.add(error)
            self.missing_media += [DataError(source.annotation, j, reason, "missing media")
                                   for j, reason, path in found.missing if not os.path.exists(path)]
            self.added_placeholders += found.added_placeholders
            self.unread_keys.update(found.unread_keys)
            self.own_system += found.own_system
            valid = np.flatnonzero(found.valid).astype(np.int64, copy=False)
            picks = repeat_indices(len(valid), source.repeat_time, seed, source.name)
            picks += self.num_records  # in place: a fresh array
            per_sample.append(picks)
            record_sources.append(np.full(len(valid), s, np.int32))
            record_offsets.append(valid)
            self.num_records += len(valid)
        self.sample_to_record = _joined(per_sample)
        # valid record r -> its source and its record index in that source's annotation file
        self.record_sources = _joined(record_sources)
        self.record_lines = _joined(record_offsets)
        self.held_out_ids = held_out_records(self.num_records, val_size, seed, self.meta_path)
        if len(self.held_out_ids):
            self.sample_to_record = self.sample_to_record[~np.isin(self.sample_to_record, self.held_out_ids)]

    def held_out(self) -> "RecordStore":
        """The records `val_size` held out, each one sample, in record order (shares this store's indexes)."""
        if not len(self.held_out_ids):
            raise ValueError(f"{self.meta_path}: no records are held out (val_size is 0)")
        view = copy.copy(self)
        view.sample_to_record, view.held_out_ids = self.held_out_ids, np.zeros(0, np.int64)
        return view

    def _validation(self, source: DatasetSource, index: AnnotationIndex) -> Validation:
        """The cached validation of a source's records, computed (parsing each record once) when missing."""
        setting = repr((source.format, source.root, self.cache_dir))
        found = load_validation(index, setting)
        if found is not None:
            return found
        valid = np.zeros(len(index), bool)
        errors: list[tuple[int, str, str]] = []
        missing: list[tuple[int, str, str]] = []
        unread: Counter[str] = Counter()
        added = own_system = 0
        for j, raw in enumerate(index.records()):
            try:
                conv = parse_record(raw, source.annotation, j, source.root, source.format, self.cache_dir)
                frames = [f for v in conv.videos for f in (v if isinstance(v, tuple) else (v,))]
                gone = next((p for p in (*conv.images, *frames) if not os.path.exists(p)), None)
                if gone is not None:  # valid record, left to the loader (skip mode) or refused by the parent
                    missing.append((j, missing_media_error(conv, gone).reason, gone))
            except DataError as e:
                errors.append((j, e.reason, e.kind))
                continue
            valid[j] = True
            added += conv.added_placeholders
            unread.update(conv.unread_keys)
            own_system += conv.system is not None
        found = Validation(valid, errors, added, dict(unread), own_system, missing)
        save_validation(index, setting, found)
        return found

    def __len__(self) -> int:
        return len(self.sample_to_record)

    def record_conversation(self, r: int) -> Conversation:
        """Valid record r (0 <= r < num_records), parsed from its annotation file."""
        s, j = int(self.record_sources[r]), int(self.record_lines[r])
        source = self.sources[s]
        return parse_record(self.indexes[s].record(j), source.annotation, j, source.root, source.format,
                            self.cache_dir)

    def conversation(self, i: int) -> Conversation:
        return self.record_conversation(int(self.sample_to_record[i]))

    def samples_per_source(self) -> dict[str, int]:
        """Annotation file -> samples drawn from it (repeat_time applied)."""
        counts = np.bincount(self.record_sources[self.sample_to_record], minlength=len(self.sources))
        return {source.annotation: int(n) for source, n in zip(self.sources, counts)}

    def unread_keys_warning(self) -> Optional[str]:
        """One line naming the record keys no reader used, with counts (None when every key was read)."""
        if not self.unread_keys:
            return None
        keys = ", ".join(f"{k!r} ({n} records)" for k, n in self.unread_keys.most_common())
        return f"{self.meta_path}: record keys not read by any reader (ignored): {keys}"
