"""The plan table (plan.txt) and the memory plan (`qwen2vl-ap plan`) add up the same rows with the same byte rule,
for every layout the planner tests cover; `plan --lora false` plans a full fine-tune."""
from __future__ import annotations

import pytest

from autoparallel.planning.memory import LoraSpec, PlanSetup, Workload, state_memory
from autoparallel.planning.render import render_plan_table
from launch.plan import PlanOptions, build
from network.config import Qwen2VLConfig
from network.lora import PADDLEMIX_TARGETS
from placements.degrees import ParallelDegrees

LAYOUTS = {
    "dp2": ParallelDegrees(data_parallel_degree=2),
    "mp2": ParallelDegrees(tensor_parallel_degree=2),
    "stage1": ParallelDegrees(sharding_parallel_degree=2, sharding_stage=1),
    "stage2": ParallelDegrees(sharding_parallel_degree=2, sharding_stage=2),
    "stage3": ParallelDegrees(sharding_parallel_degree=2, sharding_stage=3),
    "dp2mp2": ParallelDegrees(data_parallel_degree=2, tensor_parallel_degree=2),
    "pp2": ParallelDegrees(pipeline_parallel_degree=2),
}


def _totals(table: str, stage: int | None) -> tuple[str, str, str]:
    label = "total per rank" if stage is None else f"total per rank, stage {stage}"
    row = next(line for line in table.splitlines() if line.startswith(label + " ") or line == label)
    return tuple(row.split()[-3:])


@pytest.mark.parametrize("lora", [False, True], ids=["sft", "lora"])
@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_table_totals_are_the_memory_plan(name, lora, dtype):
    config = Qwen2VLConfig.preset("tiny")
    setup = PlanSetup(config, LAYOUTS[name], Workload(1, 64), dtype=dtype,
                      lora=LoraSpec(8, tuple(PADDLEMIX_TARGETS)) if lora else None)
    table = render_plan_table(setup)
    for stage in range(setup.pp):
        mem = state_memory(setup, stage)
        expected = tuple(f"{b / 2**20:,.2f}" for b in (mem.param, mem.grad, mem.optimizer))
        assert _totals(table, stage if setup.pp > 1 else None) == expected


def test_plan_lora_false_plans_a_full_fine_tune():
    options = PlanOptions(device="cpu")
    lora = build("tiny_lora", {}, options)
    full = build("tiny_lora", {"lora": "false"}, options)
    sft = build("tiny_sft", {}, options)
    assert lora.setup.lora is not None and full.setup.lora is None
    assert full.memory.state.total == sft.memory.state.total > lora.memory.state.total
