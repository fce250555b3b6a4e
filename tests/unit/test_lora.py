"""LoRA on one process: arguments and presets, which layers get adapters, step-0 identity, the plan entries,
and the adapter files (ours, paddlenlp's `LoRAModel`, and the merge formula of `read_adapter`)."""
from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import paddle
import pytest

from autoparallel.engine.lora_trainer import gather_adapter
from autoparallel.parallelize import parallelize_config
from launch.config import launch_defaults, load_run_config
from network.lora import (LORA_CONFIG_NAME, PADDLEMIX_TARGETS, LoraArgs, apply_lora, load_adapter, read_adapter,
                          save_adapter)
from parallel_cases import build_model, build_optimizer, micro_batches, tiny_config
from placements.lora import lora_plan
from placements.qwen2_vl import tensor_parallel_plan

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def logits(model, batch) -> np.ndarray:
    with paddle.no_grad():
        return model(batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"],
                     pixel_values=paddle.to_tensor(batch["pixel_values"]),
                     image_grid_thw=batch["image_grid_thw"]).logits.numpy()


@pytest.fixture(scope="module")
def config():
    return tiny_config()


@pytest.fixture(scope="module")
def batch(config):
    return micro_batches(config)[0][0]


def test_args_defaults_scaling_and_validation():
    args = LoraArgs()
    assert args.lora and args.lora_target_modules == PADDLEMIX_TARGETS and len(PADDLEMIX_TARGETS) == 7
    assert (args.lora_rank, args.lora_alpha, args.lora_dropout, args.scaling) == (8, 16, 0.0, 2.0)
    assert LoraArgs(lora_rank=16, lora_alpha=256, rslora=True).scaling == 64.0
    for bad in (dict(lora_rank=0), dict(lora_alpha=0), dict(lora_dropout=1.0), dict(lora_target_modules=["q("]),
                dict(lora_target_modules=[])):
        with pytest.raises(ValueError):
            LoraArgs(**bad)


def test_presets():
    tiny = load_run_config("lora", None, {})  # `qwen2vl-ap lora` with no arguments
    assert tiny.train.output_dir == "output/tiny_lora" and tiny.parallel.data_parallel_degree is None
    assert launch_defaults("lora", None) == {"nproc_per_node": "2"}  # dp 2 derived from the 2 processes
    assert tiny.lora == LoraArgs()
    big = load_run_config("lora", "qwen2vl_2b_lora_auto", {})
    sft = load_run_config("sft", "qwen2vl_2b_sft_auto", {})
    assert (big.lora.lora_rank, big.lora.lora_alpha, big.lora.lora_dropout, big.lora.rslora) == (16, 256, 0.0, False)
    assert big.lora.lora_target_modules == PADDLEMIX_TARGETS
    lora_keys = {f.name for f in dataclasses.fields(LoraArgs)}
    same = {k: v for k, v in sft.to_flat_dict().items() if k != "output_dir" and k not in lora_keys}
    assert {k: big.to_flat_dict()[k] for k in same} == same  # everything else as the SFT 2B preset
    override = load_run_config("lora", "qwen2vl_2b_lora_auto",
                               {"lora_target_modules": "model.layers.*q_proj.*,lm_head"})
    assert override.lora.lora_target_modules == ["model.layers.*q_proj.*", "lm_head"]


def test_apply_lora_keeps_names_freezes_base_and_is_identity_at_step0(config, batch):
    model = build_model(config)
    base_names = [n for n, _ in model.named_parameters()]
    before = logits(model, batch)
    names = apply_lora(model, LoraArgs())
    assert names == [f"model.layers.{i}.{part}.{p}" for i in range(config.num_hidden_layers)
                     for part, p in [("self_attn", p) for p in PROJECTIONS[:4]] + [("mlp", p) for p in PROJECTIONS[4:]]]
    params = dict(model.named_parameters())
    lora = {f"{n}.{m}" for n in names for m in ("lora_A", "lora_B")}
    assert set(params) == set(base_names) | lora  # base keys unchanged (checkpoints, merge tools)
    assert {n for n, p in params.items() if not p.stop_gradient} == lora
    q = model.model.layers[0].self_attn.q_proj
    assert q.lora_A.shape == [config.hidden_size, 8] and q.lora_B.shape == [8, q.weight.shape[1]]
    assert not q.lora_B.numpy().any() and q.lora_A.numpy().std() > 0
    np.testing.assert_array_equal(logits(model, batch), before)


def test_targets(config):
    model = build_model(config)
    with pytest.raises(ValueError, match="match no Linear"):
        apply_lora(model, LoraArgs(lora_target_modules=["model.embed_tokens", "nothing.*"]))
    # A pattern may also match containers and activations (mlp, mlp.1): only the Linears get adapters.
    assert apply_lora(model, LoraArgs(lora_target_modules=["visual.merger.mlp.*"])) == [
        "visual.merger.mlp.0", "visual.merger.mlp.2"]
    # ViT layers take adapters too (the engine then runs the ViT as dist ops).
    vit = apply_lora(build_model(config), LoraArgs(lora_target_modules=[r"visual.blocks.0.(attn.qkv|attn.proj|mlp.fc\d)"]))
    assert vit == ["visual.blocks.0.attn.qkv", "visual.blocks.0.attn.proj", "visual.blocks.0.mlp.fc1",
                   "visual.blocks.0.mlp.fc2"]


