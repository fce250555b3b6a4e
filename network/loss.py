"""The output head and its token cross-entropy fused and chunked: `linear_cross_entropy`.

A 151936-token vocabulary makes the [tokens, vocab] fp32 logits the largest tensor of a training step (an
8192-token sample of a 2B model: ~5 GB). Here the logits exist one chunk of rows at a time: each chunk's logits
are computed, reduced to the loss, turned into their gradient and dropped, so the peak is one [chunk, vocab]
block whatever the number of supervised positions.

The gradients are computed in the forward (a PyLayer whose backward only scales them by the incoming gradient),
not by recomputing each chunk's logits in the backward: recomputation would add a third [tokens, hidden] x
[hidden, vocab] matmul, and this head is the largest matmul of the step. What stays alive between forward and
backward is the gradient of the hidden states ([tokens, hidden]) and of the head weight (its own size: the
optimizer needs it anyway), never logits.

Per chunk the [chunk, V] block is touched by the logits matmul, one softmax and the two gradient matmuls
only: the one-hot part of the gradient and the per-row loss scale are applied to [chunk, H] operands (rows of
the weight, rows of the hidden states) instead of the [chunk, V] block. The loss of a row is -log(softmax at
the target); rows where that probability nearly underflows fp32 use logsumexp - target logit instead.

`rule` (a ChunkRule) is what one chunk computes; `dense_chunk` is the plain-tensor rule, autoparallel.forward has the
vocab-parallel one (only [chunk]-sized statistics cross "mp").
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import paddle
import paddle.nn.functional as F
from paddle.autograd import PyLayer

from network.loss_chunks import rows_per_chunk

IGNORE_INDEX = -100
# Below it a softmax probability is not exact: Paddle's CPU softmax clamps exponents at -64 (e^-64 ~ 1.6e-28).
TINY_PROB = 1e-25

# (hidden rows [..., c, H], weight, targets [..., c] clipped into [0, V), per-row scale [..., c] (0 = ignored
#  row), transpose_weight, need (d hidden, d weight)) -> (sum of scale * loss, d hidden or None, d weight or None)
ChunkRule = Callable[..., tuple]


@contextlib.contextmanager
def exact_fp32_matmuls() -> Iterator[None]:
    """fp32 matmuls inside run in full fp32 on a GPU: a CUDA build of Paddle lets cuBLAS use TF32 tensor cores
    for fp32 GEMMs by default (inputs rounded to 10-bit mantissas on Ampere and newer). The switch is
    process-wide, so it is restored on exit. Builds without cuBLAS may not have it (nothing to switch then)."""
    core = paddle.base.core
    if not hasattr(core, "set_cublas_switch"):
        yield
        return
    saved = core.get_cublas_switch()
    core.set_cublas_switch(False)
    try:
        yield
    finally:
        core.set_cublas_switch(saved)


def dense_chunk(h, weight, targets, scale, transpose_weight, need):
    logits = paddle.matmul(h, weight, transpose_y=transpose_weight).astype("float32")
    vocab = logits.shape[-1]
    flat_index = paddle.arange(targets.shape[0], dtype="int64") * vocab + targets
    probs = F.softmax(logits, axis=-1)
    target_prob = paddle.gather(probs.reshape([-1]), flat_index)
    row_loss = -paddle.log(target_prob)
    # -log(p) is exact while p is above TINY_PROB; rows with a smaller target probability take
    # logsumexp - target logit on their own logits instead (rare: a loss above ~57).
    tiny = paddle.nonzero(target_prob < TINY_PROB).reshape([-1])
    if tiny.shape[0]:
        exact = (paddle.logsumexp(paddle.gather(logits, tiny), axis=-1)
                 - paddle.gather(logits.reshape([-1]), paddle.gather(flat_index, tiny)))
        row_loss = paddle.scatter(row_loss, tiny, exact)
    del logits
    loss = (row_loss * scale).sum()
    if not any(need):
        return loss, None, None
    probs = probs.astype(h.dtype)
    scaled_h = h * scale.unsqueeze(-1).astype(h.dtype)
    d_hidden = d_weight = None
    if need[0]:  # scale * (probs - onehot) @ W^T, the one-hot part as the target rows of W
        target_rows = paddle.gather(weight, targets, axis=0 if transpose_weight else 1)
        target_rows = target_rows if transpose_weight else target_rows.T
        d_hidden = (paddle.matmul(probs, weight, transpose_y=not transpose_weight) - target_rows) \
            * scale.unsqueeze(-1).astype(h.dtype)
    if need[1]:  # (probs - onehot)^T @ (scale * h), the one-hot part as an index_add of rows
        if transpose_weight:
            d_weight = paddle.matmul(probs, scaled_h, transpose_x=True).index_add_(targets, 0, -scaled_h)
        else:
            d_weight = paddle.matmul(scaled_h, probs, transpose_x=True).index_add_(targets, 1, -scaled_h.T)
    return loss, d_hidden, d_weight


def _rows(x: paddle.Tensor, start: int, stop: int, axis: int) -> paddle.Tensor:
    return paddle.slice(x, axes=[axis], starts=[start], ends=[stop])


class _LinearCrossEntropy(PyLayer):
    @staticmethod
    def forward(ctx, hidden, weight, targets, normalizer, chunk, transpose_weight, rule, need_grads):
        axis = hidden.ndim - 2  # the token axis of hidden [..., N, H] and targets [..., N]
        need = (need_grads and not hidden.stop_gradient, need_grads and not weight.stop_gradient)
        valid = targets != IGNORE_INDEX
        scale = valid.astype("float32") / normalizer
        safe = paddle.where(valid, targets, paddle.zeros_like(targets))
        total, hidden_grads, weight_grad = None, [], None
        for start in range(0, hidden.shape[axis], chunk):
            stop = start + chunk
            loss, d_hidden, d_weight = rule(_rows(hidden, start, stop, axis), weight, _rows(safe, start, stop, axis),
                                            _rows(scale, start, stop, axis), transpose_weight, need)
            total = loss if total is None else total + loss
            hidden_grads.append(d_hidden)
            if d_weight is not None:  # summed over chunks in fp32 (bf16 sums would drift)
                d_weight = d_weight.astype("float32")
                weight_grad = d_weight if weight_grad is None else weight_grad.add_(d_weight)
        ctx.hidden_grad = paddle.concat(hidden_grads, axis=axis) if need[0] else None
        ctx.weight_grad = weight_grad.astype(weight.dtype) if need[1] else None
        return total

    @staticmethod
    def backward(ctx, grad_output):
        # The loss is a scalar: its gradients are the precomputed ones times the incoming scalar (1 when
        # `.backward()` is called on this loss directly; skip the multiply then).
        unit = not grad_output.is_dist() and float(grad_output) == 1.0
        grads = tuple(g if g is None or unit else g * grad_output.astype(g.dtype)
                      for g in (ctx.hidden_grad, ctx.weight_grad))
        ctx.hidden_grad = ctx.weight_grad = None
        return grads


def linear_cross_entropy(hidden: paddle.Tensor, weight: paddle.Tensor, targets: paddle.Tensor, *,
                         transpose_weight: bool, normalizer: float = 1.0, chunk_rows: int | None = None,
                         rule: ChunkRule = dense_chunk) -> paddle.Tensor:
    """Sum over targets != -100 of the fp32 cross-entropy of `hidden @ weight`, divided by `normalizer`.

    hidden [..., N, H]; targets [..., N] int64; weight [V, H] when `transpose_weight` (a tied embedding
    matrix) else [H, V] (a Paddle Linear). Chunks of `chunk_rows` rows along N (default: ~CHUNK_BYTES of
    fp32 logits per chunk). Gradients flow to `hidden` and `weight` unless they are stop_gradient.
    """
    chunk = chunk_rows or rows_per_chunk(hidden.shape, weight.shape, transpose_weight)
    need_grads = paddle.is_grad_enabled()
    return _LinearCrossEntropy.apply(hidden, weight, targets.astype("int64"), float(normalizer), int(chunk),
                                     transpose_weight, rule, need_grads)
