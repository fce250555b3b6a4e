"""Context parallel over the "cp" mesh dim: every sequence split over cp ranks, Ulysses attention.

Layout. The batch arrives replicated over "cp" (context peers read the same samples, autoparallel/batch.py).
The token embeddings (vision features placed) are scattered to Shard(1) of [b, S, h] on "cp" — a local slice,
each rank keeping a contiguous S/cp of every row — and the whole decoder runs on that slice: norms, MLPs,
residuals and q/k/v/o projections touch 1/cp of the tokens and hold 1/cp of the activations.

Attention (Ulysses). The q/k/v projection outputs go from sequence to heads on "cp": every rank then holds
the whole sequence for 1/cp of its heads and KV heads, and attends exactly as one process would (causal mask,
padding, packed samples' boundaries: all on the whole sequence). The attention output goes back from heads to
sequence before o_proj. M-RoPE: `position_ids` stay replicated over "cp" (computed on the whole sequence by the
data pipeline), and the rotation is applied after the exchange, on the whole sequence, so each token keeps its
own position.

Loss head. The final hidden states are all-gathered (b x S x H, small next to the head's logits) and the
supervised rows picked by positions/targets that index the whole row (shifted before any split, so no token at
a slice boundary is lost). Each cp rank then runs the head on an equal share of those rows (`split_rows`), not
on the rows of its own slice: an answer at the end of a long sample lies in one rank's slice, and the [K, V]
logits are the largest tensors of the step. The loss sums every rank's rows and divides by the global
supervised count (Partial over "cp", as over "dp"), so it stays the token mean of the global batch; the head
weight's gradient is reduced over "cp" like every other weight's, the rows' gradients come back all-gathered.

With tensor parallel the projections' heads are already split over "mp" (column-parallel outputs, Shard(2)),
and Ulysses splits this rank's heads again over "cp": one tensor dim on two mesh dims, which placements cannot
say. So the exchange (with or without mp) works on local tensors: `dtensor_to_local`, an all-to-all among this
rank's cp peers (`_Exchange`, whose backward is the reverse all-to-all), `dtensor_from_local`; the attention
between the exchanges sees this rank's [b, S, heads / (cp x mp)] as a tensor replicated over "cp" and "mp":
attention is per head, so no op there communicates over those dims. o_proj gets back exactly the placements
q_proj produced. GQA with fewer local
KV heads than cp ranks: each KV head is repeated (before the exchange, so its gradient sums the copies) until
every cp rank receives the KV head its query heads read.

Vision. The frozen ViT runs on every context peer's (identical) images, and the merged features are placed
into the full-length embeddings before the scatter: each token's vision feature goes with it to its slice.
Running each image on one rank would save ViT compute but needs an exchange of variable-size features; the
tower is frozen by default, small next to the decoder, and its activations do not grow with the sequence.
The embeddings are built whole, not only this rank's slice: placing the features through a cp-split index
gives, in Paddle 3.3.1, a features gradient labelled Replicate that holds only this rank's tokens' part
(measured), so a trainable merger or ViT would train wrong; and one [b, S, H] tensor is small next to the
decoder's and the head's activations.

Exchanges. The local pieces form one tensor on the 1-D mesh of this rank's cp peers, resharded Shard(1) <->
Shard(2): Paddle's same-dim s-to-s reshard, one all-to-all on GPU builds (a sub-mesh, not `dist.new_group`:
group ids come from a per-process counter, and new gloo groups failed to connect on the CPU build, see
autoparallel/pipeline.py). Gloo has no all-to-all, so on CPU `cpu_compat.all_to_all_pairwise` exchanges the
local chunks with point-to-point send/recv among the peers' global ranks (no group needed, one chunk in
flight). Sequence lengths must be divisible by cp:
`shard_batch(..., seq_multiple=cp)`. Which head counts work: placements/degrees.py `context_parallel_problems`.
"""
from __future__ import annotations

import math
import re

import paddle
import paddle.distributed as dist
from paddle.autograd import PyLayer
from paddle.distributed.auto_parallel.api import dtensor_from_local, dtensor_to_local

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


