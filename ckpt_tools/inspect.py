"""inspect: what a dist checkpoint or model directory holds, and whether it is complete.

Reads only metadata, file headers and pickle opcode frames, never tensor data, so it is fast on any size.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from ckpt_tools.distckpt import DistCheckpoint, is_dist_checkpoint
from ckpt_tools.merge import model_dir_of
from ckpt_tools.model_dir import check_shapes, expected_shapes
from network.formats import FormatError, index_file
from network.weights import canonical_name, is_linear_weight, weight_files


@dataclass
class TensorRow:
    name: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    where: list[str]  # dist: "file @offset shape" per slice; model dir: the file


@dataclass
class InspectReport:
    path: str
    kind: str  # "dist_checkpoint" | "model_dir"
    tensors: list[TensorRow] = field(default_factory=list)
    files: dict[str, int] = field(default_factory=dict)  # file -> size on disk
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.problems

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def render(self, max_slices: int = 8) -> str:
        lines = [f"{self.kind.replace('_', ' ')}: {self.path}"]
        lines += [f"  {name}  {_size(size)}" for name, size in sorted(self.files.items())]
        lines += [f"note: {n}" for n in self.notes]
        width = max((len(t.name) for t in self.tensors), default=10)
        lines.append(f"{'tensor':<{width}}  {'shape':<22} {'dtype':<9} {'bytes':>9}  where")
        for t in self.tensors:
            where = "; ".join(t.where[:max_slices]) + (f"; ... {len(t.where) - max_slices} more"
                                                        if len(t.where) > max_slices else "")
            lines.append(f"{t.name:<{width}}  {str(list(t.shape)):<22} {t.dtype:<9} {_size(t.nbytes):>9}  {where}")
        lines.append(f"{len(self.tensors)} tensors, {_size(self.total_bytes)} ({self.total_bytes} bytes)")
        if self.complete:
            lines.append("COMPLETE: every element of every tensor is stored exactly once" if self.kind ==
                         "dist_checkpoint" else "OK: all weight files readable")
        else:
            lines.append(f"INCOMPLETE: {len(self.problems)} problem(s)")
            lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


def _file_sizes(directory: str) -> dict[str, int]:
    return {n: os.path.getsize(os.path.join(directory, n)) for n in os.listdir(directory)
            if os.path.isfile(os.path.join(directory, n))}


def _config_problems(found: dict, model_dir: str, where: dict) -> tuple[list[str], Optional[str]]:
    try:
        expected = expected_shapes(model_dir)
    except (ValueError, KeyError, OSError) as exc:
        return [f"config.json in {model_dir} is unreadable: {exc}"], None
    if expected is None:
        return [], f"no config.json in {model_dir}: shapes not checked against the model"
    return check_shapes(found, expected, model_dir, where), None


def inspect_dist(path: str) -> InspectReport:
    ck = DistCheckpoint(path)
    report = InspectReport(ck.path, "dist_checkpoint", files=_file_sizes(ck.path), problems=list(ck.problems))
    report.notes.append(f"metadata {os.path.basename(ck.metadata_file)} (unique id {ck.unique_id})")
    for entry in ck.tensors.values():
        where = [f"rank {s.file.split('_')[0]} ({s.file}) @{list(s.offset)}+{list(s.shape)}"
                 + (f" elements {list(s.flat_range)}" if s.flat_range else "") for s in entry.slices]
        report.tensors.append(TensorRow(entry.key, entry.shape, entry.dtype, entry.nbytes, where))
    model_keys, optim_keys = ck.split_keys()
    report.notes.append(f"{len(model_keys)} model tensors, {len(optim_keys)} optimizer tensors")
    found = {k: ck.tensors[k].shape for k in model_keys}
    problems, note = _config_problems(found, model_dir_of(path), {k: ck.tensors[k].slices[0].file for k in found})
    report.problems += problems
    report.notes += [note] if note else []
    ck.close()
    return report


def inspect_model_dir(path: str) -> InspectReport:
    report = InspectReport(os.path.abspath(path), "model_dir", files=_file_sizes(path))
    files, layout = weight_files(path)
    report.notes.append(f"layout: {'HF (Linear [out, in])' if layout == 'hf' else 'Paddle (Linear [in, out])'}")
    found, where = {}, {}
    for file in files:
        try:
            refs = index_file(file)
        except (FormatError, FileNotFoundError) as exc:
            report.problems.append(str(exc))
            continue
        for name, ref in refs.items():
            dtype = "bfloat16(uint16)" if layout == "paddle" and str(ref.dtype) == "uint16" else str(ref.dtype)
            report.tensors.append(TensorRow(name, ref.shape, dtype, ref.nbytes, [os.path.basename(file)]))
            name = canonical_name(name)
            shape = tuple(reversed(ref.shape)) if layout == "hf" and is_linear_weight(name) else ref.shape
            found[name], where[name] = shape, os.path.basename(file)
    problems, note = _config_problems(found, path, where)
    report.problems += problems
    report.notes += [note] if note else []
    return report


def inspect_path(path: str) -> InspectReport:
    """Inspect a dist checkpoint (`checkpoint-N`, `.../dist_ckpt`) or a model directory."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such directory")
    return inspect_dist(path) if is_dist_checkpoint(path) else inspect_model_dir(path)
