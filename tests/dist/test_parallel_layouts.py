"""Layouts train like one process: 2- and 4-process launches vs a single-process reference (tiny, fp32).

Each launch trains all its layouts back to back (tests/helpers/parallel_worker.py); the reference runs once for a
frozen ViT and once with a trainable merger. 5 AdamW steps, ClipGradByGlobalNorm, accumulation 2.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dist_utils import run_workers, run_workers_ok
from parallel_cases import _IMAGES, LAYOUTS_2, LAYOUTS_4

WORKER = Path(__file__).resolve().parents[1] / "helpers" / "parallel_worker.py"



@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    run = run_workers_ok(WORKER, 1, out, ["--reference"])
    return {mode: {"losses": run.results[0][mode], "params": dict(np.load(out / f"reference.{mode}.npz"))}
            for mode in ("frozen", "train_merger")}


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    runs = {}
    for nproc, layouts in ((2, LAYOUTS_2), (4, LAYOUTS_4)):
        out = tmp_path_factory.mktemp(f"np{nproc}")
        run = run_workers_ok(WORKER, nproc, out, ["--layouts", ",".join(name for name, _, _ in layouts)])
        for name, _, train_merger in layouts:
            runs[name] = {"ranks": {r: res[name] for r, res in run.results.items()},
                          "params": dict(np.load(out / f"params.{name}.npz")), "train_merger": train_merger}
    return runs


ALL = [name for name, _, _ in LAYOUTS_2 + LAYOUTS_4]


def test_data_has_two_image_samples_and_uneven_ranks():
    assert any(len(grids) == 2 for grids in _IMAGES) and any(len(grids) == 0 for grids in _IMAGES)


@pytest.mark.parametrize("name", ALL)
def test_loss_and_params_match_single_process(name, launched, reference):
    run = launched[name]
    ref = reference["train_merger" if run["train_merger"] else "frozen"]
    for rank, res in run["ranks"].items():
        np.testing.assert_allclose(res["losses"], ref["losses"], rtol=1e-5, err_msg=f"{name} rank {rank}")
    assert set(run["params"]) == {k for k in ref["params"] if k in run["params"]}
    for key, value in run["params"].items():
        err = np.linalg.norm(value - ref["params"][key]) / np.linalg.norm(ref["params"][key])
        # k_proj.bias: its low-frequency M-RoPE channels barely rotate, so softmax shift invariance makes their
        # true gradient ~0 and AdamW turns rounding noise into lr-sized steps in any two summation orders.
        # mp4 splits every matmul four ways (and replicates KV heads): a different summation order again,
        # measured 1.15e-5 on gate_proj after 5 AdamW steps; the 1e-5 bound is kept for dp/mp2/sharding.
        # q_proj.bias shares part of that: some of its M-RoPE channels get a near-zero gradient too, and with the
        # fused chunked loss head (another summation order than the single-process reference) the trainable-merger
        # layout lands just above 1e-5 on it while its losses agree to ~1e-7.
        bound = 2e-5 if name == "mp4_kv_replicated" else 1e-5
        if key.endswith("k_proj.bias"):
            bound = 1e-2
        elif key.endswith("q_proj.bias"):
            bound = 1e-4
        assert err < bound, f"{name} {key}: relative error {err:.2e}"
    if run["train_merger"]:
        assert any(k.startswith("visual.merger.") for k in run["params"])


@pytest.mark.parametrize("name", ALL)
def test_frozen_vision_untouched_and_stateless(name, launched):
    for res in launched[name]["ranks"].values():
        assert res["frozen_identical"] and res["frozen_dense"] and res["frozen_with_state"] == []


# Measured Paddle 3.3.1 behaviour: the embedding's weight gradient arrives already all-reduced (Replicate), and
# ShardingStage2's grad hook only shards Partial gradients, so stage 2 keeps that one gradient whole.
KNOWN_FULL_GRADS = {("sharding2", "model.embed_tokens.weight")}


@pytest.mark.parametrize("name", ALL)
def test_memory_report_equals_allocated_and_ideal(name, launched):
    for rank, res in launched[name]["ranks"].items():
        total = res["memory"]["total"]
        for kind in ("param", "grad", "optimizer"):
            assert total[kind] == res["direct"][kind], f"{name} rank {rank} {kind}"
        for param, row in res["memory"]["params"].items():
            for kind in ("param", "grad", "optimizer"):
                factor = 2 if kind == "grad" and (name, param) in KNOWN_FULL_GRADS else 1
                assert row[kind] == factor * row[f"ideal_{kind}"], f"{name} rank {rank} {param} {kind}"


def test_mp2_holds_half_of_each_sharded_matrix(launched):
    from placements.qwen2_vl import parameter_shapes
    from parallel_cases import tiny_config

    shapes = parameter_shapes(tiny_config())
    local = launched["mp2"]["ranks"][0]["local_shapes"]
    for name in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                 "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"):
        full = f"model.layers.1.{name}"
        assert np.prod(local[full]) * 2 == np.prod(shapes[full]), full
    assert local["model.embed_tokens.weight"] == [151936 // 2, 128]
    mem = launched["mp2"]["ranks"][0]["memory"]["params"]["model.layers.0.mlp.up_proj.weight"]
    assert mem["param"] == 128 * 256 * 4 // 2


def test_sharding1_holds_half_the_optimizer_state(launched):
    dp = launched["dp2"]["ranks"][0]["memory"]["total"]
    for res in launched["sharding1"]["ranks"].values():
        total = res["memory"]["total"]
        # moments halve exactly; each parameter keeps two replicated [1] beta-power accumulators
        betas = 2 * 4 * sum(1 for r in res["memory"]["params"].values() if r["optimizer"])
        assert total["optimizer"] - betas == (dp["optimizer"] - betas) // 2
        assert total["param"] == dp["param"]


def test_kv_replicated_under_mp4(launched):
    placements = launched["mp4_kv_replicated"]["ranks"][0]["placements"]
    assert placements["model.layers.0.self_attn.k_proj.weight"] == "[Replicate(), Replicate()]"
    assert placements["model.layers.0.self_attn.q_proj.weight"] == "[Replicate(), Shard(dim=1)]"


@pytest.mark.parametrize("degrees, expected", [
    ({"tensor_parallel_degree": 3}, ["num_key_value_heads=2 and tensor_parallel_degree=3", "world size 2"]),
    ({"data_parallel_degree": 3}, ["world size 2 != data_parallel_degree 3"]),
])
def test_bad_degrees_fail_before_work(tmp_path, degrees, expected):
    run = run_workers(WORKER, 2, tmp_path, ["--bad-degrees", json.dumps(degrees)], timeout=300)
    assert run.returncode != 0
    assert run.results, run.logs()
    for res in run.results.values():
        assert res["initialized"] is False
        for text in expected:
            assert text in res["error"]
