"""Parallel degrees (placements/degrees.py) -> a validated `ProcessMesh` with dims ["dp", "mp"] (["pp", "dp", "mp"]
with pipeline stages).

- "pp" (only when pipeline_parallel_degree > 1: a size-1 dim would only lengthen every placement list) indexes
  pipeline stages; each stage trains on its own ["dp", "mp"] sub-mesh (`stage_mesh`), and activations cross
  stages by send/recv (autoparallel/pipeline.py).
- "cp" (only when context_parallel_degree > 1, between "dp" and "mp": ["dp", "cp", "mp"]) splits every
  sequence (autoparallel/context_parallel.py); context peers read the same samples, like tensor-parallel peers.
  With "mp" too, Ulysses attention splits each mp rank's heads again over "cp".
Ranks are laid out mp-fastest, pp-slowest: rank = ((pp_index * dp + dp_index) * cp + cp_index) * mp + mp_index,
so tensor-parallel peers are neighbours and a stage's ranks are contiguous.

Everything is checked before any process does work; every problem found is reported at once, each message
naming the offending numbers.
"""
from __future__ import annotations

import numpy as np
import paddle.distributed as dist

from autoparallel import cpu_compat
from network.config import Qwen2VLConfig
from placements.degrees import ParallelDegrees, validate_degrees

MESH_DIMS = ("dp", "mp")
PP_DIM = "pp"
CP_DIM = "cp"


def build_mesh(degrees: ParallelDegrees, config: Qwen2VLConfig | None = None,
               world_size: int | None = None, *, allow_pipeline: bool = False) -> dist.ProcessMesh:
    """Validated ["dp", "mp"] mesh over ranks 0..world-1 (world size read from the launcher when not given);
    ["pp", "dp", "mp"] when pipeline_parallel_degree > 1, ["dp", "cp", "mp"] when context_parallel_degree > 1."""
    world_size = dist.get_world_size() if world_size is None else world_size
    validate_degrees(degrees, config, world_size, allow_pipeline=allow_pipeline,
                     cpu_build=cpu_compat.runs_on_cpu())
    if degrees.pipeline_parallel_degree > 1:
        ids = np.arange(degrees.world_size).reshape(degrees.pipeline_parallel_degree, degrees.dp, degrees.mp)
        return dist.ProcessMesh(ids.tolist(), dim_names=[PP_DIM, *MESH_DIMS])
    if degrees.cp > 1:
        ids = np.arange(degrees.world_size).reshape(degrees.dp, degrees.cp, degrees.mp)
        return dist.ProcessMesh(ids.tolist(), dim_names=["dp", CP_DIM, "mp"])
    ids = np.arange(degrees.world_size).reshape(degrees.dp, degrees.mp)
    return dist.ProcessMesh(ids.tolist(), dim_names=list(MESH_DIMS))


def stage_mesh(mesh: dist.ProcessMesh, stage: int | None = None) -> dist.ProcessMesh:
    """The ["dp", "mp"] sub-mesh of pipeline `stage` (default: this rank's); `mesh` itself without a "pp" dim."""
    if PP_DIM not in mesh.dim_names:
        return mesh
    stage = mesh_coordinate(mesh, PP_DIM) if stage is None else stage
    ids = np.asarray(mesh.process_ids).reshape(mesh.shape)
    return dist.ProcessMesh(np.take(ids, stage, axis=mesh.dim_names.index(PP_DIM)).tolist(), dim_names=list(MESH_DIMS))


def mesh_coordinate(mesh: dist.ProcessMesh, dim: str, rank: int | None = None) -> int:
    """This rank's index along `dim` (e.g. which dp shard of the data to read)."""
    rank = dist.get_rank() if rank is None else rank
    ids = np.asarray(mesh.process_ids).reshape(mesh.shape)
    return int(np.argwhere(ids == rank)[0][mesh.dim_names.index(dim)])
