"""Context parallel over the "cp" mesh dim: every sequence split over cp ranks, Ulysses attention.

Layout. The batch arrives replicated over "cp" (context peers read the same samples, autoparallel/batch.py).
The token embeddings (vision features placed) are scattered to Shard(1) of [b, S, h] on "cp" — a local slice,
each rank keeping a contiguous S/cp of every row — and the whole decoder runs on that slice: norms, MLPs,
residuals and q/k/v/o projections touch 1/cp of the tokens and hold 1/cp of the activations.

Attention (Ulysses). The q/k/v projection outputs go from Shard(1) (sequence) to Shard(2) (heads) on "cp":
every rank then holds the whole sequence for 1/cp of the heads and KV heads, and attends exactly as one
process would (causal mask, padding, packed samples' boundaries: all on the whole sequence). The attention
output goes back from heads to sequence before o_proj. M-RoPE: `position_ids` stay replicated over "cp"
(computed on the whole sequence by the data pipeline), and the rotation is applied after the exchange, on the
whole sequence, so each token keeps its own position. The final hidden states are all-gathered before the
loss head, whose positions/targets index the whole row, so the loss is the token mean of the global batch.

Vision. The frozen ViT runs on every context peer's (identical) images, and the merged features are placed
into the full-length embeddings before the scatter: each token's vision feature goes with it to its slice.
Running each image on one rank would save ViT compute but needs an exchange of variable-size features; the
tower is frozen by default, small next to the decoder, and its activations do not grow with the sequence.

Exchanges. On GPU builds Shard(1) <-> Shard(2) is one `dist.reshard` (Paddle's same-dim s-to-s reshard, an
all-to-all). Gloo has no all-to-all, so on CPU `cpu_compat.all_to_all_via_gather` all-gathers and slices.
Sequence lengths must be divisible by cp: `shard_batch(..., seq_multiple=cp)`.
"""
from __future__ import annotations

import re

import paddle
import paddle.distributed as dist

from autoparallel import cpu_compat
from autoparallel.mesh import CP_DIM
from network.log import logger

SEQUENCE_DIM = 1
HEADS_DIM = 2  # of the [b, S, heads * head_dim] projection outputs
TO_HEADS = "sequence->heads"
TO_SEQUENCE = "heads->sequence"
# Hooks as data: which sublayers' output (q/k/v) or input (o_proj) crosses between sequence and heads.
ULYSSES_PLAN: dict[str, str] = {
    r"model\.layers\.\d+\.self_attn\.[qkv]_proj": TO_HEADS,
    r"model\.layers\.\d+\.self_attn\.o_proj": TO_SEQUENCE,
}


def cp_degree(mesh: dist.ProcessMesh) -> int:
    return mesh.shape[mesh.dim_names.index(CP_DIM)] if CP_DIM in mesh.dim_names else 1


def _on_cp(x: paddle.Tensor, placement) -> list:
    placements = list(x.placements)
    placements[x.process_mesh.dim_names.index(CP_DIM)] = placement
    return placements


def scatter_context(x: paddle.Tensor) -> paddle.Tensor:
    """[b, S, ...] Replicate on "cp" -> Shard(1): each rank keeps its contiguous slice (no communication).
    `x` itself on a mesh without "cp"."""
    if CP_DIM not in x.process_mesh.dim_names:
        return x
    return dist.reshard(x, x.process_mesh, _on_cp(x, dist.Shard(SEQUENCE_DIM)))


def gather_context(x: paddle.Tensor) -> paddle.Tensor:
    """[b, S, ...] Shard(1) on "cp" -> Replicate (all-gather); the gradient goes back as this rank's slice.
    `x` itself on a mesh without "cp"."""
    if CP_DIM not in x.process_mesh.dim_names:
        return x
    return dist.reshard(x, x.process_mesh, _on_cp(x, dist.Replicate()))


def _exchange(x: paddle.Tensor, dim: int) -> paddle.Tensor:
    placements = _on_cp(x, dist.Shard(dim))
    if cpu_compat.runs_on_cpu():
        return cpu_compat.all_to_all_via_gather(x, placements)
    return dist.reshard(x, x.process_mesh, placements)


def _to_heads(layer, inputs, output):
    return _exchange(output, HEADS_DIM)


def _to_sequence(layer, inputs):
    return (_exchange(inputs[0], SEQUENCE_DIM), *inputs[1:])


def apply_context_parallel(model: paddle.nn.Layer, plan: dict[str, str] = ULYSSES_PLAN) -> list:
    """Register the Ulysses exchanges of `plan` on the parallelized `model`; returns the hook handles. Every
    plan key must match at least one sublayer."""
    handles, unmatched = [], set(plan)
    for name, layer in model.named_sublayers():
        for key, style in plan.items():
            if re.fullmatch(key, name):
                unmatched.discard(key)
                handles.append(layer.register_forward_post_hook(_to_heads) if style == TO_HEADS
                               else layer.register_forward_pre_hook(_to_sequence))
    if unmatched:
        raise ValueError(f"context-parallel plan keys match no sublayer: {sorted(unmatched)}")
    logger.info("context parallel: %d Ulysses exchange hooks (%s)", len(handles),
                "all-gather + slice on CPU" if cpu_compat.runs_on_cpu() else "all-to-all")
    return handles
