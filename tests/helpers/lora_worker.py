"""Launched by tests/dist/test_lora_parallel.py: LoRA training in several layouts (same data as the single-process
reference of parallel_cases), one launch.

    --layouts dp2,mp2,...   per layout: result.{rank}.json (losses, placements, frozen/optimizer checks) and, from
                            rank 0, adapter.{layout}/ (exported adapter) + logits.{layout}.npy of the trained model
"""
from __future__ import annotations

import argparse
import os

import numpy as np
import paddle
import paddle.distributed as dist

from autoparallel.engine.lora_trainer import gather_adapter
from network.lora import LoraArgs, apply_lora, save_adapter
from autoparallel.mesh import build_mesh, mesh_coordinate
from placements.degrees import ParallelDegrees
from autoparallel.parallelize import parallelize
from autoparallel.batch import shard_batch
from autoparallel.forward import embed_inputs
from autoparallel.step import train_step
from dist_utils import worker_entry, write_result
from placements.qwen2_vl import Trainable
from parallel_cases import CLIP, LAYOUTS_2, LAYOUTS_4, build_model, build_optimizer, micro_batches, tiny_config

LAYOUTS = {name: kw for name, kw, mode in LAYOUTS_2 + LAYOUTS_4 if mode == "frozen"}
# rank 4 / alpha 8 on the decoder, the merger's second Linear and two ViT layers (dist-op layers outside the TP
# plan: the ViT then runs as dist ops on every rank's padded patches).
LORA_ARGS = dict(lora_rank=4, lora_alpha=8, lora_target_modules=[
    "model.layers.*q_proj.*", "model.layers.*k_proj.*", "model.layers.*v_proj.*", "model.layers.*o_proj.*",
    "model.layers.*gate_proj.*", "model.layers.*up_proj.*", "model.layers.*down_proj.*", "visual.merger.mlp.2",
    "visual.blocks.0.attn.qkv", "visual.blocks.1.mlp.fc2"])


def full(t: paddle.Tensor) -> np.ndarray:
    if not t.is_dist():
        return t.numpy()
    return dist.reshard(t, t.process_mesh, [dist.Replicate()] * len(t.process_mesh.shape))._local_value().numpy()


def run_layout(name: str, out: str) -> dict:
    config = tiny_config()
    degrees = ParallelDegrees(**LAYOUTS[name])
    mesh = build_mesh(degrees, config)
    model = build_model(config)
    base_before = {n: p.numpy().copy() for n, p in model.named_parameters()}
    args = LoraArgs(**LORA_ARGS)
    apply_lora(model, args)
    optimizer = build_optimizer(model)
    # the ViT and the merger carry adapters, so they must run as dist ops (see network/lora.py)
    model, optimizer = parallelize(model, optimizer, mesh, degrees, trainable=Trainable(vit=True, merger=True))
    dp_rank = mesh_coordinate(mesh, "dp")
    losses = [train_step(model, optimizer, [shard_batch(b, mesh, config) for b in step], clip_norm=CLIP).loss
              for step in micro_batches(config, degrees.dp, dp_rank)]

    params = dict(model.named_parameters())
    inner = getattr(optimizer, "_inner_opt", optimizer)
    with_state = {k for per in inner._accumulators.values() for k in per}
    with_state |= {p for p in getattr(inner, "_master_weights", {})}
    base_changed = sorted(n for n, v in base_before.items() if not np.array_equal(full(params[n]), v))
    state = gather_adapter(model)
    model.eval()
    with paddle.no_grad():
        batch = shard_batch(micro_batches(config, degrees.dp, dp_rank)[0][0], mesh, config)
        logits = model(batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                       inputs_embeds=embed_inputs(model, batch)).logits
        logits = full(logits)
    if dist.get_rank() == 0:
        save_adapter(os.path.join(out, f"adapter.{name}"), state, args, "tiny")
        np.save(os.path.join(out, f"logits.{name}.npy"), logits)
    dist.barrier()
    return {
        "losses": losses,
        "base_changed": base_changed,
        "with_state": sorted(n for n, p in params.items() if p.name in with_state),
        "trainable": sorted(n for n, p in params.items() if not p.stop_gradient),
        "placements": {n: str(p.placements) if p.is_dist() else "dense" for n, p in params.items()},
        "local_shapes": {n: list((p._local_value() if p.is_dist() else p).shape) for n, p in params.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--layouts", required=True)
    args = parser.parse_args()
    dist.init_parallel_env()
    results = {}
    for name in args.layouts.split(","):
        results[name] = run_layout(name, args.out)
        write_result(args.out, dist.get_rank(), results)
    dist.barrier()


if __name__ == "__main__":
    worker_entry(main)
