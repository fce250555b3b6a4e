"""Checkpoint directories: atomic publication, rotation, discovery of the latest complete one.

Layout of `output_dir/checkpoint-N/`:
  dist_ckpt/            `dist.save_state_dict` of model + optimizer (`{rank}_{uid}.distcp` + `{uid}.metadata`)
  trainer_state.json    step, epoch, data-loader position, LR-scheduler state, metrics so far (written last)
  rng_state_{rank}.pkl  Python/NumPy/Paddle RNG states of each rank
  config.yaml, config.json, tokenizer/processor files

Every rank writes into `output_dir/.tmp-checkpoint-N/`; after a barrier rank 0 renames it to `checkpoint-N`.
A crash at any point before the rename leaves only a `.tmp-` directory, which discovery ignores and the next
save of the same step replaces, so a previous checkpoint is never damaged. The output directory must be on a
file system shared by all nodes (as for Paddle's own dist checkpoints).
"""
from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import paddle
from safetensors import SafetensorError

from autoparallel.engine import faults
from network.formats import CheckpointError
from network.log import logger

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"
DIST_DIR = "dist_ckpt"


# safetensors reports a full disk as SafetensorError("... No space left on device"), not as OSError.
WRITE_ERRORS = (OSError, SafetensorError)


def _write_failed(what: str, path: Path, exc: Exception) -> CheckpointError:
    """A write error naming the path, the cause and the free space left there."""
    try:
        free = f"; {shutil.disk_usage(path if path.exists() else path.parent).free / 2**20:.0f} MiB free there"
    except OSError:
        free = ""
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return CheckpointError(f"{what} {path} failed: {reason}{free}; previous checkpoints are untouched")


def is_complete(path: Path) -> bool:
    """A checkpoint is usable when its trainer state and the dist metadata exist."""
    return (path / TRAINER_STATE).is_file() and any((path / DIST_DIR).glob("*.metadata"))


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = CHECKPOINT_RE.match(child.name)
        if match and child.is_dir() and is_complete(child):
            found.append((int(match.group(1)), child))
    return sorted(found)


def resolve_resume_path(resume: Optional[str], output_dir: str) -> Optional[Path]:
    """`auto` → latest complete checkpoint in output_dir (None if there is none); a path must be complete."""
    if not resume:
        return None
    if resume == "auto":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1][1] if checkpoints else None
    path = Path(resume)
    if path.name == DIST_DIR:
        path = path.parent
    if not path.is_dir():
        raise CheckpointError(f"resume_from_checkpoint={resume!r}: no such directory")
    if not is_complete(path):
        raise CheckpointError(
            f"resume_from_checkpoint={resume!r} is incomplete (needs {TRAINER_STATE} and {DIST_DIR}/*.metadata)")
    return path


def check_writable(output_dir: str | os.PathLike) -> None:
    """Fail early, with the path in the message, when the output directory cannot be written."""
    root = Path(output_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise CheckpointError(f"output_dir {str(root)!r} is not writable: {exc.strerror or exc}") from None


def capture_rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "paddle": paddle.get_rng_state()}


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    paddle.set_rng_state(state["paddle"])


class CheckpointWriter:
    """Writes `checkpoint-N` atomically. `save` is called on every rank in the same order."""

    def __init__(self, output_dir: str, rank: int, barrier: Callable[[], None], save_total_limit: int = 0):
        self.output_dir = Path(output_dir)
        self.rank = rank
        self.barrier = barrier
        self.save_total_limit = save_total_limit

    def tmp_dir(self, step: int) -> Path:
        return self.output_dir / f".tmp-checkpoint-{step}"

    def save(self, step: int, save_tensors: Callable[[str], None], trainer_state: dict[str, Any],
             write_extra_files: Callable[[Path], None]) -> Path:
        tmp, final = self.tmp_dir(step), self.output_dir / f"checkpoint-{step}"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a crashed save of the same step
            try:
                tmp.mkdir(parents=True)
            except OSError as exc:
                raise _write_failed(f"creating checkpoint-{step} as", tmp, exc) from exc
        self.barrier()
        try:
            save_tensors(str(tmp / DIST_DIR))
            with open(tmp / f"rng_state_{self.rank}.pkl", "wb") as handle:
                pickle.dump(capture_rng_state(), handle)
            if self.rank == 0:
                write_extra_files(tmp)
            faults.maybe_fail(self.rank, step, "save")
        except WRITE_ERRORS as exc:
            raise _write_failed(f"writing checkpoint-{step} into", tmp, exc) from exc
        self.barrier()
        if self.rank == 0:
            try:
                # trainer_state.json is the completeness marker, so it is written after every other file.
                (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2))
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
            except OSError as exc:
                raise _write_failed(f"publishing checkpoint-{step} from", tmp, exc) from exc
            self._rotate()
            logger.info("saved %s", final)
        self.barrier()
        return final

    def _rotate(self) -> None:
        if self.save_total_limit <= 0:
            return
        for _, path in list_checkpoints(self.output_dir)[: -self.save_total_limit]:
            shutil.rmtree(path, ignore_errors=True)
            logger.info("removed %s (save_total_limit=%d)", path, self.save_total_limit)


def load_trainer_state(path: Path) -> dict[str, Any]:
    return json.loads((path / TRAINER_STATE).read_text())


def load_rng_state(path: Path, rank: int) -> Optional[dict[str, Any]]:
    """RNG state of `rank`, or None when the checkpoint came from a smaller world (new ranks keep their seed)."""
    file = path / f"rng_state_{rank}.pkl"
    if not file.is_file():
        return None
    with open(file, "rb") as handle:
        return pickle.load(handle)
