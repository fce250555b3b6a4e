"""The one module of workarounds for what Paddle 3.3.1's CPU build lacks in semi-auto parallel.

Each patch fills a missing kernel with an equivalent composition and is installed only when the kernel is
missing (probed, or: this process runs on the CPU place). `apply()` is idempotent and a no-op on any device
place (CUDA, ROCm, XPU, custom devices have the kernels); a CUDA build running on CPU gets the patches.

- `reshard` Partial -> Shard: no CPU kernel for `CReduceScatterOp` (gloo has no reduce_scatter). Done as
  Partial -> Replicate (all_reduce) then Replicate -> Shard (local slice): the same result, 2x the bytes.
  Sharding stage 1/2/3 reshard Partial grads to Shard through the Python `reshard`, so patching it suffices.
  Reshards Paddle inserts inside C++ op dispatch cannot be patched — the plans avoid them (placements/).
- `Tensor.cuda()`: `dist.load_state_dict` (flex_checkpoint.dcp) stages tensors with `.cuda()`, which raises
  on a CPU build. On a CPU build there is no device to move to, so `.cuda()` becomes a CPU clone.
- ZeRO stage 3: a dp-sharded weight meeting a dp-sharded batch makes the C++ op dispatch reshard a Partial
  output to Shard (CReduceScatterOp again, inside `linear`; not patchable from Python). Under
  `zero3_gathered(model)` (step.py wraps the forward in it) the forward uses all-gathered copies of the dp
  shards (`_GatherShards`) whose backward all-reduces the gradient and keeps this rank's slice. `parallelize`
  enables it on CPU builds only; elsewhere the context manager does nothing.
- Sequence parallel: the autograd backward of `reshard` Shard -> Replicate is a C++ reshard of the gradient
  (Partial -> Shard: CReduceScatterOp again). `reshard_python_backward` is a reshard whose backward calls the
  Python (patched) `reshard` instead, so the gradient goes Partial -> Replicate -> Shard.
- Context parallel (Ulysses): `reshard` Shard(i) -> Shard(j) on one mesh dim is an all-to-all, which gloo
  lacks. `all_to_all_via_gather` goes through Replicate (all-gather, then local slice); the autograd backward
  of each half is again an all-gather or a slice, so no missing kernel is reached.
- `ProcessMesh.get_rank_by_dim_and_process_id`: does `int(np.where(...)[i])` on a 1-element array, which
  NumPy >= 2 may refuse (used by `shard_dataloader`). Only patched when that conversion fails here
  (the pinned NumPy 1.26 accepts it, so this is normally not installed).
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import numpy as np
import paddle
import paddle.distributed as dist
from paddle.autograd import PyLayer
from paddle.distributed.auto_parallel import api as _api
from paddle.distributed.auto_parallel.process_mesh import ProcessMesh

from network.log import logger

_applied: list[str] = []


def _partial_to_shard_axes(tensor: paddle.Tensor, placements) -> list[int]:
    """Mesh axes where `tensor` is Partial and the target is Shard."""
    if not tensor.is_dist():
        return []
    return [
        i for i, (src, dst) in enumerate(zip(tensor.placements, placements))
        if isinstance(src, dist.Partial) and isinstance(dst, dist.Shard)
    ]


def _patch_partial_to_shard() -> None:
    original = _api.reshard

    def reshard(dist_tensor, mesh, placements):
        axes = _partial_to_shard_axes(dist_tensor, placements)
        if axes and dist_tensor.process_mesh == mesh:
            via = list(placements)
            for i in axes:
                via[i] = dist.Replicate()
            dist_tensor = original(dist_tensor, mesh, via)
        return original(dist_tensor, mesh, placements)

    # `paddle.distributed.reshard` and the module-level name used inside api.py (sharding stages).
    _api.reshard = reshard
    dist.reshard = reshard
    _applied.append("reshard Partial->Shard as Partial->Replicate->Shard (no CPU CReduceScatterOp)")


def _patch_tensor_cuda() -> None:
    def cuda(self, device_id=None, blocking=True):
        return self.clone()

    paddle.Tensor.cuda = cuda
    _applied.append("Tensor.cuda() -> CPU clone (checkpoint loading on a CPU build)")


def _numpy_rejects_array_to_int() -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            int(np.where(np.zeros([1, 1]) == 0)[0])
    except TypeError:
        return True
    return False


def _patch_mesh_rank_lookup() -> None:
    def get_rank_by_dim_and_process_id(self, dim, process_id):
        if process_id not in self._process_ids:
            return -1
        if dim is None:
            return 0
        name = self._dim_names[dim] if isinstance(dim, int) else dim
        return int(np.where(self._mesh == process_id)[self._dim_names.index(name)][0])

    ProcessMesh.get_rank_by_dim_and_process_id = get_rank_by_dim_and_process_id
    _applied.append("ProcessMesh rank lookup without ndarray->int (NumPy >= 2)")


class _GatherShards(PyLayer):
    """Replicated copy of a dp-sharded parameter; backward: all-reduce the gradient, keep this rank's slice."""

    @staticmethod
    def forward(ctx, param: paddle.Tensor, axis: int) -> paddle.Tensor:
        ctx.mesh, ctx.placements = param.process_mesh, param.placements
        full = list(param.placements)
        full[axis] = dist.Replicate()
        return dist.reshard(param, param.process_mesh, full)

    @staticmethod
    def backward(ctx, grad: paddle.Tensor) -> paddle.Tensor:
        return dist.reshard(grad, ctx.mesh, ctx.placements)  # Partial -> Shard, decomposed by the patch above


