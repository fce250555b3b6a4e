"""Launched by tests/dist/test_parallel_*.py: train several layouts in one launch, or check degree validation.

    --layouts dp2,mp2,...   train each (same data as the single-process reference), write result.{rank}.json
                            after every layout and rank 0's full trainable parameters as params.{layout}.npz
    --bad-degrees JSON      build the mesh for these degrees before any other work; expected to fail
    --reference [--modes M] [--media]
                            single-process reference (all MODES, or the comma-separated M) (launched with nproc 1 for the launcher's thread pinning):
                            result.0.json {mode: losses, "grad_norm": frozen step 1's gradient norm before
                            clipping} + reference.{mode}.npz and initial.npz (initial weights);
                            with --media also on the MEDIA layouts' samples: {mode}_media, reference.{mode}_media.npz
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import paddle
import paddle.distributed as dist

from autoparallel.mesh import build_mesh, mesh_coordinate
from placements.degrees import DegreeError, ParallelDegrees
from autoparallel.planning.memory_report import memory_report
from autoparallel.parallelize import parallelize
from autoparallel.batch import shard_batch
from autoparallel.step import train_step
from dist_utils import worker_entry, write_result
from autoparallel.engine.optim import apply_module_learning_rates
from parallel_cases import (CLIP, LAYOUTS_2, LAYOUTS_4, LAYOUTS_CP_2, LAYOUTS_CP_4, MEDIA, MODES, PACKED, build_model, build_optimizer, micro_batches,
                            mode_training_args, reference_run, step_schedule, tiny_config)
from placements.qwen2_vl import model_part

LAYOUTS = {name: (kw, mode) for name, kw, mode in LAYOUTS_2 + LAYOUTS_4 + LAYOUTS_CP_2 + LAYOUTS_CP_4}


def _full(p: paddle.Tensor) -> np.ndarray:
    if not p.is_dist():
        return p.numpy()
    return dist.reshard(p, p.process_mesh, [dist.Replicate()] * len(p.process_mesh.shape))._local_value().numpy()


def _local_bytes(t) -> int:
    t = t._local_value() if t.is_dist() else t
    return int(np.prod(t.shape)) * t.element_size()


def run_layout(name: str, out: str) -> dict:
    kw, mode = LAYOUTS[name]
    trainable = MODES[mode]
    config = tiny_config()
    degrees = ParallelDegrees(**kw)
    mesh = build_mesh(degrees, config)
    model = build_model(config)
    optimizer = build_optimizer(model, mode=mode)
    frozen_before = {n: p.numpy().copy() for n, p in model.named_parameters() if not trainable.trains(n)}
    model, optimizer = parallelize(model, optimizer, mesh, degrees, trainable=trainable)
    apply_module_learning_rates(model, mode_training_args(mode))
    inner = getattr(optimizer, "_inner_opt", optimizer)
    # The LR the optimizer applied to one parameter of each part, read from the optimizer at every step.
    names = {id(p): n for n, p in model.named_parameters()}
    probes = {}
    for p in inner._parameter_list:
        if id(p) in names:
            probes.setdefault(model_part(names[id(p)]), p)
    dp_rank = mesh_coordinate(mesh, "dp")
    # Local shapes of the first decoder layer's input and of its q_proj output (after any Ulysses exchange).
    local_shapes = {}

    def record(key, x) -> None:  # returns None: the hook leaves the activation as it is
        local_shapes.setdefault(key, list(x._local_value().shape))

    layer0 = model.model.layers[0]
    hooks = [layer0.register_forward_pre_hook(lambda layer, inputs: record("decoder_input", inputs[0])),
             layer0.self_attn.q_proj.register_forward_post_hook(lambda layer, inputs, out: record("q", out))]
    start = time.time()
    losses, lrs = [], []
    for step in micro_batches(config, degrees.dp, dp_rank, packed=name in PACKED, media=name in MEDIA):
        losses.append(train_step(model, optimizer, [shard_batch(b, mesh, config) for b in step], clip_norm=CLIP).loss)
        # After the update (the optimizer's LR tensor exists from its first step), before the schedule moves on.
        lrs.append({part: float(inner._create_param_lr((p, None))) for part, p in probes.items()})
        step_schedule(optimizer)
    seconds = time.time() - start
    for hook in hooks:
        hook.remove()

    params = dict(model.named_parameters())
    report = memory_report(model, optimizer, degrees, trainable=trainable)
    state_keys = {k for per in inner._accumulators.values() for k in per}
    direct = {  # independent of memory.py: every local tensor this rank holds
        "param": sum(_local_bytes(p) for p in params.values()),
        "grad": sum(_local_bytes(p.grad) for p in params.values() if p.grad is not None),
        "optimizer": sum(_local_bytes(t) for per in inner._accumulators.values() for t in per.values()),
    }
    full = {n: _full(p) for n, p in params.items() if trainable.trains(n)}
    if dist.get_rank() == 0:
        np.savez(os.path.join(out, f"params.{name}.npz"), **full)
    dist.barrier()
    return {
        "losses": losses,
        "activation_local_shapes": local_shapes,
        "lrs": lrs,
        "seconds": seconds,
        "frozen_identical": all(np.array_equal(_full(params[n]), v) for n, v in frozen_before.items()),
        "frozen_dense_as_planned": all(params[n].is_dist() != trainable.dense(n) for n in frozen_before),
        "frozen_with_state": sorted(n for n in frozen_before if params[n].name in state_keys),
        "memory": report,
        "direct": direct,
        "local_shapes": {n: list((p._local_value() if p.is_dist() else p).shape) for n, p in params.items()},
        "placements": {n: str(p.placements) if p.is_dist() else "dense" for n, p in params.items()},
    }


def frozen_grad_norm() -> float:
    """Step 1 of `reference_run("frozen")` up to the gradients: their global norm (what ClipGradByGlobalNorm clips;
    the pipeline's clip must span its stages to the same value)."""
    config = tiny_config()
    model = build_model(config)
    for name, p in model.named_parameters():
        p.stop_gradient = not MODES["frozen"].trains(name)
    step = micro_batches(config)[0]
    normalizer = float(sum(int((b["labels"][:, 1:] != -100).sum()) for b in step))
    for b in step:
        model(b["input_ids"], attention_mask=b["attention_mask"], position_ids=b["position_ids"],
              pixel_values=paddle.to_tensor(b["pixel_values"]), image_grid_thw=b["image_grid_thw"],
              labels=b["labels"], loss_normalizer=normalizer).loss.backward()
    return float(np.sqrt(sum(float(paddle.square(p.grad).sum()) for p in model.parameters() if p.grad is not None)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--layouts", default="")
    parser.add_argument("--bad-degrees", default="")
    parser.add_argument("--reference", action="store_true")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--media", action="store_true")
    args = parser.parse_args()
    rank = int(os.environ.get("PADDLE_TRAINER_ID", "0"))
    if args.reference:
        losses = {}
        np.savez(os.path.join(args.out, "initial.npz"),
                 **{n: p.numpy() for n, p in build_model(tiny_config()).named_parameters()})
        for mode in args.modes.split(","):
            for media in (False, True) if args.media else (False,):
                ref = reference_run(mode, media)
                key = f"{mode}_media" if media else mode
                np.savez(os.path.join(args.out, f"reference.{key}.npz"), **ref["params"])
                losses[key] = ref["losses"]
        write_result(args.out, rank, {**losses, "grad_norm": frozen_grad_norm()})
        return
    if args.bad_degrees:
        # Validation must come before any work: no process group, no model.
        world = int(os.environ["PADDLE_TRAINERS_NUM"])
        try:
            build_mesh(ParallelDegrees(**json.loads(args.bad_degrees)), tiny_config(), world_size=world)
        except DegreeError as e:
            write_result(args.out, rank, {"error": str(e), "initialized": dist.is_initialized()})
            print(e, file=sys.stderr)
            sys.exit(3)
        write_result(args.out, rank, {"error": None})
        return
    dist.init_parallel_env()
    results = {}
    for name in args.layouts.split(","):
        results[name] = run_layout(name, args.out)
        write_result(args.out, rank, results)
    dist.barrier()


if __name__ == "__main__":
    worker_entry(main)
