"""Checkpoint directories: atomic publication, rotation, discovery of the latest complete one.

Layout of `output_dir/checkpoint-N/`:
  dist_ckpt/            `dist.save_state_dict` of model + optimizer (`{rank}_{uid}.distcp` + `{uid}.metadata`)
  trainer_state.json    step, epoch, data-loader position, LR-scheduler state, metrics so far (written last)
  rng_state_{rank}.pkl  Python/NumPy/Paddle RNG states of each rank (read back with a restricted unpickler)
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
import paddle.distributed as dist
from safetensors import SafetensorError

from autoparallel.engine import faults
from network.formats import (NUMPY_ARRAY_GLOBALS, CheckpointError, FormatError, index_safetensors, load_metadata,
                             load_restricted_pickle)
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
        if checkpoints:
            check_dist_files(checkpoints[-1][1] / DIST_DIR)
        return checkpoints[-1][1] if checkpoints else None
    path = Path(resume)
    if path.name == DIST_DIR:
        path = path.parent
    if not path.is_dir():
        raise CheckpointError(f"resume_from_checkpoint={resume!r}: no such directory")
    if not is_complete(path):
        raise CheckpointError(
            f"resume_from_checkpoint={resume!r} is incomplete (needs {TRAINER_STATE} and {DIST_DIR}/*.metadata)")
    check_dist_files(path / DIST_DIR)
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


def _device_generator():
    """The Paddle generator of this process's device only. `paddle.get_rng_state()` on a GPU returns one state per
    visible device, and `set_rng_state` refuses a list of another length: resuming 1x8 GPUs as 2x4 would crash."""
    place = paddle.framework._current_expected_place_()
    if isinstance(place, paddle.CUDAPlace):
        return paddle.base.core.default_cuda_generator(place.get_device_id())
    if isinstance(place, paddle.XPUPlace):
        return paddle.base.core.default_xpu_generator(place.get_device_id())
    if isinstance(place, paddle.CustomPlace):
        return paddle.base.core.default_custom_device_generator(place)
    return paddle.base.core.default_cpu_generator()


def capture_rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "paddle_device": _device_generator().get_state()}


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "paddle_device" in state:
        _device_generator().set_state(state["paddle_device"])
        return
    saved = state["paddle"]  # older checkpoints: the states of every device of the saving process
    current = paddle.get_rng_state()
    if len(saved) == len(current):
        paddle.set_rng_state(saved)
    else:
        logger.warning("rng state: saved for %d devices, this process sees %d; Paddle's generator keeps its seed",
                       len(saved), len(current))


BEST_LINK = "best"


class CheckpointWriter:
    """Writes `checkpoint-N` atomically. `save` is called on every rank in the same order."""

    def __init__(self, output_dir: str, rank: int, barrier: Callable[[], None], save_total_limit: int = 0):
        self.output_dir = Path(output_dir)
        self.rank = rank
        self.barrier = barrier
        self.save_total_limit = save_total_limit
        self.best_step: Optional[int] = None  # metric_for_best_model's checkpoint: linked as `best`, never rotated

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
            self._link_best()
            self._rotate()
            logger.info("saved %s", final)
        self.barrier()
        return final

    def _link_best(self) -> None:
        """Point the `best` symlink at checkpoint-<best_step> (replaced atomically)."""
        if self.best_step is None or not (self.output_dir / f"checkpoint-{self.best_step}").is_dir():
            return
        tmp = self.output_dir / f".tmp-{BEST_LINK}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(f"checkpoint-{self.best_step}")
        os.replace(tmp, self.output_dir / BEST_LINK)

    def _rotate(self) -> None:
        if self.save_total_limit <= 0:
            return
        rotating = [(step, path) for step, path in list_checkpoints(self.output_dir) if step != self.best_step]
        for _, path in rotating[: -self.save_total_limit]:
            shutil.rmtree(path, ignore_errors=True)
            logger.info("removed %s (save_total_limit=%d)", path, self.save_total_limit)


MASTER_PREFIX = "master_weights."


def inner_optimizer(optimizer: paddle.optimizer.Optimizer) -> paddle.optimizer.Optimizer:
    """The Paddle optimizer inside the sharding / AMP wrappers (it owns the master weights)."""
    while hasattr(optimizer, "_inner_opt"):
        optimizer = optimizer._inner_opt
    return optimizer


def optimizer_tensors(optimizer: paddle.optimizer.Optimizer) -> dict[str, paddle.Tensor]:
    """Every tensor of the optimizer's state under a flat key: moments and powers as Paddle names them, fp32 master
    weights (multi_precision) as `master_weights.<param name>`. The nested `master_weights` dict of
    `Optimizer.state_dict()` saves, but `dist.load_state_dict` in Paddle 3.3.1 raises KeyError on it; without
    them a bf16 resume would rebuild masters from the pre-load weights and overwrite the loaded ones at the first
    step. The LR scheduler and other Python values go to trainer_state.json instead."""
    state = {}
    for key, value in optimizer.state_dict().items():
        if isinstance(value, paddle.Tensor):
            state[key] = value
        elif key == "master_weights":
            state.update({MASTER_PREFIX + name: tensor for name, tensor in value.items()})
    return state


def saved_keys(dist_dir: Path) -> set[str]:
    """The tensor keys a dist checkpoint holds (from its `.metadata`, read without paddle's unpickler)."""
    keys: set[str] = set()
    for file in dist_dir.glob("*.metadata"):
        keys.update(load_metadata(str(file)).state_dict_metadata)
    return keys


def reseed_master_weights(optimizer: paddle.optimizer.Optimizer, params: list[paddle.Tensor]) -> int:
    """Set each fp32 master weight to its (just loaded) low-precision parameter; for checkpoints written before
    masters were saved. Returns how many were set."""
    masters = inner_optimizer(optimizer)._master_weights
    count = 0
    with paddle.no_grad():
        for param in params:
            master = masters.get(param.name)
            if master is None:
                continue
            value = param.astype("float32")
            if master.is_dist():
                value = dist.reshard(value, master.process_mesh, master.placements)
                master._local_value().set_value(value._local_value())
            else:
                master.set_value(value)
            count += 1
    return count


def load_dist_state(state: dict[str, paddle.Tensor], dist_dir: Path, optimizer: paddle.optimizer.Optimizer,
                    params: list[paddle.Tensor]) -> int:
    """`dist.load_state_dict` of `state` (model + `optimizer_tensors`) from `dist_dir`, in place. A checkpoint
    written without master weights (older versions) loads everything else and the masters are rebuilt from the
    loaded weights; returns how many were rebuilt (0 otherwise)."""
    masters = [k for k in state if k.startswith(MASTER_PREFIX)]
    old_format = bool(masters) and not set(masters) & saved_keys(dist_dir)
    if old_format:
        state = {k: v for k, v in state.items() if not k.startswith(MASTER_PREFIX)}
    check_dist_files(dist_dir)  # again here, in the process that loads: the files Paddle reads are the checked ones
    # safetensors=True always: Paddle then parses every data file with the safetensors library, never pickle.
    dist.load_state_dict(state, str(dist_dir), safetensors=True)
    return reseed_master_weights(optimizer, params) if old_format else 0


def load_trainer_state(path: Path) -> dict[str, Any]:
    return json.loads((path / TRAINER_STATE).read_text())


def load_rng_state(path: Path, rank: int) -> Optional[dict[str, Any]]:
    """RNG state of `rank`, or None when the checkpoint came from a smaller world (new ranks keep their seed)."""
    file = path / f"rng_state_{rank}.pkl"
    if not file.is_file():
        return None
    # Restricted: numpy arrays and Paddle's generator state only, so a crafted file cannot run code.
    allowed = {**NUMPY_ARRAY_GLOBALS, ("paddle.base.libpaddle", "GeneratorState"): type(paddle.get_rng_state()[0])}
    try:
        return load_restricted_pickle(file, allowed)
    except FormatError as exc:
        raise CheckpointError(f"resume_from_checkpoint: {exc}") from None


def check_dist_files(dist_dir: Path) -> None:
    """Refuse, naming the file, a dist checkpoint that Paddle's `dist.load_state_dict` should not open.

    Resume accepts safetensors rank files only (what the trainer writes). A `.distcp` rank file is a pickle that
    Paddle would load with plain `pickle.load`; validating it with a different parser first is not enough (the
    pure-Python indexer and the C unpickler once disagreed about a payload crossing a frame, so a file that
    indexed as `{}` ran code in Paddle). Reading `.distcp` slices with our own reader instead would mean
    re-implementing Paddle's resharding of model and optimizer state for every placement. Refusing them keeps
    one parser per file: safetensors files are parsed by the safetensors library (data only, no code path) after
    `index_safetensors` checked their headers, and `*.metadata`, which Paddle unpickles, is first read by the
    same C unpickler with an allow-list of Paddle's metadata classes (`load_metadata`). Every file the metadata
    names must be one of these safetensors files, so it cannot point Paddle anywhere else."""
    pickled = sorted(dist_dir.glob("*.distcp"))
    if pickled:
        raise CheckpointError(f"resume_from_checkpoint: refusing {pickled[0]}: a pickled rank file; resume loads "
                              f"only safetensors dist checkpoints (what training writes) and never unpickles tensors")
    safetensors = {file.name for file in dist_dir.glob("*.safetensors")}
    try:
        for file in sorted(dist_dir.glob("*.metadata")):
            for name in load_metadata(str(file)).storage_metadata.values():
                if not isinstance(name, str) or name not in safetensors:
                    raise CheckpointError(f"resume_from_checkpoint: refusing {file}: it names the data file "
                                          f"{name!r}, which is not a safetensors file in {dist_dir}")
        for name in sorted(safetensors):
            index_safetensors(str(dist_dir / name))
    except FormatError as exc:
        raise CheckpointError(f"resume_from_checkpoint: refusing {exc}") from None
