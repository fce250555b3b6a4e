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
  lacks (and `batch_isend_irecv` hangs on it). `all_to_all_pairwise` exchanges the chunks of the local tensors
  in pairwise rounds of blocking send/recv: the all-to-all's bytes, one peer chunk in flight (an all-gather
  then slice would hold every peer's tensor). Its caller's PyLayer makes it differentiable (the backward is
  the same exchange with the axes swapped).
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


def _pair_rounds(n: int) -> list[list[int | None]]:
    """Round-robin pairings of n members (circle method): per round, each member's partner (None: it sits the
    round out, n odd). Every pair meets exactly once, in n - 1 rounds (n even) or n (n odd)."""
    m = n + n % 2  # odd n: a phantom member; its partner has no partner that round
    rounds = []
    for r in range(m - 1):
        partner: list[int | None] = [m - 1 if (r - i) % (m - 1) == i else (r - i) % (m - 1) for i in range(m - 1)]
        partner.append(partner.index(m - 1))
        rounds.append([p if p < n else None for p in partner[:n]])
    return rounds


def all_to_all_pairwise(x: paddle.Tensor, ranks: list[int], split_axis: int, concat_axis: int) -> paddle.Tensor:
    """All-to-all of this process's local `x` among the processes `ranks` (global ids, this one among them): chunk
    i of `x` along `split_axis` goes to ranks[i]; the chunks received are concatenated along `concat_axis` in
    the order of `ranks`. Not differentiable itself: its backward is the same exchange with the axes swapped
    (autoparallel/context_parallel.py's `_Exchange`).

    gloo has no all_to_all, and `batch_isend_irecv` hangs on it: pairwise rounds of blocking send/recv, in each
    pair the lower rank sending first, so no round waits on itself. Besides `x` and the result a rank holds one
    chunk at a time (an all-gather would hold every peer's `x`), and it sends exactly the all-to-all's bytes."""
    n, me = len(ranks), ranks.index(dist.get_rank())
    size, width = x.shape[split_axis] // n, x.shape[concat_axis]
    piece_shape = list(x.shape)
    piece_shape[split_axis] = size
    out_shape = list(piece_shape)
    out_shape[concat_axis] = width * n

    def chunk(i: int) -> paddle.Tensor:
        return paddle.slice(x, [split_axis], [i * size], [(i + 1) * size]).contiguous()

    with paddle.no_grad():
        out = paddle.empty(out_shape, x.dtype)

        def place(i: int, piece: paddle.Tensor) -> None:
            # Into a view of `out` (a slice shares its storage under Paddle's stride kernels, the default):
            # item assignment would copy `piece` first.
            paddle.slice(out, [concat_axis], [i * width], [(i + 1) * width]).copy_(piece, False)

        def receive(peer: int) -> None:
            piece = paddle.empty(piece_shape, x.dtype)
            dist.recv(piece, src=ranks[peer])
            place(peer, piece)

        place(me, chunk(me))
        for partners in _pair_rounds(n):
            peer = partners[me]
            if peer is None:
                continue
            if me < peer:
                dist.send(chunk(peer), dst=ranks[peer])
                receive(peer)
            else:
                receive(peer)
                dist.send(chunk(peer), dst=ranks[peer])
    return out