class _PythonBackwardReshard(PyLayer):
    """`dist.reshard`; backward: the gradient back to the input's layout (Partial read as Replicate) via
    the Python `reshard`, so a Partial gradient reaching a Shard input is all-reduced then sliced."""

    @staticmethod
    def forward(ctx, x: paddle.Tensor, placements: list) -> paddle.Tensor:
        # Fresh objects, not x's: a non-leaf's mesh/placements die with it (a stored `x.process_mesh` crashed
        # the backward with bad_alloc). The gradient of a Partial input is the full gradient: Replicate.
        ctx.placements = [dist.Shard(p.get_dim()) if p.is_shard() else dist.Replicate() for p in x.placements]
        return dist.reshard(x, x.process_mesh, placements)

    @staticmethod
    def backward(ctx, grad: paddle.Tensor) -> paddle.Tensor:
        return dist.reshard(grad, grad.process_mesh, ctx.placements)


def reshard_python_backward(x: paddle.Tensor, placements: list) -> paddle.Tensor:
    """`dist.reshard(x, x.process_mesh, placements)` with a backward that needs no reduce_scatter kernel."""
    return _PythonBackwardReshard.apply(x, placements)


def enable_zero3_gather(model: paddle.nn.Layer, axis: int) -> None:
    """Mark `model` so `zero3_gathered` swaps in gathered copies of its parameters sharded on mesh `axis`."""
    model._zero3_gather_axis = axis


@contextlib.contextmanager
def zero3_gathered(model: paddle.nn.Layer) -> Iterator[None]:
    """Within the block, every parameter of `model` sharded on the marked axis is an all-gathered copy whose
    gradient flows back to the shard. A no-op unless `enable_zero3_gather` marked the model (CPU, stage 3)."""
    axis = getattr(model, "_zero3_gather_axis", None)
    swapped = []
    if axis is not None:
        for sub in [model, *model.sublayers()]:
            for name, param in list(sub._parameters.items()):
                if param is not None and param.is_dist() and isinstance(param.placements[axis], dist.Shard):
                    swapped.append((sub, name, param))
                    delattr(sub, name)
                    setattr(sub, name, _GatherShards.apply(param, axis))
    try:
        yield
    finally:
        for sub, name, param in swapped:
            delattr(sub, name)
            setattr(sub, name, param)


def runs_on_cpu() -> bool:
    """This process computes on the CPU place: what the patches are keyed on (not on how Paddle was built)."""
    return isinstance(paddle.framework._current_expected_place_(), paddle.CPUPlace)


def apply() -> list[str]:
    """Install the workarounds the CPU place needs; returns their descriptions (empty on a device place)."""
    if _applied or not runs_on_cpu():
        return list(_applied)
    _patch_partial_to_shard()
    _patch_tensor_cuda()
    if _numpy_rejects_array_to_int():
        _patch_mesh_rank_lookup()
    for line in _applied:
        logger.info("cpu_compat: %s", line)
    return list(_applied)


def all_to_all_via_gather(x: paddle.Tensor, placements: list) -> paddle.Tensor:
    """`dist.reshard(x, x.process_mesh, placements)` for a Shard(i) -> Shard(j) change on a mesh dim, as
    all-gather + local slice (CPU: gloo has no all_to_all). Holds the gathered tensor transiently."""
    via = [dist.Replicate() if src != dst else src for src, dst in zip(x.placements, placements)]
    return dist.reshard(dist.reshard(x, x.process_mesh, via), x.process_mesh, placements)
