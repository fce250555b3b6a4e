"""Gradients between backward and the optimizer step, shared by the train step and the pipeline: which tensor is a
parameter's gradient, reducing Partial gradients once (to the ZeRO-1 shard where there is one), and the sum
of squares the global norm is taken from.

Also where several uses of one tensor meet in backward (`shared_uses`): Paddle 3.3.1's gradient accumulation
reduces each use's Partial gradient before adding them, one all-reduce per use where one would do (N13: the
tied embedding, two uses; N15: the colwise projections reading one input, q/k/v and gate/up, three and two
per decoder layer under tensor parallel). Giving every use its own output of one identity node makes that
node's backward the place they meet: it adds them locally, and one Partial gradient goes on, reduced once."""
from __future__ import annotations

from collections.abc import Sequence

import re

import paddle
import paddle.distributed as dist
from paddle.autograd import PyLayer
from paddle.distributed.auto_parallel.api import ShardingStage1, dtensor_from_local
from paddle.distributed.auto_parallel.sharding import get_placement_with_sharding

from autoparallel.mesh import mesh_coordinate


def gradient(param: paddle.Tensor) -> paddle.Tensor | None:
    """The gradient the optimizer steps with: the fp32 `main_grad` under bf16 O2 with master_grad (sharding stages
    keep it there), else `.grad`."""
    main = getattr(param, "main_grad", None)
    return main if main is not None else param.grad


def zero1_sharding_axis(optimizer: paddle.optimizer.Optimizer) -> int | None:
    """The mesh axis a ZeRO-1 optimizer (`shard_optimizer(..., ShardingStage1)`) shards its states over, else
    None (stage 2/3 reduce gradients to their shard in their own backward hooks)."""
    shard_fn = getattr(optimizer, "_shard_fn", None)
    return shard_fn._sharding_axis if isinstance(shard_fn, ShardingStage1) else None


def reduce_partial_gradients_(params: Sequence[paddle.Tensor], sharding_axis: int | None = None) -> None:
    """Reshard every gradient still Partial (e.g. over "dp" for a replicated parameter) once, in place of the old
    gradient: to its parameter's placements, or under ZeRO-1 (`sharding_axis`) to the optimizer's shard as
    ShardingStage1 places it (N11: a reduce-scatter, half the bytes of an all-reduce; the optimizer's own
    reshard is then a no-op). Otherwise squaring it for the norm and the optimizer's update would each
    all-reduce it again."""
    for p in params:
        grad = p.grad
        if grad is not None and grad.is_dist() and any(pl.is_partial() for pl in grad.placements):
            target = p.placements if sharding_axis is None else get_placement_with_sharding(p, sharding_axis)
            p._copy_gradient_from(dist.reshard(grad, p.process_mesh, target))


def sum_of_squares(params: Sequence[paddle.Tensor]) -> paddle.Tensor | None:
    """The fp32 sum of the squared gradients of `params` as one (dist) scalar, for one reduction of the norm.
    Gradients must not be Partial any more (`reduce_partial_gradients_`), else each square all-reduces."""
    total = None
    for param in params:
        grad = gradient(param)
        if grad is not None:
            square = paddle.square(grad.astype("float32")).sum()  # `** 2` is ~10x slower on CPU
            total = square if total is None else total + square
    return total


def _view(tensor: paddle.Tensor) -> paddle.Tensor:
    """`tensor`'s storage under a new autograd identity (returning the input itself from a PyLayer, even marked
    not inplace, leaves the outputs without a gradient path). A dist tensor's view is taken of its local piece:
    `view`'s dist rule would all-gather a split one."""
    if not tensor.is_dist():
        return tensor.view(tensor.shape)
    local = tensor._local_value()
    return dtensor_from_local(local.view(local.shape), tensor.process_mesh, tensor.placements)


class _SharedUses(PyLayer):
    """`uses` views of one tensor; backward: the sum of their gradients, added locally and in place (autograd
    hands each gradient to this node alone): for the tied embedding a vocabulary-sized tensor fewer at the
    step's peak. Partial gradients sum to a Partial one without communication; the sum is Partial on every mesh
    axis where any gradient is (`_partial_sum`), so a gradient Replicate there joins it locally. Resharding one
    gradient to another's placements would all-reduce where those differ (under context parallel the head's
    gradient is Partial over "cp", the lookup's over "dp"), into a new table-sized tensor beside the old one."""

    @staticmethod
    def forward(ctx, tensor: paddle.Tensor, uses: int) -> tuple[paddle.Tensor, ...]:
        return tuple(_view(tensor) for _ in range(uses))

    @staticmethod
    def backward(ctx, *grads: paddle.Tensor | None) -> paddle.Tensor | None:
        grads = [g for g in grads if g is not None]
        if not grads:
            return None
        if not grads[0].is_dist():
            first = grads[0]
            for g in grads[1:]:
                first.add_(g)
            return first
        return _partial_sum(grads)


