"""Launched by tests/dist/test_planner.py: what the engine actually holds, for the planner to be checked against.

    --layouts tiny-dp2,scaled-mp2,...   per layout: build, parallelize, one training step (the engine's path:
                                        `parallelize` + `step.train_step`), then `memory_report` totals per rank
    --activations scaled:b:S:side[:rc][:mp2]  two warm-up steps (gradients and AdamW states exist), then
                                        Paddle's host-allocator peak above the state during the fwd+bwd of one
                                        step, and separately during the optimizer update (+ RSS, for contrast)
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import threading
import time

import numpy as np
import paddle.distributed as dist
import psutil

from autoparallel.engine.trainer import apply_recompute
from network.lora import LoraArgs, apply_lora
from autoparallel.planning.memory_report import memory_report
from autoparallel.mesh import build_mesh, mesh_coordinate
from placements.degrees import ParallelDegrees
from autoparallel.parallelize import parallelize
from autoparallel.batch import shard_batch, supervised_tokens
from autoparallel.forward import forward_loss
from autoparallel.step import train_step
from dist_utils import worker_entry, write_result
from network.config import Qwen2VLConfig
from network.device import allocated_bytes, peak_allocated_bytes, reset_peak_allocated
from network.rope_index import get_rope_index_for_config
from parallel_cases import build_model, build_optimizer, micro_batches, tiny_config

LORA = dict(lora_rank=4, lora_alpha=8, lora_target_modules=["model.layers.*q_proj.*", "model.layers.*k_proj.*",
                                                             "model.layers.*v_proj.*", "model.layers.*o_proj.*",
                                                             "model.layers.*gate_proj.*", "model.layers.*up_proj.*",
                                                             "model.layers.*down_proj.*"])
DEGREES = {
    "dp2": dict(data_parallel_degree=2), "mp2": dict(tensor_parallel_degree=2),
    "sharding1": dict(sharding_parallel_degree=2, sharding_stage=1),
    "sharding2": dict(sharding_parallel_degree=2, sharding_stage=2),
    "sharding3": dict(sharding_parallel_degree=2, sharding_stage=3),
    "dp2mp2": dict(data_parallel_degree=2, tensor_parallel_degree=2),
    "cp2": dict(context_parallel_degree=2),
}
SUPERVISED_FRACTION = 0.25


def scaled_config() -> Qwen2VLConfig:
    """Hidden 256, untied head, vocab 16384 (special ids moved inside it): exercises lm_head and a second
    shape family next to the tied tiny preset."""
    tiny = tiny_config()
    return dataclasses.replace(
        tiny, vocab_size=16384, hidden_size=256, intermediate_size=512, mrope_section=[8, 12, 12],
        tie_word_embeddings=False, image_token_id=16300, video_token_id=16301, vision_start_token_id=16298,
        vision_end_token_id=16299, bos_token_id=16290, eos_token_id=16291, pad_token_id=16290,
        vision_config=dataclasses.replace(tiny.vision_config, hidden_size=256))


MODELS = {"tiny": tiny_config, "scaled": scaled_config}


def parse_layout(name: str) -> tuple[str, str, bool]:
    """"tiny-dp2" / "scaled-lora-sharding2" -> (model, degrees key, lora)."""
    parts = name.split("-")
    return parts[0], parts[-1], "lora" in parts


def run_layout(name: str) -> dict:
    model_name, degrees_name, lora = parse_layout(name)
    config = MODELS[model_name]()
    degrees = ParallelDegrees(**DEGREES[degrees_name])
    mesh = build_mesh(degrees, config)
    model = build_model(config)
    if lora:
        apply_lora(model, LoraArgs(**LORA))
    model, optimizer = parallelize(model, build_optimizer(model), mesh, degrees)
    step = micro_batches(config, degrees.dp, mesh_coordinate(mesh, "dp"))[0]
    train_step(model, optimizer, [shard_batch(b, mesh, config) for b in step])
    report = memory_report(model, optimizer, degrees)
    off_ideal = {n: {k: row[k] for k in ("param", "grad", "optimizer")} for n, row in report["params"].items()
                 if any(row[k] != row["ideal_" + k] for k in ("param", "grad", "optimizer"))}
    return {**{k: report["total"][k] for k in ("param", "grad", "optimizer")}, "off_ideal": off_ideal}


# ---- activations ------------------------------------------------------------------------------------------
def synthetic_batch(config: Qwen2VLConfig, batch: int, seq: int, side: int, seed: int = 0) -> dict:
    """`batch` samples of exactly `seq` tokens, one image of side x side patches each, the last quarter
    of every sample supervised."""
    rng = np.random.RandomState(seed)
    v = config.vision_config
    image_tokens = side * side // v.spatial_merge_size ** 2
    ids = rng.randint(0, 1000, (batch, seq)).astype(np.int64)
    ids[:, 4] = config.vision_start_token_id
    ids[:, 5:5 + image_tokens] = config.image_token_id
    ids[:, 5 + image_tokens] = config.vision_end_token_id
    labels = np.full_like(ids, -100)
    answer = int(seq * SUPERVISED_FRACTION)
    labels[:, seq - answer:] = ids[:, seq - answer:]
    grids = np.asarray([(1, side, side)] * batch, np.int64)
    patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
    out = {"input_ids": ids, "labels": labels, "attention_mask": np.ones_like(ids),
           "pixel_values": rng.randn(batch * side * side, patch_dim).astype(np.float32), "image_grid_thw": grids}
    out["position_ids"], _ = get_rope_index_for_config(config, ids, grids, None)
    return out


class RssPeak:
    """Resident-set peak sampled every millisecond in a thread (coarse; includes freed-but-cached pages)."""

    def __enter__(self) -> "RssPeak":
        self.proc, self.stop = psutil.Process(), False
        self.start = self.peak = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        while not self.stop:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        self.stop = True
        self.thread.join()

    @property
    def increase(self) -> int:
        return self.peak - self.start


def measure_point(spec: str) -> dict:
    model_name, b, s, side, *flags = spec.split(":")
    config = MODELS[model_name]()
    degrees = ParallelDegrees(**next((DEGREES[f] for f in flags if f in DEGREES), {}))
    mesh = build_mesh(degrees, config)
    model = build_model(config)
    if "rc" in flags:
        apply_recompute(model)
    model, optimizer = parallelize(model, build_optimizer(model), mesh, degrees)
    batch = shard_batch(synthetic_batch(config, int(b), int(s), int(side)), mesh, config)
    for _ in range(2):  # the first step allocates gradients and AdamW states; the second settles caches
        train_step(model, optimizer, [batch])
    normalizer = float(supervised_tokens([batch]))
    reset_peak_allocated()
    before = allocated_bytes()
    with RssPeak() as rss:
        forward_loss(model, batch, normalizer).backward()
    fwd_bwd = peak_allocated_bytes() - before
    reset_peak_allocated()
    before_update = allocated_bytes()
    optimizer.step()
    update = peak_allocated_bytes() - before_update
    optimizer.clear_grad()
    return {"activations": fwd_bwd, "optimizer_step": update, "rss_activations": rss.increase,
            "leftover": before_update - before}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--layouts", default="")
    parser.add_argument("--activations", default="")
    args = parser.parse_args()
    rank = int(os.environ.get("PADDLE_TRAINER_ID", "0"))
    dist.init_parallel_env()
    results = {}
    names = args.layouts.split(",") if args.layouts else []
    for name in names:
        results[name] = run_layout(name)
        write_result(args.out, rank, results)
    for spec in args.activations.split(",") if args.activations else []:
        results[spec] = measure_point(spec)
        write_result(args.out, rank, results)
    if dist.get_world_size() > 1:
        dist.barrier()


if __name__ == "__main__":
    worker_entry(main)
