"""Launched by tests/dist/test_sharded_load_ranks.py: start from a checkpoint directory the lazy, sharded way.

    --model DIR --layout NAME   build lazily, apply the plan of the layout, `load_sharded`; write result.{rank}.json
                                with every parameter whose local piece differs from the slice of the dense model
                                (loaded in the same process), how many stayed lazy, and rank 0's text logits from
                                the parallel model next to the dense model's.
"""
from __future__ import annotations

import argparse

import numpy as np
import paddle
import paddle.distributed as dist

from autoparallel.mesh import build_mesh
from autoparallel.parallelize import parallelize
from autoparallel.sharded_load import lazy_parameters, load_sharded, local_box
from dist_utils import worker_entry, write_result
from launch.infer import TensorParallelModel
from network.config import Qwen2VLConfig
from network.modeling_qwen2_vl import Qwen2VLForConditionalGeneration
from placements.degrees import ParallelDegrees

LAYOUTS = {
    "mp2": ParallelDegrees(tensor_parallel_degree=2),
    "zero1_dp2": ParallelDegrees(sharding_parallel_degree=2, sharding_stage=1),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--layout", required=True)
    args = parser.parse_args()
    dist.init_parallel_env()
    rank = dist.get_rank()
    degrees = LAYOUTS[args.layout]
    dense = Qwen2VLForConditionalGeneration.from_pretrained(args.model)
    model = Qwen2VLForConditionalGeneration.lazy(Qwen2VLConfig.from_pretrained(args.model))
    model, _ = parallelize(model, None, build_mesh(degrees, model.config), degrees)
    lazy_before = len(lazy_parameters(model))
    load_sharded(model, args.model)
    reference = dense.state_dict()
    wrong, sharded = [], 0
    for name, param in model.state_dict().items():
        full = reference[name].numpy()
        if param.is_dist():
            box = local_box(param, rank)
            sharded += any((a, b) != (0, s) for (a, b), s in zip(box, full.shape))
            expected = full[tuple(slice(a, b) for a, b in box)]
            got = param._local_value().numpy()
        else:
            expected, got = full, param.numpy()
        if got.shape != expected.shape or not np.array_equal(got, expected):
            wrong.append(name)
    ids = np.random.default_rng(0).integers(0, 500, size=(2, 12))
    positions = np.broadcast_to(np.arange(12), (3, 2, 12)).copy()
    model.eval()
    with paddle.no_grad():
        logits = TensorParallelModel(model)(paddle.to_tensor(ids), position_ids=paddle.to_tensor(positions)).logits
        ref_logits = dense(paddle.to_tensor(ids), position_ids=paddle.to_tensor(positions)).logits
    write_result(args.out, rank, {"wrong": wrong, "lazy_before": lazy_before, "sharded": sharded,
                                  "lazy_after": len(lazy_parameters(model)), "params": len(reference),
                                  "logits_diff": float(np.abs(logits.numpy() - ref_logits.numpy()).max())})
    dist.barrier()


if __name__ == "__main__":
    worker_entry(main)