def test_plan_entries_follow_the_base_layer(config):
    plan = tensor_parallel_plan(config, 2)
    entries = lora_plan(plan)
    assert entries["model.layers.*.self_attn.q_proj.lora_B"] == "colwise"
    assert entries["model.layers.*.self_attn.o_proj.lora_A"] == "rowwise"
    assert entries["model.layers.*.mlp.down_proj.lora_A"] == "rowwise"
    assert not any(k.endswith((".q_proj.lora_A", ".o_proj.lora_B")) for k in entries)
    paddle_plan = parallelize_config(config, 2, 0)["mp_config"]["parallelize_plan"]
    assert set(entries) <= set(paddle_plan)
    assert parallelize_config(config, 1, 0)["mp_config"]["parallelize_plan"] == {}


def _train_single_process(config, args: LoraArgs, steps: int = 2):
    model = build_model(config)
    apply_lora(model, args)
    optimizer = build_optimizer(model)
    for step in micro_batches(config)[:steps]:
        normalizer = float(sum(int((b["labels"][:, 1:] != -100).sum()) for b in step))
        for b in step:
            model(b["input_ids"], attention_mask=b["attention_mask"], position_ids=b["position_ids"],
                  pixel_values=paddle.to_tensor(b["pixel_values"]), image_grid_thw=b["image_grid_thw"],
                  labels=b["labels"], loss_normalizer=normalizer).loss.backward()
        optimizer.step()
        optimizer.clear_grad()
    return model


def test_adapter_export_loads_in_ours_paddlenlp_and_merges(config, batch, tmp_path):
    args = LoraArgs(lora_rank=4, lora_alpha=32, lora_target_modules=PADDLEMIX_TARGETS + ["visual.merger.mlp.2"])
    trained = _train_single_process(config, args)
    expected = logits(trained, batch)
    save_adapter(tmp_path, gather_adapter(trained), args, "tiny")
    saved = json.loads((tmp_path / LORA_CONFIG_NAME).read_text())
    assert (saved["r"], saved["lora_alpha"], saved["scaling"], saved["base_model_name_or_path"]) == (4, 32, 8.0, "tiny")
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary files left

    ours = build_model(config)
    load_adapter(ours, tmp_path)
    np.testing.assert_array_equal(logits(ours, batch), expected)

    from paddlenlp.peft import LoRAModel

    plain = build_model(config)
    plain.config.tensor_parallel_degree = 1  # LoRAModel reads this PretrainedConfig field
    lora_model = LoRAModel.from_pretrained(plain, str(tmp_path))
    np.testing.assert_array_equal(logits(lora_model.model, batch), expected)

    # The merge tool's formula: W + A @ B * scaling on the plain model.
    config_dict, adapters = read_adapter(tmp_path)
    assert config_dict["target_modules"] == args.lora_target_modules
    assert len(adapters) == 7 * config.num_hidden_layers + 1
    merged = build_model(config)
    params = dict(merged.named_parameters())
    for name, (a, b, scaling) in adapters.items():
        assert a.shape == (params[name].shape[0], 4) and b.shape == (4, params[name].shape[1]) and scaling == 8.0
        params[name].set_value(params[name].numpy() + a @ b * scaling)
    np.testing.assert_allclose(logits(merged, batch), expected, rtol=1e-5, atol=1e-5)


def test_load_adapter_rejects_a_mismatched_model(config, tmp_path):
    args = LoraArgs(lora_rank=4, lora_target_modules=["model.layers.*q_proj.*"])
    model = build_model(config)
    apply_lora(model, args)
    state = gather_adapter(model)
    state.pop(next(iter(state)))
    save_adapter(tmp_path, state, args)
    with pytest.raises(ValueError, match="missing"):
        load_adapter(build_model(config), tmp_path)



def test_adapters_record_their_base_and_refuse_another(config, tmp_path):
    """`weights_fingerprint` follows the weights, not the files (single vs sharded); one changed row or another
    stored format changes it; `base_mismatch` passes the recorded base and names the other one."""
    from network import weights
    from network.lora import base_mismatch

    model = build_model(config)
    dirs = {}
    for name, fmt, shard in (("single", "safetensors", None), ("sharded", "safetensors", 1 << 20),
                             ("pdparams", "paddle", None)):
        dirs[name] = str(tmp_path / name)
        weights.save_weights(model, dirs[name], format=fmt, max_shard_bytes=shard)
    weight = dict(model.named_parameters())["model.layers.0.mlp.down_proj.weight"]  # [in, out]: HF's last row
    with paddle.no_grad():
        weight[:, -1] += 1.0
    dirs["other"] = str(tmp_path / "other")
    weights.save_weights(model, dirs["other"])
    prints = {name: weights.weights_fingerprint(path) for name, path in dirs.items()}
    assert prints["single"] == prints["sharded"]
    assert len({prints["single"], prints["pdparams"], prints["other"]}) == 3

    adapter = tmp_path / "adapter"
    state = {"model.layers.0.self_attn.q_proj.lora_A": paddle.zeros([config.hidden_size, 2])}
    save_adapter(adapter, state, LoraArgs(lora=True, lora_rank=2), dirs["single"], prints["single"])
    assert base_mismatch(adapter, dirs["sharded"]) is None
    assert re.match(f"the weights in {dirs['other']} are not the base the adapter was trained on .*lora_config.json: "
                    f"base_model_name_or_path ", base_mismatch(adapter, dirs["other"]))
    assert base_mismatch(adapter, dirs["other"], prints["single"]) is None  # a fingerprint given is trusted
    save_adapter(adapter, state, LoraArgs(lora=True, lora_rank=2), dirs["single"])  # records no fingerprint
    assert base_mismatch(adapter, dirs["other"]) is None
