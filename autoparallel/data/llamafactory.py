"""LLaMA-Factory's `dataset_info.json` entries and record formats, read as LLaMA-Factory reads them
(its `data/README.md` and `data/converter.py`).

Entry: `{"file_name", "formatting": "alpaca" | "sharegpt", "columns": {...}, "tags": {...}, "ranking": false}`;
`file_name` and media paths are relative to the dataset directory (the folder of dataset_info.json). Only the
columns named in `columns` are read (defaults below), so a record's `images` is read only when `columns` maps
`images`, exactly as in LLaMA-Factory (an unread media key is then an error in records.py, not silence).
Entries this engine cannot honour are refused in one line: hub/script datasets (no downloads), `ranking: true`
(preference data needs a preference trainer; sft would silently train on the chosen answer only), tools,
audio, and keys such as `subset`/`num_samples`.
"""
from __future__ import annotations

from typing import Any, Optional

from autoparallel.data.schema import DataError, ParsedRecord, RecordFormat
from autoparallel.data.swift import join_prompt

COLUMNS = {
    "sharegpt": {"messages": "conversations", "system": None, "tools": None, "images": None, "videos": None},
    "alpaca": {"prompt": "instruction", "query": "input", "response": "output", "history": None, "system": None,
               "tools": None, "images": None, "videos": None},
}
TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
        "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}
ENTRY_KEYS = ("file_name", "formatting", "columns", "tags", "ranking", "split")
HUB_KEYS = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")
NOT_HONOURED = {"subset": "dataset subsets", "folder": "dataset folders", "num_samples": "sampling a number of "
                "records (use repeat_time)", "load_from": "hub loading"}


def entry_format(entry: dict, where: str) -> RecordFormat:
    """The RecordFormat of one dataset_info.json entry; DataError for what is not honoured."""
    hub = [k for k in HUB_KEYS if k in entry]
    if hub:
        raise DataError(where, None, f"{hub[0]}: hub and script datasets are not downloaded here; download the "
                                     "file and give its file_name (or pick other entries with --dataset NAME,...)",
                        kind="unsupported")
    for key, what in NOT_HONOURED.items():
        if key in entry:
            raise DataError(where, None, f"{key!r} ({what}) is not supported", kind="unsupported")
    if entry.get("ranking"):
        raise DataError(where, None, "ranking: true is preference data (chosen/rejected); sft/lora would train on "
                                     "one answer only, so it is refused", kind="unsupported")
    if entry.get("split", "train") != "train":
        raise DataError(where, None, f"split {entry['split']!r}: only the train split is read", kind="unsupported")
    formatting = entry.get("formatting", "alpaca")  # LLaMA-Factory's default
    if formatting not in COLUMNS:
        raise DataError(where, None, f"formatting {formatting!r} must be one of {sorted(COLUMNS)}")
    columns, tags = entry.get("columns", {}), entry.get("tags", {})
    for name, given, known in (("columns", columns, COLUMNS[formatting]), ("tags", tags, TAGS)):
        if not isinstance(given, dict) or not all(isinstance(v, str) for v in given.values()):
            raise DataError(where, None, f"{name} must map names to strings")
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise DataError(where, None, f"{name} {unknown} not supported with formatting {formatting!r} "
                                         f"(known: {sorted(known)})", kind="unsupported")
    if formatting == "alpaca" and tags:
        raise DataError(where, None, "tags apply to formatting sharegpt only")
    merged = {k: v for k, v in {**COLUMNS[formatting], **columns}.items() if v is not None}
    return RecordFormat(formatting, tuple(sorted(merged.items())), tuple(sorted({**TAGS, **tags}.items())))


def _media(record: dict, where: tuple[str, int], fmt: RecordFormat, parsed: ParsedRecord) -> ParsedRecord:
    for name in ("images", "videos"):
        key = fmt.column(name)
        if key is not None and record.get(key) is not None:
            value = record[key]
            getattr(parsed, name).extend(value if isinstance(value, list) else [value])
            parsed.used_keys.add(key)
    if fmt.column("tools") and record.get(fmt.column("tools")):
        raise DataError(*where, "tools (function calling) are not supported by the qwen2_vl template")
    return parsed


def read_sharegpt(record: dict, where: tuple[str, int], fmt: RecordFormat) -> ParsedRecord:
    key = fmt.column("messages")
    items = record.get(key)
    if not isinstance(items, list) or not items:
        raise DataError(*where, f'column "messages" ({key!r}): expected a non-empty list of messages, '
                                f"record keys are {sorted(record)}")
    role_tag, content_tag = fmt.tag("role_tag", "from"), fmt.tag("content_tag", "value")
    roles = {fmt.tag("user_tag", "human"): "user", fmt.tag("assistant_tag", "gpt"): "assistant",
             fmt.tag("system_tag", "system"): "system"}
    unsupported = {fmt.tag("observation_tag", "observation"), fmt.tag("function_tag", "function_call")}
    messages = []
    for i, item in enumerate(items):
        role = item.get(role_tag) if isinstance(item, dict) else None
        if role in unsupported:
            raise DataError(*where, f"message {i}: role {role!r} (tool use) is not supported")
        if role not in roles or content_tag not in item:
            raise DataError(*where, f"message {i}: expected {{{role_tag!r}: one of {sorted(roles)}, "
                                    f"{content_tag!r}: text}} (tags of the dataset_info.json entry), got "
                                    f"keys {sorted(item) if isinstance(item, dict) else type(item).__name__}")
        messages.append((roles[role], item[content_tag]))
    system_key = fmt.column("system")
    parsed = ParsedRecord(messages, record.get(system_key) if system_key else None,
                          used_keys={key, *([system_key] if system_key else [])})
    return _media(record, where, fmt, parsed)


def read_alpaca(record: dict, where: tuple[str, int], fmt: RecordFormat) -> ParsedRecord:
    def text(name: str) -> Optional[str]:
        key = fmt.column(name)
        value = record.get(key) if key else None
        if value is not None and not isinstance(value, str):
            raise DataError(*where, f'column "{name}" ({key!r}) must be a string')
        return value

    messages: list[tuple[str, Any]] = []
    history_key = fmt.column("history")
    for pair in (record.get(history_key) or []) if history_key else []:
        if not (isinstance(pair, list) and len(pair) == 2):
            raise DataError(*where, f'column "history" ({history_key!r}) must be a list of [query, response]')
        messages += [("user", pair[0]), ("assistant", pair[1])]
    response = text("response")
    if response is None:
        raise DataError(*where, f'column "response" ({fmt.column("response")!r}) is missing; record keys are '
                                f"{sorted(record)}")
    messages += [("user", join_prompt(text("prompt") or "", text("query"))), ("assistant", response)]
    used = {fmt.column(n) for n in ("prompt", "query", "response", "history", "system")} - {None}
    return _media(record, where, fmt, ParsedRecord(messages, text("system"), used_keys=used))
