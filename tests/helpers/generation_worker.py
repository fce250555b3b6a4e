"""Launched by tests/dist/test_generation.py: greedy generation with the tensor-parallel model of `qwen2vl-ap infer`.

    --model DIR --inputs NPZ (keys "{case}.{input name}") --new_tokens N  ->  result.{rank}.json {case: tokens}
"""
from __future__ import annotations

import argparse
import os
from collections import defaultdict

import numpy as np
import paddle.distributed as dist

from dist_utils import worker_entry, write_result
from launch.infer import load_model
from network.generation import GenerationConfig, generate


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
    write_result(args.out, int(os.environ.get("PADDLE_TRAINER_ID", "0")), result)
    dist.barrier()


if __name__ == "__main__":
    worker_entry(main)
