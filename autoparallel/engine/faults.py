"""Fault injection — a test tool, documented in docs/RELIABILITY.md, never set in production.

`QWEN2VL_AP_FAULT="rank=R,step=N,at=train|save|hang|nan"` acts on rank R at step N:
  train  die abruptly (`os._exit`, no cleanup, like a killed process or a lost node) right after optimizer step N
  save   die in the middle of writing checkpoint-N (after its tensors, before it is published)
  hang   stop making progress (sleep forever) right after step N, like a rank stuck on a dead file system
  nan    multiply this rank's loss of step N by NaN before backward, so loss and gradients of the step are NaN
  sigkill  SIGKILL itself right after optimizer step N, as the out-of-memory killer does
The launcher stops the other ranks of a dead rank; a hung rank is ended by the timeouts (see RELIABILITY.md).
"""
from __future__ import annotations

import os
import signal
import time

from network.log import logger

ENV = "QWEN2VL_AP_FAULT"
EXIT_CODE = 17
ACTIONS = ("train", "save", "hang", "nan", "sigkill")


def _parse(spec: str) -> dict[str, str]:
    try:
        fields = dict(part.split("=", 1) for part in spec.split(",") if part)
        int(fields["rank"]), int(fields["step"])
    except (ValueError, KeyError):
        raise ValueError(f"{ENV}={spec!r}: expected rank=R,step=N,at={'|'.join(ACTIONS)}") from None
    if fields.setdefault("at", "train") not in ACTIONS:
        raise ValueError(f"{ENV}={spec!r}: at must be one of {', '.join(ACTIONS)}")
    return fields


def _requested(rank: int, step: int, at: str) -> bool:
    spec = os.environ.get(ENV)
    if not spec:
        return False
    fields = _parse(spec)
    return int(fields["rank"]) == rank and int(fields["step"]) == step and fields["at"] == at


def maybe_fail(rank: int, step: int, at: str) -> None:
    """At `train` also applies a requested `hang` of the same step."""
    if _requested(rank, step, at):
        logger.error("fault injection: rank %d dies at %s of step %d", rank, at, step)
        os._exit(EXIT_CODE)
    if at == "train" and _requested(rank, step, "sigkill"):
        logger.error("fault injection: rank %d sends itself SIGKILL after step %d", rank, step)
        os.kill(os.getpid(), signal.SIGKILL)
    if at == "train" and _requested(rank, step, "hang"):
        logger.error("fault injection: rank %d hangs after step %d", rank, step)
        while True:
            time.sleep(3600)


def poison_loss(rank: int, step: int) -> bool:
    """True when this rank's loss of `step` must be made NaN (`at=nan`)."""
    if _requested(rank, step, "nan"):
        logger.error("fault injection: rank %d poisons the loss of step %d with NaN", rank, step)
        return True
    return False
