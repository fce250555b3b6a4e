"""Apply the Qwen2-VL plan (placements/, plain data) to a plain model and its optimizer with `dist.parallelize`.

Order: CPU workarounds -> freeze what does not train -> `dist.parallelize` (tensor-parallel plan, then ZeRO
stage over "dp", every other parameter replicated). The frozen vision tower up to its first trainable part
(`Trainable.dense`: all of it by default, the ViT blocks with a trainable merger) is kept out of the
distributed model: it runs as plain dense ops on each rank's own patches (autoparallel/forward.py), so its
weights stay ordinary tensors, get no gradient and no optimizer state, and are identical on every rank. A
trainable ViT is replicated like any parameter the plan does not split, and ZeRO treats it like the rest.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import paddle
import paddle.distributed as dist
from paddle.distributed.auto_parallel.intermediate.parallel_base import ParallelOptimizer

from autoparallel import cpu_compat
from autoparallel.context_parallel import apply_context_parallel
from autoparallel.embedding import vocab_parallel_layer
from autoparallel.gradients import share_sibling_inputs
from network.config import Qwen2VLConfig
from network.log import logger
from placements.degrees import ParallelDegrees
from placements.lora import lora_plan
from placements.qwen2_vl import COLWISE, ROWWISE, FROZEN_VISION, Trainable, tensor_parallel_plan, trainable_problem


def paddle_plan(plan: dict[str, str]) -> dict[str, dist.ColWiseParallel | dist.RowWiseParallel]:
    """Fresh Paddle plan objects for a plan of placements/ (they carry per-model state: never share them)."""
    styles = {COLWISE: dist.ColWiseParallel, ROWWISE: dist.RowWiseParallel}
    return {key: styles[style]() for key, style in plan.items()}


def parallelize_config(config: Qwen2VLConfig, mp: int, sharding_stage: int) -> dict:
    """The `config` argument of `dist.parallelize` (with the inert LoRA entries, see placements/lora.py)."""
    plan = tensor_parallel_plan(config, mp)
    return {
        "mp_config": {"parallelize_plan": paddle_plan(plan | lora_plan(plan))},
        "dp_config": {"sharding_level": sharding_stage},
    }


def freeze(model: paddle.nn.Layer, trainable: Trainable = FROZEN_VISION) -> None:
    """stop_gradient on every part `trainable` leaves frozen. Never unfreezes: variants (LoRA) freeze more in
    `Trainer.prepare_model`."""
    for name, param in model.named_parameters():
        if not trainable.trains(name):
            param.stop_gradient = True


@contextlib.contextmanager
def _frozen_vision_detached(model: paddle.nn.Layer, trainable: Trainable) -> Iterator[None]:
    # dist.parallelize turns every parameter it can reach into a replicated dist tensor and hands all of them
    # to the optimizer (ZeRO-2/3 then hook or shard them: stage 2 refuses stop_gradient tensors). Hiding the
    # dense vision submodules keeps them dense and out of the optimizer.
    children = model.visual._sub_layers
    order = list(children)
    hidden = {k: children.pop(k) for k in order if trainable.dense(f"visual.{k}.")}
    try:
        yield
    finally:
        rest = dict(children)
        children.clear()
        for key in order:
            children[key] = hidden[key] if key in hidden else rest[key]


@contextlib.contextmanager
def _optimizer_trainable_only() -> Iterator[None]:
    # dist.parallelize hands every model parameter to the optimizer, and ZeRO-2/3 register a gradient hook on
    # each, which raises on a frozen one (LoRA freezes the base weights inside the distributed model).
    original = ParallelOptimizer.update_param_list
    ParallelOptimizer.update_param_list = lambda self, params: original(
        self, [p for p in params if not p.stop_gradient])
    try:
        yield
    finally:
        ParallelOptimizer.update_param_list = original


def parallelize(
    model: paddle.nn.Layer,
    optimizer: paddle.optimizer.Optimizer | None,
    mesh: dist.ProcessMesh,
    degrees: ParallelDegrees,
    *,
    trainable: Trainable = FROZEN_VISION,
) -> tuple[paddle.nn.Layer, paddle.optimizer.Optimizer | None]:
    """Shard `model` (in place) and wrap `optimizer` for `mesh`; returns what to train with.

    `optimizer` must be an AdamW or SGD over `model.parameters()` (a flat list: `dist.parallelize` rebuilds it
    from the model and does not keep parameter groups; use `apply_decay_param_fun` for weight-decay rules).
    """
    problem = trainable_problem(model.config, trainable)
    if problem:
        raise ValueError(problem)
    cpu_compat.apply()
    freeze(model, trainable)
    config = parallelize_config(model.config, degrees.mp, degrees.sharding_stage)
    with _frozen_vision_detached(model, trainable), _optimizer_trainable_only():
        model, optimizer = dist.parallelize(model, optimizer, mesh=mesh, config=config)
    if degrees.mp > 1:
        vocab_parallel_layer(model.model.embed_tokens)
        # N15: q/k/v (gate/up) input gradients summed before one mp all-reduce, not one each
        share_sibling_inputs(model, [k for k, style in tensor_parallel_plan(model.config, degrees.mp).items()
                                     if style == COLWISE])
    if degrees.cp > 1:
        apply_context_parallel(model, mesh, model.config.head_dim)
    if degrees.sharding_stage == 3 and cpu_compat.runs_on_cpu():
        cpu_compat.enable_zero3_gather(model, mesh.dim_names.index("dp"))
    logger.info("parallelized: mesh %s %s, sharding stage %d, tensor-parallel layers %d, training %s",
                mesh.dim_names, mesh.shape, degrees.sharding_stage,
                len(config["mp_config"]["parallelize_plan"]), trainable.names())
    return model, optimizer
