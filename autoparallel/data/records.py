"""PaddleMIX meta files and annotation records → validated `Conversation`s; `DataError` and the skip log.

Meta JSON (PaddleMIX): `{name: {"annotation" | "file_name": path, "repeat_time": float = 1, "root"?: dir,
"length"?: int}}` ("length" is informational). Relative annotation/root paths resolve against the meta file's
directory when they exist there (so a dataset folder can be moved as a whole), else against the working directory
(PaddleMIX's behaviour). A relative media path is used as given (working directory) when that file exists, else
under the entry's `root`: PaddleMIX ignores `root` and its own meta files carry paths that already start with it,
while InternVL-style meta files give paths relative to `root`. When neither exists, the error names both.

`repeat_time` r: r < 1 keeps the first int(N * r) records of the file (PaddleMIX's `raw_data[:int(N * r)]`);
r >= 1 repeats the file floor(r) times plus a seeded sample (without replacement) of the fraction.

Record forms (JSON list or JSONL, by file extension):
- messages: `{"messages": [{"role": "system"|"user"|"assistant", "content": str}], "images": [...], "videos": [...]}`
- conversations (InternVL/LLaVA): `{"conversations": [{"from": "system"|"human"|"gpt", "value": str}],
  "image" | "images": path or list, "video" | "videos": path or list}`
A conversation is an optional system message, then user/assistant turns alternating, ending with an assistant
answer. `<image>`/`<video>` placeholders may appear in system and user messages, never in answers, and their
counts must equal the numbers of images/videos (used in order of appearance). A record with images (videos) and no
placeholder at all gets one `<image>\n` (`<video>\n`) per file prepended to its first user message, as PaddleMIX
and InternVL do; `Conversation.added_placeholders` counts them for the data report.
"""
from __future__ import annotations

import json
import os
import threading
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
_ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}


class DataError(ValueError):
    """A bad meta file, annotation file or record; the message names the file, the record index and the reason.

    `kind` is a short category used by the skip report ("missing media", "too long", ...)."""

    def __init__(self, file: str, index: Optional[int], reason: str, kind: str = "malformed record"):
        where = f"{file}, record {index}" if index is not None else file
        super().__init__(f"{where}: {reason}")
        self.file, self.index, self.reason, self.kind = file, index, reason, kind

    def __reduce__(self):  # picklable across worker processes
        return DataError, (self.file, self.index, self.reason, self.kind)


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


@dataclass(frozen=True)
class Conversation:
    """One validated record: (user, answer) turns, resolved media paths, and where it came from."""

    file: str
    index: int
    system: Optional[str]
    turns: tuple[tuple[str, Optional[str]], ...]  # answer None only in generation prompts
    images: tuple[str, ...]
    videos: tuple[str, ...]
    root: Optional[str] = None  # the meta entry's root: a missing media file's message names both candidates
    added_placeholders: int = 0  # placeholders prepended to the first user message (media without any)


def _resolve_file(path: str, meta_dir: str) -> str:
    beside_meta = os.path.join(meta_dir, path)
    return os.path.abspath(beside_meta if not os.path.isabs(path) and os.path.exists(beside_meta) else path)


def load_meta(meta_path: str) -> list[DatasetSource]:
    """Parse a PaddleMIX meta JSON; every problem is a DataError naming the meta file and the entry."""
    if not os.path.isfile(meta_path):
        raise DataError(meta_path, None, "meta_path does not exist (expected a PaddleMIX meta JSON file)",
                        kind="missing file")
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(meta_path, None, f"invalid JSON: {e}", kind="invalid JSON") from None
    if not isinstance(meta, dict) or not meta:
        raise DataError(meta_path, None, "expected a non-empty object {name: {annotation, repeat_time, root}}")
    meta_dir = os.path.dirname(os.path.abspath(meta_path))
    sources = []
    for name, entry in meta.items():
        where = f"{meta_path} entry {name!r}"
        annotation = entry.get("annotation", entry.get("file_name")) if isinstance(entry, dict) else None
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
        root = _resolve_file(root, meta_dir) if root else None
        if root is not None and not os.path.isdir(root):
            raise DataError(where, None, f"root {root} is not a directory", kind="missing file")
        sources.append(DatasetSource(name, annotation, float(repeat_time), root, entry.get("length")))
    return sources


def _invalid_utf8_byte(record: Any) -> Optional[int]:
    """The first byte of a record decoded with surrogateescape that was not valid UTF-8 (None if all were)."""
    text = json.dumps(record, ensure_ascii=False)
    return next((ord(c) - 0xDC00 for c in text if 0xDC80 <= ord(c) <= 0xDCFF), None)