def split_rows(x: paddle.Tensor) -> paddle.Tensor:
    """[dp, K, ...] Replicate on "cp" (K a multiple of cp) -> [dp, cp, K/cp, ...] Shard(1) on "cp": each rank
    keeps its contiguous K/cp rows (no communication; the gradient comes back all-gathered). `x` itself on a
    mesh without "cp"."""
    if CP_DIM not in x.process_mesh.dim_names:
        return x
    cp = cp_degree(x.process_mesh)
    split = x.reshape([x.shape[0], cp, x.shape[1] // cp, *x.shape[2:]])
    return dist.reshard(split, split.process_mesh, _on_cp(split, dist.Shard(1)))


def _all_to_all(x: paddle.Tensor, cp_mesh: dist.ProcessMesh, split_axis: int, concat_axis: int) -> paddle.Tensor:
    """Chunk i of the local `x` along `split_axis` to the i-th rank of the 1-D `cp_mesh`, the chunks received
    concatenated along `concat_axis`: a Shard(concat) -> Shard(split) reshard of the tensor the ranks' `x` form."""
    if cpu_compat.runs_on_cpu():
        return cpu_compat.all_to_all_pairwise(x, list(cp_mesh.process_ids), split_axis, concat_axis)
    whole = dtensor_from_local(x, cp_mesh, [dist.Shard(concat_axis)])
    return dist.reshard(whole, cp_mesh, [dist.Shard(split_axis)])._local_value()


class _Exchange(PyLayer):
    """All-to-all of a local tensor over the cp ranks; the backward is the reverse all-to-all."""

    @staticmethod
    def forward(ctx, x, cp_mesh, split_axis: int, concat_axis: int):
        ctx.reverse = (cp_mesh, concat_axis, split_axis)
        return _all_to_all(x, cp_mesh, split_axis, concat_axis)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad, *ctx.reverse)


class _Ulysses:
    """The hooks of one model: `head_dim` to count KV heads, the placements q_proj produced (restored for
    o_proj)."""

    def __init__(self, mesh: dist.ProcessMesh, head_dim: int):
        self.mesh, self.head_dim, self.cp = mesh, head_dim, cp_degree(mesh)
        self.cp_mesh = mesh.get_submesh_with_dim(CP_DIM)  # this rank's cp peers
        self.sequence_placements = None
        # Between the exchanges: this rank's heads on the whole sequence, presented as replicated on cp and mp.
        self.local_dims = [mesh.dim_names.index(CP_DIM)] + [i for i, n in enumerate(mesh.dim_names) if n == "mp"]

    def to_heads(self, layer, inputs, output):
        placements = list(output.placements)
        self.sequence_placements = list(placements)  # q, k and v alike: what o_proj gets back
        local = dtensor_to_local(output, self.mesh, placements)
        b, s, width = local.shape
        heads = width // self.head_dim
        repeat = self.cp // math.gcd(heads, self.cp)
        if repeat > 1:  # GQA: each KV head repeated in place, so that cp rank i gets the one its queries read
            local = local.reshape([b, s, heads, 1, self.head_dim]).expand([b, s, heads, repeat, self.head_dim])
            local = local.reshape([b, s, width * repeat])
        for i in self.local_dims:
            placements[i] = dist.Replicate()
        return dtensor_from_local(_Exchange.apply(local, self.cp_mesh, HEADS_DIM, SEQUENCE_DIM), self.mesh, placements)

    def to_sequence(self, layer, inputs):
        x = inputs[0]
        local = _Exchange.apply(dtensor_to_local(x, self.mesh, x.placements), self.cp_mesh, SEQUENCE_DIM, HEADS_DIM)
        return (dtensor_from_local(local, self.mesh, self.sequence_placements), *inputs[1:])


def apply_context_parallel(model: paddle.nn.Layer, mesh: dist.ProcessMesh, head_dim: int,
                           plan: dict[str, str] = ULYSSES_PLAN) -> list:
    """Register the Ulysses exchanges of `plan` on the parallelized `model` over `mesh`'s "cp" dim; returns the
    hook handles. Every plan key must match at least one sublayer."""
    ulysses = _Ulysses(mesh, head_dim)
    handles, unmatched = [], set(plan)
    for name, layer in model.named_sublayers():
        for key, style in plan.items():
            if re.fullmatch(key, name):
                unmatched.discard(key)
                handles.append(layer.register_forward_post_hook(ulysses.to_heads) if style == TO_HEADS
                               else layer.register_forward_pre_hook(ulysses.to_sequence))
    if unmatched:
        raise ValueError(f"context-parallel plan keys match no sublayer: {sorted(unmatched)}")
    logger.info("context parallel: %d Ulysses exchange hooks (%s)", len(handles),
                "pairwise send/recv on CPU" if cpu_compat.runs_on_cpu() else "all-to-all")
    return handles
