"""LoRA layouts train like one process (tiny, fp32, 5 AdamW steps, ClipGradByGlobalNorm, accumulation 2):
losses, frozen base weights, optimizer state only for adapters, adapter placements under mp, and the exported
adapter reproducing the trained distributed model on a plain single-process model.

One 2-process launch trains dp2, mp2 and sharding stage 1 back to back (tests/helpers/lora_worker.py); one 4-process
launch trains dp2 x mp2.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import paddle
import pytest

from network.lora import LoraArgs, apply_lora, load_adapter, read_adapter
from dist_utils import run_workers, simulated_kernels
from lora_worker import LORA_ARGS
from parallel_cases import LR, build_model, build_optimizer, micro_batches, tiny_config, train_reference

WORKER = Path(__file__).resolve().parents[1] / "helpers" / "lora_worker.py"
LAYOUTS_2, LAYOUTS_4 = ["dp2", "mp2", "sharding1"], ["dp2mp2"]


def _logits(model, batch) -> np.ndarray:
    with paddle.no_grad():
        return model(batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"],
                     pixel_values=paddle.to_tensor(batch["pixel_values"]),
                     image_grid_thw=batch["image_grid_thw"]).logits.numpy()


@pytest.fixture(scope="module")
def reference() -> dict:
    """The single-process LoRA run the layouts must reproduce."""
    config = tiny_config()
    model = build_model(config)
    apply_lora(model, LoraArgs(**LORA_ARGS))
    losses = train_reference(model, build_optimizer(model, paddle_clip=True), config)
    lora = {n: p.numpy() for n, p in model.named_parameters() if not p.stop_gradient}
    return {"losses": losses, "lora": lora, "logits": _logits(model, micro_batches(config)[0][0])}


def _launch(tmp: Path, nproc: int, layouts: list[str]) -> tuple[Path, dict]:
    out = tmp / f"x{nproc}"
    result = run_workers(WORKER, nproc, out, ["--layouts", ",".join(layouts)], timeout=480)
    assert result.returncode == 0, result.logs()
    assert set(result.results) == set(range(nproc)), result.logs()
    assert all(set(r) == set(layouts) for r in result.results.values()), result.logs()
    return out, result.results[0]


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    tmp = tmp_path_factory.mktemp("lora_parallel")
    runs = {}
    for nproc, layouts in ((2, LAYOUTS_2), (4, LAYOUTS_4)):
        out, results = _launch(tmp, nproc, layouts)
        runs |= {name: (out, results[name]) for name in layouts}
    return runs


@pytest.mark.parametrize("layout", LAYOUTS_2 + LAYOUTS_4)
def test_layout_trains_like_one_process(layout, launched, reference):
    out, result = launched[layout]
    np.testing.assert_allclose(result["losses"], reference["losses"], rtol=1e-5)
    assert result["base_changed"] == []  # every base weight bit-identical after training
    assert result["trainable"] == sorted(reference["lora"])
    assert result["with_state"] == sorted(reference["lora"])  # no optimizer state for frozen weights

    config = tiny_config()
    plain = build_model(config)
    load_adapter(plain, out / f"adapter.{layout}")
    trained = np.load(out / f"logits.{layout}.npy")
    np.testing.assert_allclose(_logits(plain, micro_batches(config)[0][0]), trained, rtol=1e-5, atol=1e-5)
    _, adapters = read_adapter(out / f"adapter.{layout}")
    # lora_A's gradient is zero until lora_B leaves zero. At that next step Adam's first update of an element is
    # lr * sign(gradient) whatever its size, so an element whose gradient is rounding noise (another summation
    # order: the layout, the fused loss head) takes a step in a direction rounding decides. Such elements are off
    # by at most a couple of AdamW steps and rare (seen: 13 of the 512 of one decoder lora_A, every other adapter
    # within 1e-5 of one process); all the rest agrees.
    close, total = 0, 0
    for name, (a, b, _) in adapters.items():
        lora = name[: -len("weight")]
        for value, key in ((a, lora + "lora_A"), (b, lora + "lora_B")):
            ref = reference["lora"][key]
            close += int(np.isclose(value, ref, rtol=1e-4, atol=1e-5).sum())
            total += value.size
            assert np.abs(value - ref).max() < 2 * LR, (layout, key, np.abs(value - ref).max())
    assert close / total > 0.995, (layout, close, total)


@pytest.mark.parametrize("layout", ["mp2", "dp2mp2"])
def test_adapters_follow_the_base_placements(layout, launched):
    _, result = launched[layout]
    placements, shapes = result["placements"], result["local_shapes"]
    config = tiny_config()
    h, r = config.hidden_size, LORA_ARGS["lora_rank"]
    attn, mlp = "model.layers.0.self_attn.", "model.layers.0.mlp."
    mp_shard = {1: "[Replicate(), Shard(dim=1)]", 0: "[Replicate(), Shard(dim=0)]"}
    replicated = "[Replicate(), Replicate()]"
    assert placements[attn + "q_proj.weight"] == mp_shard[1] and placements[attn + "q_proj.lora_B"] == mp_shard[1]
    assert placements[attn + "q_proj.lora_A"] == replicated and shapes[attn + "q_proj.lora_A"] == [h, r]
    assert shapes[attn + "q_proj.lora_B"] == [r, config.num_attention_heads * config.head_dim // 2]
    assert placements[attn + "o_proj.weight"] == mp_shard[0] and placements[attn + "o_proj.lora_A"] == mp_shard[0]
    assert placements[attn + "o_proj.lora_B"] == replicated and shapes[attn + "o_proj.lora_B"] == [r, h]
    assert placements[mlp + "up_proj.lora_B"] == mp_shard[1] and placements[mlp + "down_proj.lora_A"] == mp_shard[0]
    # The merger and the ViT are outside the TP plan: their adapters are replicated like their weights.
    assert placements["visual.merger.mlp.2.lora_A"] == replicated
    assert placements["visual.blocks.0.attn.qkv.lora_B"] == replicated



def test_simulated_gpu_lora_mp2_trains_like_one_process(tmp_path, reference):
    """LoRA on mp2 on the simulated GPU (network/simulated_gpu.py): flash attention on head-split q/k/v, SDPA with
    the block-diagonal mask for the ViT (its adapters train, so it runs as padded rows), the losses of one plain
    process."""
    result = run_workers(WORKER, 2, tmp_path, ["--layouts", "mp2"], timeout=480, simulate_gpu=True)
    assert result.returncode == 0 and set(result.results) == {0, 1}, result.logs()
    for res in result.results.values():
        np.testing.assert_allclose(res["mp2"]["losses"], reference["losses"], rtol=1e-5)
    kernels = simulated_kernels(tmp_path)
    assert kernels["flash_attention"] > 0 and kernels["scaled_dot_product_attention"] > 0, kernels
