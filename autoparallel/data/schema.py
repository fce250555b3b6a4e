"""The types every record format reader shares: `DataError`, the placeholders, `RecordFormat` (how a source's
records are read) and `ParsedRecord` (what a format reader hands to `records.build_conversation`, which turns it
into the one internal record type, `records.Conversation`). No format logic here."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"


class DataError(ValueError):
    """A bad meta file, annotation file or record; the message names the file, the record index and the reason.

    `kind` is a short category used by the skip report ("missing media", "too long", ...)."""

    def __init__(self, file: str, index: Optional[int], reason: str, kind: str = "malformed record"):
        where = f"{file}, record {index}" if index is not None else file
        super().__init__(f"{where}: {reason}")
        self.file, self.index, self.reason, self.kind = file, index, reason, kind

    def __reduce__(self):  # picklable across worker processes
        return DataError, (self.file, self.index, self.reason, self.kind)


@dataclass(frozen=True)
class RecordFormat:
    """How a source's records are read. "auto": by the keys a record has (PaddleMIX/OpenAI `messages`,
    InternVL/LLaVA `conversations`, ms-swift `query`/`response`, alpaca `instruction`/`output`).
    "sharegpt" / "alpaca": LLaMA-Factory's, reading only the `columns` given, with `tags` for role names."""

    formatting: str = "auto"
    columns: tuple[tuple[str, str], ...] = ()  # (LLaMA-Factory column name, record key)
    tags: tuple[tuple[str, str], ...] = ()

    def column(self, name: str, default: Optional[str] = None) -> Optional[str]:
        return dict(self.columns).get(name, default)

    def tag(self, name: str, default: str) -> str:
        return dict(self.tags).get(name, default)


@dataclass
class ParsedRecord:
    """A record as a format reader found it, before validation: messages as (role, content) with role one of
    system/user/assistant and content a string or a content list, a record-level system prompt, record-level
    media references, and the record keys the reader used (any other key is reported)."""

    messages: list[tuple[str, Any]]
    system: Optional[str] = None
    images: list[Any] = field(default_factory=list)
    videos: list[Any] = field(default_factory=list)
    used_keys: set[str] = field(default_factory=set)
