"""Plan table, memory plan and communication plan under pipeline (pp) and sequence parallel (SP), single
process: a stage model built by `build_stage_model` holds exactly the bytes the planner gives its ranks."""
from __future__ import annotations

import paddle
import pytest

from autoparallel.planning.communication import communication
from autoparallel.planning.memory_report import memory_report
from placements.degrees import ParallelDegrees
from autoparallel.pipeline import Stage, build_stage_model
from autoparallel.planning.memory import PlanSetup, Workload, activation_estimate, state_memory
from launch.plan import plan_main
from parallel_cases import build_model, tiny_config
from placements.qwen2_vl import SP_PLAN, is_trainable, pipeline_layer_split
from autoparallel.planning.render import plan_rows, render_plan

PP2 = ParallelDegrees(pipeline_parallel_degree=2)


@pytest.mark.parametrize("index", [0, 1])
def test_stage_model_holds_planned_bytes(index):
    """One AdamW step on the stage model (no launch: `build_stage_model` only deletes sublayers), then the
    held bytes against the plan: parameters, gradients and optimizer states of that stage."""
    config = tiny_config()
    split = pipeline_layer_split(config, 2)
    stage = Stage(index=index, num_stages=2, layers=split[index], mesh=None, prev_rank=None if index == 0 else 0,
                  next_rank=1 if index == 0 else None, tied_peer=1 - index, ranks_per_stage=1)
    model = build_stage_model(build_model(config), stage)
    for name, p in model.named_parameters():
        p.stop_gradient = not is_trainable(name)
    trainable = [p for p in model.parameters() if not p.stop_gradient]
    optimizer = paddle.optimizer.AdamW(1e-3, parameters=trainable)
    paddle.add_n([p.sum() for p in trainable]).backward()
    optimizer.step()
    held = memory_report(model, optimizer, PP2)["total"]
    planned = state_memory(PlanSetup(config, PP2, Workload(1, 16)), index)
    assert (held["param"], held["grad"], held["optimizer"]) == (planned.param, planned.grad, planned.optimizer)
    assert (held["ideal_param"], held["ideal_grad"], held["ideal_optimizer"]) == \
        (planned.param, planned.grad, planned.optimizer)
    rows = plan_rows(config, pp=2)
    assert sum(r.param_bytes for r in rows if index in r.stages) == planned.param
    if index == 1:  # the tied head's copy of the embedding lives here too
        assert "model.embed_tokens.weight" in dict(model.named_parameters())


def test_fthenb_keeps_every_micro_batch():
    config = tiny_config()
    one, four = (activation_estimate(PlanSetup(config, PP2, Workload(1, 64, gradient_accumulation_steps=m)), 0)
                 for m in (1, 4))
    assert four.micro_batches_alive == 4
    assert sum(t.bytes for t in four.saved) == 4 * sum(t.bytes for t in one.saved)
    assert not any(p.name.startswith("loss") for p in four.phases)  # the head is on the last stage


def test_sequence_parallel_halves_norm_activations():
    config = tiny_config()

    def norms(sp: bool) -> int:
        degrees = ParallelDegrees(tensor_parallel_degree=2, sequence_parallel=sp)
        saved = activation_estimate(PlanSetup(config, degrees, Workload(2, 128))).saved
        return next(t.bytes for t in saved if t.name.startswith("decoder RMSNorm"))

    assert norms(True) * 2 == norms(False)


def test_render_plan_stages_and_sp_regions():
    config = tiny_config()
    text = render_plan(config, pp=2)
    assert "stage" in text.splitlines()[1] and "total per rank, stage 1" in text
    embed = next(line for line in text.splitlines() if line.startswith("model.embed_tokens.weight"))
    assert "0 + 1 (tied copy)" in embed
    assert "a rank holds only its stage's parameters" in text
    sp = render_plan(config, mp=2, sequence_parallel=True)
    assert "sequence parallel" in sp and all(key in sp for key in SP_PLAN)
    assert "sequence parallel" not in render_plan(config, mp=2)


def test_pp_and_sp_collectives():
    config = tiny_config()
    wl = Workload(batch=2, seq_len=64, gradient_accumulation_steps=3)
    act = 2 * 64 * config.hidden_size * 4
    pp = communication(PlanSetup(config, PP2, wl), stage=1)
    sends = [c for c in pp if c.op == "send/recv"]
    assert [(c.calls, c.bytes_per_call) for c in sends[:2]] == [(3, act), (3, act)]
    assert sends[2].phase.startswith("tied embedding") and sends[2].bytes_per_call == config.vocab_size * \
        config.hidden_size * 4
    tp, sp = (communication(PlanSetup(config, ParallelDegrees(tensor_parallel_degree=2, sequence_parallel=f), wl))
              for f in (False, True))
    layers = config.num_hidden_layers
    # SP: no decoder all-reduce left (only the CE statistics); 2 gathers + 2 scatters per layer each way.
    assert [c.phase for c in sp if c.op == "all_reduce" and c.group == "mp"] == \
        ["forward: vocab-parallel CE statistics"]
    assert sum(c.calls for c in sp if c.op == "all_gather") == 3 * (4 * layers + 2)
    assert sum(c.calls for c in tp if c.group == "mp") == 3 * (1 + 4 * layers + 1 + 3)


def test_plan_command_pp2(capsys):
    code = plan_main(["--config", "qwen2vl_2b_sft_auto", "--model_name_or_path", "qwen2-vl-2b",
                      "--pipeline_parallel_degree", "2", "--sharding_parallel_degree", "4",
                      "--gradient_accumulation_steps", "4", "--nproc_per_node", "8"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "x pp 2" in out and "stage 0: decoder layers 0-" in out and "x4 micro-batches alive" in out
    assert "tied embedding gradient" in out and "not implemented" not in out