def _partial_sum(grads: list[paddle.Tensor]) -> paddle.Tensor:
    """The sum of dist `grads` as one gradient Partial on each mesh axis where any of them is, with no
    communication: on such an axis a gradient Replicate there counts on the axis's first rank only (the others
    hold a zero share of it), which is what resharding Replicate -> Partial does. Placements other than Partial
    and Replicate must agree; where they do not, that gradient is resharded to the sum's placements."""
    mesh = grads[0].process_mesh
    placements = list(grads[0].placements)
    for g in grads[1:]:
        placements = [b if b.is_partial() and a.is_replicated() else a for a, b in zip(placements, g.placements)]
    coordinate = [mesh_coordinate(mesh, name) for name in mesh.dim_names]

    def counts_here(g: paddle.Tensor) -> bool:
        return all(c == 0 for c, own, total in zip(coordinate, g.placements, placements)
                   if own.is_replicated() and total.is_partial())

    def as_sum_part(g: paddle.Tensor) -> paddle.Tensor:
        mixed = any(own != total and not (own.is_replicated() and total.is_partial())
                    for own, total in zip(g.placements, placements))
        return dist.reshard(g, mesh, placements) if mixed else g

    parts = [as_sum_part(g) for g in grads]
    counted = [g._local_value() for g in parts if counts_here(g)]
    if not counted:  # each gradient is Replicate on some axis another is Partial on, where this rank is not first
        return dtensor_from_local(parts[0]._local_value().zero_(), mesh, placements)
    for local in counted[1:]:
        counted[0].add_(local)
    return dtensor_from_local(counted[0], mesh, placements)


def shared_uses(tensor: paddle.Tensor, uses: int) -> tuple[paddle.Tensor, ...]:
    """One view of `tensor` per use, whose gradients are summed before they reach it (see the module docstring)."""
    return _SharedUses.apply(tensor, uses)


class _InputGroup:
    """Forward pre-hooks of sibling layers reading one input (q/k/v_proj of an attention block): the first layer
    called makes `shared_uses` views of its input, each sibling called with that same tensor takes the next."""

    def __init__(self, size: int):
        self.size, self.source, self.views = size, None, ()

    def hook(self, index: int):
        def pre_hook(layer, inputs):
            x = inputs[0]
            if index == 0:
                self.source, self.views = x, shared_uses(x, self.size)
            elif x is not self.source:
                return None  # not the shared input: this layer's gradient was never going to meet the others
            view = self.views[index]
            if index == self.size - 1:
                self.source, self.views = None, ()
            return (view, *inputs[1:])
        return pre_hook


class _AdapterInput:
    """Forward pre-hooks splitting a LoRALinear's input between its base matmul and its adapter path (which
    starts at the `lora_dropout` sublayer, called with the same tensor)."""

    def __init__(self):
        self.base, self.adapter = None, None

    def layer_hook(self, layer, inputs):
        self.base, self.adapter = shared_uses(inputs[0], 2)
        return (self.base, *inputs[1:])

    def dropout_hook(self, layer, inputs):
        if inputs[0] is not self.base:
            return None
        adapter, self.base, self.adapter = self.adapter, None, None
        return (adapter, *inputs[1:])


def share_sibling_inputs(model: paddle.nn.Layer, keys: Sequence[str]) -> list:
    """N15: the layers matching `keys` (plan keys, "*" = one name part) that are children of one parent (in call
    order within it, as the model's forward calls them: q, k, v; gate, up) get one `shared_uses` node for their
    common input; a LoRA layer among them (paddlenlp's LoRALinear: base matmul and adapter path on the same
    input) one more for its two uses, so its base's Partial gradient is not reduced on its own either.
    Returns the hook handles."""
    patterns = [re.compile(re.escape(k).replace(r"\*", r"[^.]+")) for k in keys]
    groups: dict[str, list[paddle.nn.Layer]] = {}
    for name, layer in model.named_sublayers():
        if any(p.fullmatch(name) for p in patterns):
            groups.setdefault(name.rpartition(".")[0], []).append(layer)
    handles = []
    for layers in groups.values():
        if len(layers) > 1:
            group = _InputGroup(len(layers))
            handles += [layer.register_forward_pre_hook(group.hook(i)) for i, layer in enumerate(layers)]
        for layer in layers:  # after the group's hook: the adapter split takes this layer's view
            if not hasattr(layer, "lora_dropout"):
                continue
            if not isinstance(layer.lora_dropout, paddle.nn.Layer):
                layer.lora_dropout = paddle.nn.Identity()  # paddlenlp's `lambda x: x` at dropout 0, made hookable
            split = _AdapterInput()
            handles += [layer.register_forward_pre_hook(split.layer_hook),
                        layer.lora_dropout.register_forward_pre_hook(split.dropout_hook)]
    return handles
