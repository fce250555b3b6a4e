"""Annotation and meta files as bytes → text → JSON values, told apart by content, not by file name.

Encoding: UTF-8 (with or without BOM); UTF-16/32 are decoded when a BOM or the NUL-byte pattern of JSON text
says so (Windows Notepad's "Unicode" is UTF-16 LE with BOM). Layout: a file whose first non-blank character is
`[` is one JSON list of records; `{` is one object or JSONL (one object per line, CRLF and blank lines allowed), so JSONL named
`.json` and a JSON list named `.jsonl` both read as written, as HF `datasets`, LLaMA-Factory and ms-swift read them.
"""
from __future__ import annotations

import codecs
import json
from typing import Any

from autoparallel.data.schema import DataError

_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


def detect_encoding(data: bytes) -> str:
    """The codec of JSON text: its BOM, else the NUL pattern of its first (ASCII) characters (RFC 4627 §3)."""
    for bom, codec in _BOMS:
        if data.startswith(bom):
            return codec
    head = data[:4]
    if len(head) == 4:
        nuls = tuple(b == 0 for b in head)
        patterns = {(True, True, True, False): "utf-32-be", (False, True, True, True): "utf-32-le",
                    (True, False, True, False): "utf-16-be", (False, True, False, True): "utf-16-le"}
        if nuls in patterns:
            return patterns[nuls]
    return "utf-8"


def decode_text(data: bytes, path: str) -> tuple[str, bool]:
    """(text, valid UTF-8). Bytes that are not valid in the detected encoding: UTF-8 keeps going with
    surrogate escapes (only the records holding them are rejected); UTF-16/32 is refused naming the encoding."""
    codec = detect_encoding(data)
    if codec.startswith("utf-8"):
        try:
            return data.decode("utf-8-sig"), True
        except UnicodeDecodeError:
            return data.decode("utf-8-sig", "surrogateescape"), False
    try:
        return data.decode(codec).lstrip("\ufeff"), True
    except UnicodeDecodeError as e:
        raise DataError(path, None, f"looks like {codec.upper()} text but does not decode ({e.reason} at byte "
                                    f"{e.start}); save the file as UTF-8", kind="invalid text") from None


def parse_json_values(text: str, path: str) -> tuple[Any, bool]:
    """(value, is_jsonl): a JSON document, or the list of a JSONL file's lines (an unparsable line becomes a
    DataError entry naming its line, so it can be skipped). Empty files and other layouts raise one clear line."""
    stripped = text.lstrip()
    if not stripped:
        raise DataError(path, None, "the file is empty", kind="invalid JSON")
    if stripped[0] == "{":
        try:  # one object: a meta file, or a one-line JSONL file
            return json.loads(text), False
        except json.JSONDecodeError as e:
            whole_error = e
        values: list[Any] = []
        for line_no, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                values.append(json.loads(line))
            except json.JSONDecodeError as e:
                values.append(DataError(path, len(values), f"invalid JSON on line {line_no}: {e}"
                                        + (" (a JSONL file holds one whole record per line)"
                                           if line.strip() in ("{", "}") or "Expecting" in e.msg else ""),
                                        kind="invalid JSON"))
        if values and all(isinstance(v, DataError) for v in values):  # neither JSON nor JSONL
            raise DataError(path, None, f"invalid JSON: {whole_error}", kind="invalid JSON")
        return values, True
    try:
        return json.loads(text), False
    except json.JSONDecodeError as e:
        start = repr(stripped[:1])
        hint = "" if stripped[0] == "[" else f" (the file starts with {start}, expected '[' or '{{')"
        raise DataError(path, None, f"invalid JSON: {e}{hint}", kind="invalid JSON") from None


def read_json_file(path: str) -> tuple[Any, bool]:
    """(value, is_jsonl) of a meta or annotation file (module docstring); non-UTF-8 bytes raise."""
    with open(path, "rb") as f:
        data = f.read()
    text, valid = decode_text(data, path)
    if not valid:
        bad = next(ord(c) - 0xDC00 for c in text if 0xDC80 <= ord(c) <= 0xDCFF)
        raise DataError(path, None, f"text is not valid UTF-8 (byte 0x{bad:02x}); save the file as UTF-8",
                        kind="invalid text")
    return parse_json_values(text, path)
