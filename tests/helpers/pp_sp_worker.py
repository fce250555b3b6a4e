"""Launched by tests/dist/test_sequence_parallel.py and tests/dist/test_pipeline.py (same data as parallel_cases;
their single-process reference: tests/helpers/parallel_worker.py --reference).

    --sp mp2,mp2sp      tensor parallel without / with sequence parallel; records the local bytes of every
                        decoder RMSNorm input (forward pre-hook) of the first forward
    --pp pp2,pp2_m4     pipeline layouts (see PP_LAYOUTS): losses, stage parameters, bubble fraction; pp2 also
                        saves its stage-local model + optimizer state with dist.save_state_dict to ckpt.pp2/
    --resume-dp2        after --pp pp2: a dp2 (no pipeline) model loads ckpt.pp2/ with dist.load_state_dict and
                        saves what it loaded as loaded_dp2.npz (rank 0)
Writes result.{rank}.json and, per layout, params.{layout}.{rank}.npz with this rank's full trainable tensors.
"""
from __future__ import annotations

import argparse
import os

import numpy as np
import paddle
import paddle.distributed as dist

from autoparallel.mesh import build_mesh, mesh_coordinate
from placements.degrees import ParallelDegrees
from autoparallel.parallelize import parallelize
from autoparallel.pipeline import (build_stage_model, fthenb_bubbles, make_stage, parallelize_stage,
                                   theoretical_bubble)
from autoparallel.sequence_parallel import apply_sequence_parallel
from autoparallel.batch import shard_batch
from autoparallel.step import train_step
from dist_utils import worker_entry, write_result
from network.modeling_qwen2_vl import Qwen2RMSNorm
from parallel_cases import CLIP, build_model, build_optimizer, micro_batches, tiny_config
from placements.qwen2_vl import is_trainable

SP_LAYOUTS = {"mp2": (dict(tensor_parallel_degree=2), False), "mp2sp": (dict(tensor_parallel_degree=2), True)}
# name -> (degrees, micro-batches per step): 2 = the reference's accumulation; 4 = two reference steps merged
# into one (bubble measurement only, its losses differ from the reference).
PP_LAYOUTS = {
    "pp2": (dict(pipeline_parallel_degree=2), 2),
    "pp2_m4": (dict(pipeline_parallel_degree=2), 4),
    "pp2mp2": (dict(pipeline_parallel_degree=2, tensor_parallel_degree=2), 2),
}


def _full(p: paddle.Tensor) -> np.ndarray:
    if not p.is_dist():
        return p.numpy()
    return dist.reshard(p, p.process_mesh, [dist.Replicate()] * len(p.process_mesh.shape))._local_value().numpy()


def _norm_probe(model) -> tuple[dict[str, int], list]:
    """Local bytes of each decoder RMSNorm's input, from the first forward."""
    seen: dict[str, int] = {}

    def hook_for(name):
        def hook(layer, inputs):
            x = inputs[0]
            local = x._local_value() if x.is_dist() else x
            seen.setdefault(name, int(np.prod(local.shape)) * local.element_size())
        return hook

    handles = [layer.register_forward_pre_hook(hook_for(name)) for name, layer in model.model.named_sublayers()
               if isinstance(layer, Qwen2RMSNorm)]
    return seen, handles


def run_sp(name: str, out: str) -> dict:
    kw, sequence_parallel = SP_LAYOUTS[name]
    config, degrees = tiny_config(), ParallelDegrees(**kw)
    mesh = build_mesh(degrees, config)
    model = build_model(config)
    model, optimizer = parallelize(model, build_optimizer(model), mesh, degrees)
    if sequence_parallel:
        apply_sequence_parallel(model)
    norm_bytes, handles = _norm_probe(model)
    dp_rank = mesh_coordinate(mesh, "dp")
    multiple = degrees.mp if sequence_parallel else 1
    losses = []
    for step in micro_batches(config, degrees.dp, dp_rank):
        losses.append(train_step(model, optimizer, [shard_batch(b, mesh, config, multiple) for b in step],
                                 clip_norm=CLIP).loss)
        for h in handles:
            h.remove()
        handles = []
    full = {n: _full(p) for n, p in model.named_parameters() if is_trainable(n)}
    np.savez(os.path.join(out, f"params.{name}.{dist.get_rank()}.npz"), **full)
    dist.barrier()
    return {"losses": losses, "norm_input_bytes": norm_bytes}