def read_annotation(path: str) -> list[Any]:
    """Raw records of a JSON list or JSONL file. An unparsable JSONL line, or a record holding bytes that are not
    UTF-8, becomes a DataError entry (so it can be skipped); an unparsable JSON file raises."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        text, valid_utf8 = data.decode("utf-8-sig"), True
    except UnicodeDecodeError:  # keep going: only the records holding the bad bytes are rejected
        text, valid_utf8 = data.decode("utf-8-sig", "surrogateescape"), False
    records: list[Any] = []
    if path.endswith(".jsonl"):
        for line_no, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                records.append(DataError(path, len(records), f"invalid JSON on line {line_no}: {e}",
                                         kind="invalid JSON"))
    else:
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(path, None, f"invalid JSON: {e}", kind="invalid JSON") from None
        if not isinstance(records, list):
            raise DataError(path, None, f"expected a JSON list of records, got {type(records).__name__}")
    if not valid_utf8:
        for index, record in enumerate(records):
            bad = None if isinstance(record, DataError) else _invalid_utf8_byte(record)
            if bad is not None:
                records[index] = DataError(path, index, f"text is not valid UTF-8 (byte 0x{bad:02x}); save the "
                                                        "annotation file as UTF-8", kind="invalid text")
    return records


def _media_list(record: dict, keys: tuple[str, str], file: str, index: int) -> list[str]:
    value = next((record[k] for k in keys if record.get(k) is not None), [])
    value = [value] if isinstance(value, str) else value
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise DataError(file, index, f'"{keys[0]}" must be a path or a list of paths')
    return value


def _messages(record: dict, file: str, index: int) -> list[tuple[str, str]]:
    if "messages" in record:
        items, role_key, text_key = record["messages"], "role", "content"
    elif "conversations" in record:
        items, role_key, text_key = record["conversations"], "from", "value"
    else:
        raise DataError(file, index, 'record has neither "messages" nor "conversations"')
    if not isinstance(items, list) or not items:
        raise DataError(file, index, "the message list is empty or not a list")
    out = []
    for i, item in enumerate(items):
        role = _ROLES.get(item.get(role_key)) if isinstance(item, dict) else None
        if role is None:
            raise DataError(file, index, f"message {i}: {role_key!r} must be one of {sorted(_ROLES)}")
        text = item.get(text_key)
        if not isinstance(text, str):
            raise DataError(file, index, f"message {i}: {text_key!r} must be a string")
        out.append((role, text))
    return out


def parse_record(record: Any, file: str, index: int, root: Optional[str]) -> Conversation:
    """Validate one raw record (see the module docstring); raises DataError."""
    if isinstance(record, DataError):
        raise record
    if not isinstance(record, dict):
        raise DataError(file, index, f"a record must be an object, got {type(record).__name__}")
    messages = _messages(record, file, index)
    system = None
    if messages[0][0] == "system":
        system = messages.pop(0)[1]
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
    images = _media_list(record, ("images", "image"), file, index)
    videos = _media_list(record, ("videos", "video"), file, index)
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
    return Conversation(file, index, system, turns, tuple(resolve_media(p, root) for p in images),
                        tuple(resolve_media(p, root) for p in videos), root, added)


def media_candidates(path: str, root: Optional[str]) -> list[str]:
    """Where a record's media path may be: as given, then under the meta entry's root (relative paths only)."""
    if root is None or os.path.isabs(path):
        return [path]
    return [path, os.path.join(root, path)]


def resolve_media(path: str, root: Optional[str]) -> str:
    """The first existing candidate of `media_candidates`, else the last one (the error then names them all)."""
    candidates = media_candidates(path, root)
    return next((c for c in candidates[:-1] if os.path.exists(c)), candidates[-1])


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
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    sampled = np.sort(rng.choice(num_records, size=extra, replace=False)) if extra else np.zeros(0, np.int64)
    return np.concatenate([np.tile(np.arange(num_records), full), sampled]).astype(np.int64)


class RecordStore:
    """All records of a meta file, validated, with `repeat_time` applied: `conversation(i)` for sample i.

    Invalid records raise at construction, or with `skip_bad=True` are left out and counted in `skips`."""

    def __init__(self, meta_path: str, seed: int, skip_bad: bool = False, skips: Optional[SkipLog] = None):
        self.meta_path = meta_path
        self.sources = load_meta(meta_path)
        self.skips = skips if skips is not None else SkipLog()
        self.conversations: list[Conversation] = []
        self.added_placeholders = 0  # over valid records (each once, however often repeat_time draws it)
        per_sample: list[np.ndarray] = []
        for source in self.sources:
            valid: list[Conversation] = []
            for index, raw in enumerate(read_annotation(source.annotation)):
                try:
                    valid.append(parse_record(raw, source.annotation, index, source.root))
                    self.added_placeholders += valid[-1].added_placeholders
                except DataError as e:
                    if not skip_bad:
                        raise
                    self.skips.add(e)
            picks = repeat_indices(len(valid), source.repeat_time, seed, source.name)
            per_sample.append(picks + len(self.conversations))
            self.conversations.extend(valid)
        self.sample_to_record = np.concatenate(per_sample) if per_sample else np.zeros(0, np.int64)

    def __len__(self) -> int:
        return len(self.sample_to_record)

    def conversation(self, i: int) -> Conversation:
        return self.conversations[int(self.sample_to_record[i])]
