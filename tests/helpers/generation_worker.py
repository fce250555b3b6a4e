"""Launched by tests/dist/test_generation.py: greedy generation with the tensor-parallel model of `qwen2vl-ap infer`.

    --model DIR --inputs NPZ (keys "{case}.{input name}") --new_tokens N  ->  result.{rank}.json {case: tokens}

Also "joined": the "video" case joining a `RunningBatch` 3 steps after "one_image" (continuous batching on
tensor-parallel KV caches), {case: tokens}.
"""
from __future__ import annotations

import argparse
import os
from collections import defaultdict

import numpy as np
import paddle.distributed as dist

from dist_utils import worker_entry, write_result
from launch.infer import load_model
from network.generation import GenerationConfig, RunningBatch, generate


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--inputs", required=True)
    parser.add_argument("--new_tokens", type=int, required=True)
    args = parser.parse_args()
    dist.init_parallel_env()
    model = load_model(args.model, tensor_parallel_degree=dist.get_world_size())
    cases: dict[str, dict] = defaultdict(dict)
    with np.load(args.inputs) as data:
        for key in data.files:
            case, name = key.split(".", 1)
            cases[case][name] = data[key]
    config = GenerationConfig(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
    result = {}
    for case, inputs in sorted(cases.items()):
        out = generate(model, **inputs, generation_config=config)
        result[case] = out.sequences.tolist()
        if case == "batch":
            result["tokens_per_second"] = (out.sequences.size - len(out.sequences)) / out.decode_seconds
    result["joined"] = _joined(model, config, cases["one_image"], cases["video"])
    write_result(args.out, int(os.environ.get("PADDLE_TRAINER_ID", "0")), result)
    dist.barrier()


def _joined(model, config: GenerationConfig, first: dict, second: dict) -> dict[str, list[int]]:
    running = RunningBatch(model, config)
    got, rows = {"one_image": running.join(**first).tolist()}, ["one_image"]
    for step in range(3 * config.max_new_tokens):
        if step == 3:
            got["video"], rows = running.join(**second).tolist(), rows + ["video"]
        done = running.finished()
        running.keep(~done)
        rows = [r for r, d in zip(rows, done) if not d]
        if not rows:
            break
        for row, token in zip(rows, running.step()):
            got[row].append(int(token))
    return got


if __name__ == "__main__":
    worker_entry(main)
