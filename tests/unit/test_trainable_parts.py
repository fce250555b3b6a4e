"""What trains (#18): freeze_* keys and their aliases, the padded batched ViT the trainable path runs, per-module
learning rates seen by the optimizer, and the planner's trainable-ViT terms. The layouts themselves are compared
with one process in tests/dist/test_parallel_layouts.py ("vit" mode) and tests/dist/test_lora_parallel.py."""
from __future__ import annotations

import re

import numpy as np
import paddle
import pytest

from autoparallel.config import ConfigError, RunConfig
from autoparallel.engine.optim import apply_module_learning_rates, build_optimizer, lr_multiplier
from autoparallel.planning.memory import PlanSetup, Workload, activation_estimate, state_memory
from network.config import Qwen2VLConfig
from network.modeling_vision import Qwen2VisionTransformer, vision_segment_ids
from placements.degrees import ParallelDegrees
from placements.qwen2_vl import Trainable, model_part, parameter_shapes


def _cfg(**flat) -> RunConfig:
    return RunConfig.build("sft", [("test", flat)])


def test_freeze_keys_and_aliases():
    assert _cfg().model.trainable() == Trainable(vit=False, merger=False, llm=True)
    ms_swift = _cfg(freeze_vit=False, freeze_aligner=False, freeze_llm=True, aligner_lr=2e-5, vit_lr=1e-6)
    assert ms_swift.model.trainable() == Trainable(vit=True, merger=True, llm=False)
    assert (ms_swift.train.merger_lr, ms_swift.train.vit_lr) == (2e-5, 1e-6)
    llama_factory = _cfg(freeze_vision_tower="false", freeze_multi_modal_projector="false",
                         freeze_language_model=True)
    assert llama_factory.model.trainable() == Trainable(vit=True, merger=True, llm=False)
    qwen = _cfg(freeze_vit=False, vision_tower_lr=3e-6, mm_projector_lr=4e-6)
    assert (qwen.train.vit_lr, qwen.train.merger_lr) == (3e-6, 4e-6)
    assert _cfg(train_merger=True).model.freeze_merger is False  # the older key, negated
    # A later layer (the command line) overrides an alias given earlier (the YAML file).
    later = RunConfig.build("sft", [("file.yaml", {"freeze_vision_tower": True}), ("--override", {"freeze_vit": False})])
    assert later.model.freeze_vit is False
    assert "freeze_vit" in later.to_flat_dict() and "freeze_vision_tower" not in later.to_flat_dict()


