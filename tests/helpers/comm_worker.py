"""Launched by tests/dist/test_comm_ledger.py: two training steps of the tiny model under the communication
ledger over 2 ranks (same data, same initial weights): dp2 and ZeRO-1 with an untied head, dp2 and mp2 with the
preset's tied head, and cp2 (context parallel's Ulysses exchanges); rank r writes result.{r}.json with, per
layout, its measured per-step ledger records, the losses, the bytes of its trainable gradients (counted from the
parameters), the bytes of the whole embedding table, a checksum of the weights and each step's micro-batch
shapes [B, S] (mp2 also with LoRA adapters on every decoder Linear); after mp2's training, the bytes it sent
per token of a greedy decode on that model (as infer runs it)."""
from __future__ import annotations

import argparse

import numpy as np
import paddle.distributed as dist

from autoparallel import cpu_compat
from autoparallel.batch import shard_batch
from autoparallel.comm_ledger import Ledger
from autoparallel.engine.evaluation import TensorParallelModel
from autoparallel.mesh import build_mesh, mesh_coordinate
from autoparallel.parallelize import parallelize
from autoparallel.step import train_step
from dist_utils import worker_entry, write_result
from network.generation import GenerationConfig, generate
from network.lora import LoraArgs, apply_lora
from parallel_cases import CLIP, build_model, build_optimizer, micro_batches, tiny_config
from placements.degrees import ParallelDegrees

# name -> (degrees, tied head)
LAYOUTS = {"dp2": (dict(data_parallel_degree=2), False),
           "zero1": (dict(sharding_parallel_degree=2, sharding_stage=1), False),
           "dp2_tied": (dict(data_parallel_degree=2), True),
           "mp2_tied": (dict(tensor_parallel_degree=2), True),
           "mp2_lora": (dict(tensor_parallel_degree=2), True),
           "cp2": (dict(context_parallel_degree=2), True)}
LORA = LoraArgs(lora_rank=4, lora_alpha=8, lora_target_modules=[
    f"model.layers.*{m}.*" for m in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")])


DECODE_TOKENS = 6


def decode_bytes(model, ledger: Ledger) -> list[int]:
    """Bytes sent per decode step of DECODE_TOKENS greedy tokens from a 16-token prompt (the first token, from the
    prefill's logits, left out): the ledger read at every new token."""
    model.eval()
    marks = []
    ids = np.arange(100, 116, dtype=np.int64)[None]
    generate(TensorParallelModel(model), ids, np.ones_like(ids),
             generation_config=GenerationConfig(max_new_tokens=DECODE_TOKENS, min_new_tokens=DECODE_TOKENS),
             streamer=lambda tokens: marks.append(ledger.totals()[0]))
    return np.diff(marks)[1:].tolist()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_parallel_env()
    cpu_compat.apply()
    ledger = Ledger(gloo=cpu_compat.runs_on_cpu()).install()
    result = {}
    for name, (kw, tied) in LAYOUTS.items():
        config = tiny_config()
        config.tie_word_embeddings = tied
        degrees = ParallelDegrees(**kw)
        mesh = build_mesh(degrees, config)
        model = build_model(config)
        if "lora" in name:
            apply_lora(model, LORA)
        model, optimizer = parallelize(model, build_optimizer(model), mesh, degrees)
        grads = [p for p in model.parameters() if not p.stop_gradient]
        grad_bytes = sum(int(p._local_value().numel()) * p._local_value().element_size() for p in grads)
        records, losses, shapes = [], [], []
        dp = degrees.dp
        for step in micro_batches(config, dp=dp, dp_rank=mesh_coordinate(mesh, "dp"))[:2]:
            batches = [shard_batch(b, mesh, config) for b in step]
            ledger.start_step()
            out = train_step(model, optimizer, batches, clip_norm=CLIP)
            records.append(ledger.end_step().record())
            losses.append(out.loss)
            shapes.append([list(b.input_ids.shape) for b in batches])
        checksum = sum(float(p._local_value().astype("float64").abs().sum()) for p in grads)
        result[name] = {"records": records, "losses": losses, "grad_bytes": grad_bytes, "tensors": len(grads),
                        "checksum": checksum, "table_bytes": config.vocab_size * config.hidden_size * 4,
                        "shapes": shapes}
        if name == "mp2_tied":
            result[name]["decode_per_token"] = decode_bytes(model, ledger)
    write_result(args.out, dist.get_rank(), result)
    dist.barrier()


if __name__ == "__main__":
    worker_entry(main)
