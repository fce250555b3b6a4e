"""Launched by tests/dist/test_comm_ledger.py: dp2 training steps of the tiny model (untied head, so every
gradient is reduced once) under the communication ledger; rank r writes result.{r}.json with its measured
per-step ledger records and the bytes of its trainable gradients (counted from the parameters)."""
from __future__ import annotations

import argparse

import paddle.distributed as dist

from autoparallel import cpu_compat
from autoparallel.batch import shard_batch
from autoparallel.comm_ledger import Ledger
from autoparallel.mesh import build_mesh, mesh_coordinate
from autoparallel.parallelize import parallelize
from autoparallel.step import train_step
from dist_utils import worker_entry, write_result
from parallel_cases import CLIP, build_model, build_optimizer, micro_batches, tiny_config
from placements.degrees import ParallelDegrees


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_parallel_env()
    cpu_compat.apply()
    ledger = Ledger(cpu_workarounds=cpu_compat.runs_on_cpu()).install()
    config = tiny_config()
    config.tie_word_embeddings = False
    degrees = ParallelDegrees(data_parallel_degree=2)
    mesh = build_mesh(degrees, config)
    model = build_model(config)
    model, optimizer = parallelize(model, build_optimizer(model), mesh, degrees)
    grads = [p for p in model.parameters() if not p.stop_gradient]
    grad_bytes = sum(int(p._local_value().numel()) * p._local_value().element_size() for p in grads)
    records = []
    for step in micro_batches(config, dp=2, dp_rank=mesh_coordinate(mesh, "dp"))[:2]:
        ledger.start_step()
        train_step(model, optimizer, [shard_batch(b, mesh, config) for b in step], clip_norm=CLIP)
        records.append(ledger.end_step().record())
    write_result(args.out, dist.get_rank(), {"records": records, "grad_bytes": grad_bytes, "tensors": len(grads)})
    dist.barrier()


if __name__ == "__main__":
    worker_entry(main)