@pytest.mark.parametrize("flat, message", [
    ({"train_merger": True, "freeze_aligner": True}, "freeze_aligner=True (test) contradicts train_merger=True"),
    ({"freeze_llm": True}, "nothing would train"),
    ({"vit_lr": 1e-5, "learning_rate": 0}, "vit_lr=1e-05 is out of range"),
    ({"freez_vision_tower": True}, "did you mean freeze_vision_tower"),
])
def test_bad_freeze_config(flat, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        _cfg(**flat)


def test_model_parts():
    assert [model_part(n) for n in ("visual.patch_embed.proj.weight", "visual.blocks.3.mlp.fc1.bias",
                                    "visual.merger.ln_q.weight", "model.layers.0.mlp.up_proj.weight",
                                    "lm_head.weight")] == ["vit", "vit", "merger", "llm", "llm"]
    vit_only = Trainable(vit=True, llm=False)
    # A frozen merger behind a trainable ViT runs as dist ops (not dense), without gradient.
    assert not vit_only.dense("visual.merger.mlp.0.weight") and not vit_only.trains("visual.merger.mlp.0.weight")
    assert Trainable(merger=True).dense("visual.blocks.0.attn.qkv.weight")
    assert vit_only.names() == "vit"


def test_padded_vit_rows_equal_the_packed_tower():
    """`forward_padded` (what the trainable ViT runs on [dp, P_max, ...]) equals `forward_features` on each
    row's own patches, with padding (and a row holding padding only) in between."""
    config = Qwen2VLConfig.preset("tiny").vision_config
    paddle.seed(0)
    tower = Qwen2VisionTransformer(config)
    patch_dim = config.in_channels * config.temporal_patch_size * config.patch_size ** 2
    rows = [np.array([[1, 4, 4], [2, 4, 8]]), np.array([[1, 8, 4]]), np.zeros([0, 3], np.int64)]
    width = max(int(g.prod(axis=1).sum()) for g in rows) + 8
    inputs, expected = [[], [], [], []], []
    for grid in rows:
        n = int(grid.prod(axis=1).sum())
        pixels = paddle.randn([n, patch_dim])
        expected.append(tower.forward_features(pixels, grid).numpy() if n else None)
        cos, sin = tower.rotary_cos_sin(grid) if n else (paddle.zeros([0, 16]), paddle.zeros([0, 16]))
        segments = paddle.to_tensor(vision_segment_ids(grid)) if n else paddle.zeros([0], "int64")
        for i, (x, pad) in enumerate(((pixels, 0.0), (cos, 0.0), (sin, 0.0), (segments, -1))):
            inputs[i].append(paddle.concat([x, paddle.full([width - n, *x.shape[1:]], pad, x.dtype)]))
    out = tower.forward_padded(*(paddle.stack(x) for x in inputs)).numpy()
    for row, ref in enumerate(expected):
        if ref is not None:
            # Not bitwise: the padded batch changes the sgemm shapes, so MKL may block (and round) differently.
            np.testing.assert_allclose(out[row, :len(ref)], ref, rtol=1e-5, atol=1e-5)
    assert np.isfinite(out).all()


def test_module_learning_rates_follow_the_schedule():
    """The optimizer's per-parameter LR (what AdamW applies) is vit_lr / merger_lr / learning_rate times the one
    warmup + cosine multiplier at every step, and the first AdamW update of each part is that size."""
    from network.modeling_qwen2_vl import Qwen2VLForConditionalGeneration

    cfg = _cfg(learning_rate=1e-3, vit_lr=3e-3, merger_lr=2e-4, warmup_steps=2, max_steps=6,
               lr_scheduler_type="cosine", weight_decay=0.0)
    paddle.seed(0)
    model = Qwen2VLForConditionalGeneration(Qwen2VLConfig.preset("tiny"))
    optimizer, schedule = build_optimizer(model, cfg, total_steps=6)
    assert apply_module_learning_rates(model, cfg.train) == {"vit": 3.0, "merger": 0.2}
    probes = {part: next(p for n, p in model.named_parameters() if model_part(n) == part and n.endswith("weight"))
              for part in ("vit", "merger", "llm")}
    peak = {"vit": 3e-3, "merger": 2e-4, "llm": 1e-3}
    for step in range(4):
        before = {part: p.numpy().copy() for part, p in probes.items()}
        for p in probes.values():
            (p * paddle.ones_like(p)).sum().backward()  # gradient 1 everywhere: AdamW moves each weight by ~lr
        optimizer.step()
        optimizer.clear_grad()
        multiplier = lr_multiplier(step, 2, 6, "cosine")
        for part, p in probes.items():
            applied = float(optimizer._create_param_lr((p, None)))
            assert applied == pytest.approx(peak[part] * multiplier, rel=1e-6), (step, part)
            if step == 0:  # bias-corrected first Adam step: exactly lr * g / (|g| + eps)
                np.testing.assert_allclose(before[part] - p.numpy(), peak[part] * multiplier, rtol=1e-3)
        schedule.step()


def test_planner_counts_a_trainable_vit():
    config = Qwen2VLConfig.preset("tiny")
    degrees = ParallelDegrees(data_parallel_degree=2, sharding_stage=1, sharding_parallel_degree=1)
    workload = Workload(batch=1, seq_len=64, image_grid=(1, 8, 8))
    frozen = state_memory(PlanSetup(config, degrees, workload))
    trained = state_memory(PlanSetup(config, degrees, workload, trainable=Trainable(vit=True, merger=True)))
    vit = sum(int(np.prod(s)) for n, s in parameter_shapes(config).items() if model_part(n) != "llm") * 4
    # ZeRO-1 over dp 2: the vision gradients are reduce-scattered to the optimizer's shard (N11) and each moment
    # is halved (all vision parameters have an even first dim > 1).
    assert trained.param == frozen.param and trained.grad - frozen.grad == vit // 2
    vision_tensors = sum(1 for n in parameter_shapes(config) if model_part(n) != "llm")
    assert trained.optimizer - frozen.optimizer == vit + vision_tensors * 8
    assert any(t.name.startswith("frozen ViT") for t in frozen.terms)
    assert not any(t.name.startswith("frozen ViT") for t in trained.terms)

    def saved(vit_recompute: bool) -> int:
        wl = Workload(batch=1, seq_len=64, image_grid=(1, 8, 8), vit_recompute=vit_recompute)
        act = activation_estimate(PlanSetup(config, degrees, wl, trainable=Trainable(vit=True)))
        return next(t.bytes for t in act.saved if t.name.startswith("trainable ViT"))

    assert 0 < saved(True) < saved(False)


def test_gpu_dispatch_keeps_the_segment_mask(monkeypatch):
    """The CUDA branch (not runnable here) must not take the mask-free flash kernel for segment ids: with the
    kernels stubbed, the padded-ViT call reaches SDPA with the block-diagonal map and matches the CPU math."""
    import paddle.nn.functional as F
    import paddle.nn.functional.flash_attention as flash

    from network import attention as attn

    def no_flash(*args, **kwargs):
        raise AssertionError("mask-free flash attention used for segmented attention")

    def sdpa(q, k, v, attn_mask=None):  # SDPA's math with an additive mask, [b, s, heads, d]
        qt, kt, vt = (x.transpose([0, 2, 1, 3]) for x in (q, k, v))
        scores = paddle.matmul(qt, kt, transpose_y=True) * q.shape[-1] ** -0.5 + attn_mask
        return paddle.matmul(F.softmax(scores, axis=-1), vt).transpose([0, 2, 1, 3])

    paddle.seed(1)
    q, k, v = (paddle.randn([2, 6, 2, 4]) for _ in range(3))
    segments = paddle.to_tensor([[0, 0, 1, 1, 1, -1], [0, 0, 0, 0, -1, -1]])
    expected = attn.attention(q, k, v, causal=False, segment_ids=segments).numpy()
    monkeypatch.setattr(attn, "_use_gpu_kernels", lambda q: True)
    monkeypatch.setattr(flash, "flash_attention", no_flash)
    monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)
    np.testing.assert_allclose(attn.attention(q, k, v, causal=False, segment_ids=segments).numpy(), expected,
                               rtol=1e-6, atol=1e-6)


def test_windowed_vit_is_not_trainable_yet():
    from placements.qwen2_vl import trainable_problem

    qwen2_5 = Qwen2VLConfig.preset("tiny-qwen2.5-vl")
    assert "Qwen2.5-VL vision tower" in trainable_problem(qwen2_5, Trainable(vit=True))
    assert trainable_problem(qwen2_5, Trainable(merger=True)) is None
    assert trainable_problem(Qwen2VLConfig.preset("tiny"), Trainable(vit=True)) is None