def run_pp(name: str, out: str) -> dict:
    kw, micro = PP_LAYOUTS[name]
    config, degrees = tiny_config(), ParallelDegrees(**kw)
    mesh = build_mesh(degrees, config, allow_pipeline=True)
    stage = make_stage(mesh, config)
    model = build_stage_model(build_model(config), stage)
    model, optimizer, _ = parallelize_stage(model, build_optimizer(model), stage, degrees)
    steps = micro_batches(config, degrees.dp, mesh_coordinate(mesh, "dp"))
    if micro == 4:
        steps = [steps[i] + steps[i + 1] for i in range(0, len(steps) - 1, 2)]
    results = [train_step(model, optimizer, [shard_batch(b, stage.mesh, config) for b in step], clip_norm=CLIP,
                          stage=stage) for step in steps]
    stats = [r.schedule for r in results]
    full = {n: _full(p) for n, p in model.named_parameters() if is_trainable(n)}
    np.savez(os.path.join(out, f"params.{name}.{dist.get_rank()}.npz"), **full)
    if name == "pp2":
        dist.save_state_dict(_train_state(model, optimizer), os.path.join(out, "ckpt.pp2"), safetensors=True)
    dist.barrier()
    # Per stage: measured idle fraction vs FThenB's prediction from every stage's measured compute (the tiny
    # model's head dominates: stages are unequal) and vs the equal-stage (p-1)/(m+p-1). Step 0 is warm-up.
    times = paddle.to_tensor([[s.forward_seconds, s.backward_seconds] for s in stats[1:]], dtype="float64")
    per_stage = []
    dist.all_gather(per_stage, times)  # [rank][step][fwd, bwd]
    per_stage = [t.numpy() for t in per_stage][::stage.ranks_per_stage]
    predicted = float(np.mean([fthenb_bubbles([t[k, 0] for t in per_stage], [t[k, 1] for t in per_stage], micro)
                               [stage.index] for k in range(len(stats) - 1)]))
    measured = float(np.mean([s.bubble for s in stats[1:]]))
    theory = theoretical_bubble(stage.num_stages, micro)
    print(f"{name} stage {stage.index}: bubble measured {measured:.3f}, FThenB prediction from measured stage "
          f"times {predicted:.3f}, equal-stage theory (p-1)/(m+p-1) = {theory:.3f}", flush=True)
    return {"losses": [r.loss for r in results], "grad_norms": [r.grad_norm for r in results], "stage": stage.index,
            "layers": list(stage.layers),
            "bubble": measured, "bubble_predicted": predicted, "bubble_theory": theory,
            "forward": [s.forward_seconds for s in stats], "backward": [s.backward_seconds for s in stats],
            "wall": [s.wall_seconds for s in stats]}


def _train_state(model, optimizer) -> dict[str, paddle.Tensor]:
    """Model + optimizer tensors, as the engine checkpoints them."""
    state = dict(model.state_dict())
    state.update({k: v for k, v in optimizer.state_dict().items() if isinstance(v, paddle.Tensor)})
    return state


def resume_dp2(out: str) -> dict:
    """Load the pp2 checkpoint into a dp2 model and optimizer (moments created by a step on zero gradients
    first). Fresh unique names: optimizer keys derive from parameter names, as in a new process."""
    with paddle.utils.unique_name.guard():
        return _resume_dp2(out)


def _resume_dp2(out: str) -> dict:
    config, degrees = tiny_config(), ParallelDegrees(data_parallel_degree=2)
    mesh = build_mesh(degrees, config)
    model = build_model(config)
    model, optimizer = parallelize(model, build_optimizer(model), mesh, degrees)
    params = [p for p in model.parameters() if not p.stop_gradient]
    paddle.add_n([(p * 0).sum() for p in params]).backward()
    optimizer.step()
    optimizer.clear_grad()
    state = _train_state(model, optimizer)
    dist.load_state_dict(state, os.path.join(out, "ckpt.pp2"), safetensors=True)
    loaded = {n: _full(p) for n, p in model.named_parameters() if is_trainable(n)}
    moments = {k: _full(v) for k, v in state.items() if "moment" in k}
    if dist.get_rank() == 0:
        np.savez(os.path.join(out, "loaded_dp2.npz"), **loaded)
        np.savez(os.path.join(out, "loaded_dp2_moments.npz"), **moments)
    dist.barrier()
    return {"moment_keys": len(moments)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--sp", default="")
    parser.add_argument("--pp", default="")
    parser.add_argument("--resume-dp2", action="store_true")
    args = parser.parse_args()
    rank = int(os.environ.get("PADDLE_TRAINER_ID", "0"))
    dist.init_parallel_env()
    results = {}
    for name in filter(None, args.sp.split(",")):
        results[name] = run_sp(name, args.out)
        write_result(args.out, rank, results)
    if args.pp:
        # Fresh unique names, as in a process that ran nothing before: the pp2 checkpoint's keys derive from
        # parameter names, and --resume-dp2 rebuilds them from the start.
        with paddle.utils.unique_name.guard():
            for name in args.pp.split(","):
                results[name] = run_pp(name, args.out)
                write_result(args.out, rank, results)
    if args.resume_dp2:
        results["resume_dp2"] = resume_dp2(args.out)
        write_result(args.out, rank, results)
    dist.barrier()


if __name__ == "__main__":
    worker_entry(main)
