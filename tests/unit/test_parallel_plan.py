"""Plan data, rendering, degree validation and cpu_compat — single process, no launch."""
from __future__ import annotations

import dataclasses

import paddle
import pytest

from autoparallel import cpu_compat
from placements.degrees import DegreeError, ParallelDegrees, degree_problems, validate_degrees
from network.config import Qwen2VLConfig
from network.modeling_qwen2_vl import Qwen2VLForConditionalGeneration
from autoparallel.planning.render import render_plan
from placements import layout, parameter_shapes, tensor_parallel_plan
from placements.qwen2_vl import Trainable


@pytest.fixture(scope="module")
def tiny() -> Qwen2VLConfig:
    return Qwen2VLConfig.preset("tiny")


def test_parameter_shapes_match_the_model(tiny):
    model = Qwen2VLForConditionalGeneration(tiny)
    assert {n: tuple(p.shape) for n, p in model.named_parameters()} == parameter_shapes(tiny)


def test_plan_kv_replicated_and_tied_head(tiny):
    assert tensor_parallel_plan(tiny, 1) == {}
    mp2 = tensor_parallel_plan(tiny, 2)
    assert mp2["model.layers.*.self_attn.k_proj"] == "colwise" and "lm_head" not in mp2
    mp4 = tensor_parallel_plan(tiny, 4)  # 2 KV heads < mp 4: k/v replicated
    assert "model.layers.*.self_attn.k_proj" not in mp4 and "model.layers.*.self_attn.v_proj" not in mp4
    untied = dataclasses.replace(tiny, tie_word_embeddings=False)
    assert tensor_parallel_plan(untied, 2)["lm_head"] == "colwise"


def test_layout_rules(tiny):
    q = layout("model.layers.0.self_attn.q_proj.weight", (128, 128), tiny, dp=2, mp=2, sharding_stage=1)
    assert q.placements == ("R", "S(1)") and q.local_shape == (128, 64) and q.state_local_shape == (64, 64)
    emb = layout("model.embed_tokens.weight", (151936, 128), tiny, dp=2, mp=1, sharding_stage=3)
    assert emb.placements == ("S(0)", "R") and emb.local_shape == (75968, 128)
    vit = layout("visual.blocks.0.attn.qkv.weight", (64, 192), tiny, dp=2, mp=2, sharding_stage=3)
    assert vit.dense and vit.local_shape == (64, 192) and vit.state_local_shape is None
    merger = layout("visual.merger.mlp.0.weight", (256, 256), tiny, 2, 1, 1, Trainable(merger=True))
    assert merger.state_local_shape == (128, 256)
    # A trainable ViT: replicated on the mesh, ZeRO-sharded like any parameter outside the TP plan; the merger
    # behind it runs as dist ops even when frozen, and a frozen LLM keeps its mp shard without ZeRO.
    vit_on = Trainable(vit=True, llm=False)
    vit = layout("visual.blocks.0.attn.qkv.weight", (64, 192), tiny, dp=2, mp=2, sharding_stage=3, trainable=vit_on)
    assert not vit.dense and vit.placements == ("S(0)", "R") and vit.local_shape == (32, 192)
    frozen_merger = layout("visual.merger.mlp.0.weight", (256, 256), tiny, 2, 2, 3, vit_on)
    assert not frozen_merger.dense and frozen_merger.state_local_shape is None and frozen_merger.local_shape == (256, 256)
    q = layout("model.layers.0.self_attn.q_proj.weight", (128, 128), tiny, dp=2, mp=2, sharding_stage=3,
               trainable=vit_on)
    assert q.placements == ("R", "S(1)") and q.local_shape == (128, 64) and q.grad_local_shape is None


def test_render_plan(tiny):
    text = render_plan(tiny, dp=1, mp=2)
    row = next(line for line in text.splitlines() if line.startswith("model.layers.*.mlp.down_proj.weight"))
    assert "[R, S(0)]" in row and "[128, 128]" in row and " 2 " in row
    assert "total per rank" in text
    big = render_plan(Qwen2VLConfig.preset("qwen2-vl-72b"), dp=4, mp=8, sharding_stage=1, dtype="bfloat16")
    assert "lm_head.weight" in big and "[8192, 19008]" in big


@pytest.mark.parametrize("degrees, world, expected", [
    (ParallelDegrees(tensor_parallel_degree=3), 2,
     ["num_key_value_heads=2 and tensor_parallel_degree=3", "world size 2 !=", "= 3"]),
    (ParallelDegrees(data_parallel_degree=3), 2, ["world size 2 != data_parallel_degree 3"]),
    (ParallelDegrees(pipeline_parallel_degree=2), 2, ["pipeline_parallel_degree=2"]),
    (ParallelDegrees(data_parallel_degree=2, sharding_parallel_degree=2, sharding_stage=1), 4,
     ["data_parallel_degree=2 and sharding_parallel_degree=2"]),
    (ParallelDegrees(sharding_parallel_degree=2), 2, ["sharding_parallel_degree=2 needs sharding_stage"]),
    (ParallelDegrees(tensor_parallel_degree=5), 5, ["num_attention_heads=4", "vocab_size=151936",
                                                     "intermediate_size=256"]),
])
def test_bad_degrees_name_the_numbers(tiny, degrees, world, expected):
    with pytest.raises(DegreeError) as err:
        validate_degrees(degrees, tiny, world)
    for text in expected:
        assert text in str(err.value)


@pytest.mark.skipif(paddle.is_compiled_with_cuda(), reason="CPU-build limitation")
def test_stage3_on_dp_x_mp_rejected_on_cpu(tiny):
    problems = degree_problems(ParallelDegrees(sharding_parallel_degree=2, sharding_stage=3,
                                               tensor_parallel_degree=2), tiny, 4, cpu_build=True)
    assert problems and "sharding_stage=3 on a dp x mp mesh (2 x 2)" in problems[0]


def test_batch_arithmetic(tiny):
    ok = ParallelDegrees(data_parallel_degree=2)
    assert not degree_problems(ok, tiny, 2, per_device_batch_size=2, gradient_accumulation_steps=4,
                               global_batch_size=16)
    (msg,) = degree_problems(ok, tiny, 2, per_device_batch_size=2, gradient_accumulation_steps=4,
                             global_batch_size=12)
    assert "global batch 12 != per_device_batch_size 2 x dp 2 x gradient_accumulation_steps 4 = 16" in msg


def test_valid_degrees(tiny):
    for d, world in [(ParallelDegrees(tensor_parallel_degree=4), 4),  # KV heads replicated
                     (ParallelDegrees(data_parallel_degree=2, tensor_parallel_degree=2), 4),
                     (ParallelDegrees(sharding_parallel_degree=2, sharding_stage=3), 2)]:
        validate_degrees(d, tiny, world)


@pytest.mark.skipif(paddle.is_compiled_with_cuda(), reason="patches are for the CPU build only")
def test_cpu_compat_apply_is_idempotent():
    first = cpu_compat.apply()
    assert any("Partial->Shard" in p for p in first) and any("cuda" in p for p in first)
    assert cpu_compat.apply() == first
    t = paddle.ones([2])
    assert t.cuda().numpy().tolist() == [1.0, 1.0]
