"""ms-swift's single-turn record shapes, as its `AutoPreprocessor` reads them (`messages` and `conversations` are
read by records.py): `{"system"?, "query", "response", "history"?: [[query, response], ...]}` and alpaca
`{"system"?, "instruction", "input"?, "output", "history"?}` (instruction and input joined by a newline), each
with record-level `images` / `videos`."""
from __future__ import annotations

from typing import Any, Optional

from autoparallel.data.schema import DataError, ParsedRecord

QUERY_KEYS = ("query", "response")
ALPACA_KEYS = ("instruction", "output")


def _history(record: dict, key: str, where: tuple[str, int]) -> list[tuple[str, Any]]:
    history = record.get(key) or []
    if not isinstance(history, list) or not all(
            isinstance(h, (list, tuple)) and len(h) == 2 and all(isinstance(t, str) for t in h) for h in history):
        raise DataError(*where, f'"{key}" must be a list of [query, response] string pairs')
    return [msg for q, r in history for msg in (("user", q), ("assistant", r))]


def _string(record: dict, key: str, where: tuple[str, int]) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise DataError(*where, f'"{key}" must be a string, got {type(value).__name__}')
    return value


def join_prompt(instruction: str, extra: Optional[str]) -> str:
    """Alpaca's user turn: the instruction, then the input on its own line when there is one (LLaMA-Factory and
    ms-swift both)."""
    return "\n".join(part for part in (instruction, extra) if part)


def read_query_response(record: dict, where: tuple[str, int]) -> ParsedRecord:
    messages = _history(record, "history", where)
    messages += [("user", _string(record, "query", where)), ("assistant", _string(record, "response", where))]
    return ParsedRecord(messages, record.get("system"), used_keys={"query", "response", "history", "system"})


def read_alpaca(record: dict, where: tuple[str, int]) -> ParsedRecord:
    extra = record.get("input")
    if extra is not None and not isinstance(extra, str):
        raise DataError(*where, '"input" must be a string')
    messages = _history(record, "history", where)
    messages += [("user", join_prompt(_string(record, "instruction", where), extra)),
                 ("assistant", _string(record, "output", where))]
    return ParsedRecord(messages, record.get("system"),
                        used_keys={"instruction", "input", "output", "history", "system"})
