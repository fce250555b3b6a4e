"""`qwen2vl-ap lora` end to end: adapters (with one on the merger) in every checkpoint and in output_dir, and
a resume on another layout continuing exactly (losses, adapters)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import paddle
import pytest

from network.lora import LORA_CONFIG_NAME, LORA_WEIGHTS_NAME, read_adapter

REPO = Path(__file__).resolve().parents[2]
FAST = ["--per_device_train_batch_size", "2", "--max_seq_length", "128", "--evaluation_strategy", "no",
        "--learning_rate", "1e-2", "--warmup_steps", "0", "--logging_steps", "1", "--save_total_limit", "0",
        "--max_steps", "4", "--save_steps", "2", "--lora_rank", "4", "--lora_alpha", "8",
        "--lora_target_modules", "model.layers.*q_proj.*,model.layers.*o_proj.*,model.layers.*down_proj.*,"
        "visual.merger.mlp.2"]


@pytest.fixture(scope="module")
def meta(tmp_path_factory) -> str:
    from autoparallel.data.synthetic import make_synthetic_dataset

    return str(make_synthetic_dataset(tmp_path_factory.mktemp("data"), n_train=64, n_eval=8, seed=1))


def lora(args: list[str], output_dir: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "launch.cli", "lora", "--output_dir", str(output_dir), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    logs = "".join(p.read_text(errors="replace")[-3000:] for p in sorted((output_dir / "logs").glob("workerlog.*")))
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-3000:]}\n{logs}"


def losses(output_dir: Path) -> dict[int, float]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def test_lora_exports_adapters_and_resumes_exactly_on_another_layout(meta, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    # mp2 on 2 processes (dp derived: 1) with 4 samples per rank, resumed as dp2 with 2: the same global batch.
    lora(["--meta_path", meta, "--tensor_parallel_degree", "2", *FAST, "--per_device_train_batch_size", "4"],
         straight)
    for directory in (straight / "checkpoint-2", straight / "checkpoint-4", straight):
        assert (directory / LORA_CONFIG_NAME).is_file() and (directory / LORA_WEIGHTS_NAME).is_file(), directory
    assert list((straight / "checkpoint-2" / "dist_ckpt").glob("*.metadata"))  # the usual resume state
    final = paddle.load(str(straight / LORA_WEIGHTS_NAME))
    assert sorted(final) == sorted(paddle.load(str(straight / "checkpoint-4" / LORA_WEIGHTS_NAME)))
    config, adapters = read_adapter(straight)
    assert (config["r"], config["scaling"], len(adapters)) == (4, 2.0, 3 * 2 + 1)  # tiny: 2 layers + merger
    assert all(np.abs(b).max() > 0 for _, b, _ in adapters.values())  # every adapter trained, the merger's too

    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    lora(["--meta_path", meta, "--data_parallel_degree", "2", "--resume_from_checkpoint", "auto", *FAST], resumed)
    a, b = losses(straight), losses(resumed)
    assert sorted(b) == [3, 4]
    for step in (3, 4):
        assert abs(a[step] - b[step]) <= 1e-6 * max(1.0, abs(a[step])), (step, a[step], b[step])
    _, again = read_adapter(resumed)
    for name, (a_mat, b_mat, _) in adapters.items():
        np.testing.assert_allclose(again[name][0], a_mat, rtol=0, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(again[name][1], b_mat, rtol=0, atol=1e-6, err_msg=name)
