"""Lazy, sharded start-up on 2 processes: each rank's pieces equal the slices of the dense model, for every layout
of the weight files (HF safetensors single/sharded, pdparams single/sharded) and several plans."""
from __future__ import annotations

from pathlib import Path

import pytest
from dist_utils import run_workers_ok
from hf_oracle import tiny_config

from network import weights
from network.modeling_qwen2_vl import Qwen2VLForConditionalGeneration

WORKER = Path(__file__).resolve().parents[1] / "helpers" / "sharded_load_worker.py"


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    import paddle

    paddle.seed(7)
    model = Qwen2VLForConditionalGeneration(tiny_config(tied=False))
    dirs = {}
    for fmt, shard in (("safetensors", None), ("safetensors", 1 << 20), ("paddle", None), ("paddle", 1 << 20)):
        path = tmp_path_factory.mktemp(f"{fmt}{'_sharded' if shard else ''}")
        model.config.save_pretrained(str(path))
        weights.save_weights(model, str(path), format=fmt, max_shard_bytes=shard if shard else None)
        dirs[path.name.rstrip("0123456789")] = str(path)
    return dirs


@pytest.mark.parametrize("layout, files", [
    ("mp2", "safetensors"), ("mp2", "safetensors_sharded"), ("mp2", "paddle"), ("mp2", "paddle_sharded"),
    ("zero1_dp2", "safetensors_sharded"),
])
def test_each_rank_holds_exactly_its_slices(model_dirs, tmp_path, layout, files):
    run = run_workers_ok(WORKER, 2, tmp_path, ["--model", model_dirs[files], "--layout", layout])
    for rank, result in run.results.items():
        assert result["wrong"] == [], (rank, result["wrong"])
        assert result["lazy_before"] == result["params"] and result["lazy_after"] == 0
        if layout == "mp2":
            assert result["sharded"] > 10  # the tensor-parallel plan split most decoder weights
        assert result["logits_diff"] < 1e-4, result
