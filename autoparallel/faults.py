"""Fault injection — a test tool, documented in the README, never set in production.

`QWEN2VL_AP_FAULT="rank=R,step=N,at=train|save"` makes rank R die abruptly (`os._exit`, no cleanup, like a
killed process or a lost node): `at=train` right after optimizer step N, `at=save` in the middle of writing
checkpoint-N (after its tensors, before it is published). The launcher then stops the other ranks.
"""
from __future__ import annotations

import os

from network.log import logger

ENV = "QWEN2VL_AP_FAULT"
EXIT_CODE = 17


def _parse(spec: str) -> dict[str, str]:
    try:
        fields = dict(part.split("=", 1) for part in spec.split(",") if part)
        int(fields["rank"]), int(fields["step"])
    except (ValueError, KeyError):
        raise ValueError(f"{ENV}={spec!r}: expected rank=R,step=N,at=train|save") from None
    if fields.get("at", "train") not in ("train", "save"):
        raise ValueError(f"{ENV}={spec!r}: at must be train or save")
    return fields


def maybe_fail(rank: int, step: int, at: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    fields = _parse(spec)
    if int(fields["rank"]) == rank and int(fields["step"]) == step and fields.get("at", "train") == at:
        logger.error("fault injection: rank %d dies at %s of step %d", rank, at, step)
        os._exit(EXIT_CODE)
