"""Sharded start-up from a checkpoint: every rank reads only its own slices of the weight files.

The model is declared without memory (`Qwen2VLForConditionalGeneration.lazy`, i.e. `paddle.LazyGuard`), the plan is
applied to it (`dist.parallelize` keeps lazy parameters lazy and only records each one's mesh and placements), and
`load_sharded` then fills each parameter: a distributed one from the row/column range of the stored tensor that
its placements give this rank (`SourceTensor.read_paddle_slice`), lifted with `dtensor_from_local` (the CPU build
has no bf16 slicing kernel, and slicing a full tensor would need it in memory anyway); a dense one (the frozen
vision tower, replicated on every rank) whole. Each tensor is converted to its parameter's dtype as it is read, so
a rank's peak is its shard plus one stored tensor.

ZeRO stage 3 shards parameters inside `dist.parallelize` with a reshard that crashes on lazy parameters (a
segmentation fault on the CPU build), so under stage 3 the model is loaded densely (lazy build, one tensor at a
time, training dtype) before it is parallelized: see `needs_dense_load`.
"""
from __future__ import annotations

import paddle
import paddle.distributed as dist

from network.log import logger
from network.weights import SourceTensor, assign, match_weights, to_paddle


def needs_dense_load(sharding_stage: int) -> bool:
    """True when parameters must be materialised before `dist.parallelize` (see the module docstring)."""
    return sharding_stage == 3


def local_range(size: int, parts: int, index: int) -> tuple[int, int]:
    """[start, stop) of piece `index` of `size` split in `parts` the way Paddle shards a dim (ceil-sized pieces,
    the last ones shorter or empty)."""
    chunk = -(-size // parts)
    start = min(size, index * chunk)
    return start, min(size, start + chunk)


def local_box(param: paddle.Tensor, rank: int) -> list[tuple[int, int]]:
    """Per dim, the [start, stop) of the global tensor that `rank` holds of the dist parameter `param`.
    Mesh dims sharding the same tensor dim split it in mesh-dim order."""
    mesh = param.process_mesh
    box = [(0, int(s)) for s in param.shape]
    coordinate = mesh.process_ids.index(rank)
    coords = []
    for extent in reversed(mesh.shape):  # row-major coordinate of this rank on the mesh
        coords.append(coordinate % extent)
        coordinate //= extent
    coords.reverse()
    for axis, placement in enumerate(param.placements):
        if placement.is_shard():
            dim = placement.get_dim()
            start, stop = box[dim]
            lo, hi = local_range(stop - start, mesh.shape[axis], coords[axis])
            box[dim] = (start + lo, start + hi)
        elif placement.is_partial():
            raise ValueError(f"parameter {param.name} is Partial: parameters are Shard or Replicate")
    return box


def read_local(source: SourceTensor, box: list[tuple[int, int]]):
    """This rank's piece of `source` (Paddle layout): the sharded dim read from the file, any further dims sliced."""
    split = [d for d, (start, stop) in enumerate(box) if (start, stop) != (0, source.paddle_shape[d])]
    if not split:
        return source.read_paddle()
    first = split[0]
    array = source.read_paddle_slice(first, *box[first])
    for d in split[1:]:
        array = array[(slice(None),) * d + (slice(*box[d]),)]
    return array


def lazy_parameters(model: paddle.nn.Layer) -> list[str]:
    """Names of the parameters not materialised yet (declared under `paddle.LazyGuard`)."""
    return [name for name, p in model.state_dict().items() if not p._is_initialized()]


def load_sharded(model: paddle.nn.Layer, path: str, part: bool = False) -> None:
    """Fill the lazy parameters of a parallelized `model` from the checkpoint directory `path`, each rank reading
    only what it holds; names and global shapes are checked first (one error lists all). Parameters that exist
    already (LoRA adapters) are left alone; `part`: the model is one pipeline stage of the checkpoint's."""
    rank = dist.get_rank()
    pairs = match_weights(model, path, lazy_parameters(model), part=part)
    local_bytes = 0
    for param, source in pairs:
        if param.is_dist():
            box = local_box(param, rank)
            local = to_paddle(read_local(source, box), param.dtype)
            expected = list(param._local_shape)
            if list(local.shape) != expected:
                raise ValueError(f"{source.name}: read a {list(local.shape)} piece, the parameter holds {expected} "
                                 f"locally (placements {param.placements})")
            value = dist.auto_parallel.api.dtensor_from_local(local, param.process_mesh, param.placements)
        else:
            value = local = to_paddle(source.read_paddle(), param.dtype)
        local_bytes += int(local.numel()) * local.element_size()
        assign(param, value)
    logger.info("loaded this rank's pieces of %d tensors from %s (%.2f GiB on this rank)", len(pairs), path,
                local_bytes / 2**30)


def allocate_for_resume(model: paddle.nn.Layer) -> None:
    """Materialise the lazy parameters as zeros (each rank its local piece) without reading the base weights: a
    resume loads every one of them from its dist checkpoint right after."""
    for name, param in model.state_dict().items():
        if param._is_initialized():
            continue
        if param.is_dist():
            local = paddle.zeros(param._local_shape, param.dtype)
            assign(param, dist.auto_parallel.api.dtensor_from_local(local, param.process_mesh, param.placements))
        else:
            assign(param, paddle.zeros(param.shape, param.dtype))
