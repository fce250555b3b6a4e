"""`qwen2vl-ap sft` end to end: launch, metrics, checkpoints, resume (also on another layout), clean errors."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "launch.cli"]
FAST = ["--per_device_train_batch_size", "2", "--max_seq_length", "128", "--evaluation_strategy", "no",
        "--learning_rate", "1e-3", "--warmup_steps", "0", "--logging_steps", "1", "--save_total_limit", "0"]
# Trainable ViT (ms-swift spellings), its blocks recomputed, its own LR.
VIT = ["--freeze_vit", "false", "--freeze_aligner", "false", "--recompute", "true", "--vit_lr", "2e-3"]


@pytest.fixture(scope="module")
def meta(tmp_path_factory) -> str:
    from autoparallel.data.synthetic import make_synthetic_dataset

    return str(make_synthetic_dataset(tmp_path_factory.mktemp("data"), n_train=64, n_eval=8, seed=1))


def sft(args: list[str], env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, **(env or {}))
    proc = subprocess.run([*CLI, "sft", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=full_env)
    return proc


def losses(output_dir: Path) -> dict[int, float]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def merged_weights(checkpoint: Path) -> dict[str, np.ndarray]:
    import paddle.distributed as dist

    state = dist.load_merged_state_dict(str(checkpoint / "dist_ckpt"), safetensors=True)
    return {k: v.numpy() for k, v in state.items() if "moment" not in k and "pow_acc" not in k}


def assert_ok(proc: subprocess.CompletedProcess, output_dir: Path) -> None:
    logs = "".join(p.read_text(errors="replace")[-3000:] for p in sorted((output_dir / "logs").glob("workerlog.*")))
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-3000:]}\n{logs}"


def test_sft_writes_metrics_checkpoint_and_loss_falls(meta, tmp_path):
    out = tmp_path / "run"
    proc = sft(["--meta_path", meta, "--output_dir", str(out), "--data_parallel_degree", "2", "--max_steps", "8",
                "--save_steps", "4", *FAST])
    assert_ok(proc, out)
    record = losses(out)
    assert sorted(record) == list(range(1, 9))
    assert np.mean([record[7], record[8]]) < np.mean([record[1], record[2]]) - 0.5, record
    for step in (4, 8):
        checkpoint = out / f"checkpoint-{step}"
        assert (checkpoint / "trainer_state.json").is_file() and list((checkpoint / "dist_ckpt").glob("*.metadata"))
        assert (checkpoint / "config.json").is_file() and (checkpoint / "tokenizer.json").is_file()
    fields = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert {"step", "loss", "lr", "grad_norm", "tokens", "samples", "step_time_s"} <= set(fields)
    assert (out / "loss.png").stat().st_size > 0 and (out / "plan.txt").is_file()
    # plan.txt carries the same report `qwen2vl-ap plan` prints for this run config (one planner, one byte rule).
    plan = subprocess.run([*CLI, "plan", "--config", str(out / "run_config.yaml"), "--device", "cpu",
                           "--nproc_per_node", "2"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert plan.returncode == 0, plan.stderr
    assert plan.stdout.strip() in (out / "plan.txt").read_text()
    # A sharded pdparams merge (PaddleMIX layout + PaddleNLP-style index) is a model directory `infer` loads.
    from ckpt_tools.merge import merge_dist_checkpoint
    from launch.infer import infer_main

    merged = tmp_path / "merged_pd"
    summary = merge_dist_checkpoint(str(out / "checkpoint-8"), str(merged), format="paddle", shard_size=20 * 10**6,
                                    progress=False)
    assert "model_state.pdparams.index.json" in summary["files"] and len(summary["files"]) > 2
    assert infer_main(["--model", str(merged), "--prompt", "hello", "--max_new_tokens", "2", "--no-stream"]) == 0


@pytest.mark.parametrize("first, second", [
    (["--data_parallel_degree", "2"], ["--data_parallel_degree", "2"]),
    (["--tensor_parallel_degree", "2", "--data_parallel_degree", "1", "--per_device_train_batch_size", "4"],
     ["--data_parallel_degree", "2"]),
    (["--tensor_parallel_degree", "2", "--data_parallel_degree", "1", "--per_device_train_batch_size", "4", *VIT],
     ["--data_parallel_degree", "1", "--sharding", "stage2", "--sharding_parallel_degree", "2", *VIT]),
    (["--data_parallel_degree", "2", "--packing", "true"], ["--tensor_parallel_degree", "2", "--padding_free", "true",
                                                           "--per_device_train_batch_size", "4"]),
], ids=["dp2->dp2", "mp2->dp2", "vit:mp2->sharding2", "packed:dp2->mp2"])
def test_resume_continues_exactly(meta, tmp_path, first, second):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert_ok(sft(["--meta_path", meta, "--output_dir", str(straight), "--max_steps", "6", "--save_steps", "3",
                   *FAST, *first]), straight)
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-3", resumed / "checkpoint-3")
    assert_ok(sft(["--meta_path", meta, "--output_dir", str(resumed), "--max_steps", "6", "--save_steps", "3",
                   "--resume_from_checkpoint", "auto", *FAST, *second]), resumed)
    a, b = losses(straight), losses(resumed)
    assert sorted(b) == [4, 5, 6]
    for step in (4, 5, 6):
        assert abs(a[step] - b[step]) <= 1e-6 * max(1.0, abs(a[step])), (step, a[step], b[step])
    wa, wb = merged_weights(straight / "checkpoint-6"), merged_weights(resumed / "checkpoint-6")
    model_keys = [k for k in wa if k.startswith(("model.", "visual.", "lm_head"))]
    assert model_keys
    for key in model_keys:
        np.testing.assert_allclose(wb[key], wa[key], rtol=0, atol=1e-6, err_msg=key)
    if "--freeze_vit" in first:  # the ViT trained before and after the resume, and its weights are checkpointed
        at_resume = merged_weights(straight / "checkpoint-3")
        vit_keys = [k for k in model_keys if k.startswith(("visual.blocks.", "visual.patch_embed."))]
        assert vit_keys and all(not np.array_equal(at_resume[k], wb[k]) for k in vit_keys)


def test_packed_training_equals_padded_training(meta, tmp_path):
    """`packing: true` on dp2: the same samples per step in packed rows give the losses of padded batches (the
    loss is the token mean over the global batch), on fewer computed positions; the fill ratio is in metrics."""
    runs = {}
    for name, extra in (("padded", []), ("packed", ["--packing", "true"])):
        out = tmp_path / name
        assert_ok(sft(["--meta_path", meta, "--output_dir", str(out), "--max_steps", "3", "--save_steps", "0",
                       "--data_parallel_degree", "2", *FAST, "--per_device_train_batch_size", "4", *extra]), out)
        runs[name] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    padded, packed = ([r for r in runs[n] if "loss" in r] for n in ("padded", "packed"))
    assert [r["step"] for r in packed] == [1, 2, 3]
    for a, b in zip(padded, packed):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"]), (a, b)
        assert a["tokens"] == b["tokens"] and 0 < b["packing_fill"] <= 1 and "packing_fill" not in a


def test_interrupted_save_keeps_previous_checkpoint(meta, tmp_path):
    out = tmp_path / "run"
    proc = sft(["--meta_path", meta, "--output_dir", str(out), "--data_parallel_degree", "2", "--max_steps", "6",
                "--save_steps", "3", *FAST], env={"QWEN2VL_AP_FAULT": "rank=1,step=6,at=save"})
    assert proc.returncode != 0
    assert (out / ".tmp-checkpoint-6").is_dir() and not (out / "checkpoint-6").exists()
    from autoparallel.engine.checkpoint import resolve_resume_path

    assert resolve_resume_path("auto", str(out)) == out / "checkpoint-3"
    assert_ok(sft(["--meta_path", meta, "--output_dir", str(out), "--data_parallel_degree", "2", "--max_steps", "6",
                   "--save_steps", "3", "--resume_from_checkpoint", "auto", *FAST]), out)
    assert (out / "checkpoint-6" / "trainer_state.json").is_file()
    assert json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())["global_step"] == 6


@pytest.mark.parametrize("args, message", [
    (["--learning_rat", "1e-5"], "unknown config key 'learning_rat'"),
    (["--meta_path", "/nonexistent/meta.json"], "meta_path='/nonexistent/meta.json': file not found"),
    (["--tensor_parallel_degree", "3", "--nproc_per_node", "3"], "num_key_value_heads=2"),
    (["--data_parallel_degree", "2", "--nproc_per_node", "3"], "world size 3"),
    (["--max_steps", "many"], "max_steps='many'"),
])
def test_bad_config_fails_before_workers(meta, tmp_path, args, message):
    out = tmp_path / "run"
    proc = sft(["--meta_path", meta, "--output_dir", str(out), *args], timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr, proc.stderr
    assert not (out / "logs").exists()  # no worker was started


def test_pipeline_and_sequence_parallel_match_one_process(meta, tmp_path):
    """pp2 (FThenB over 2 micro-batches) and mp2 + sequence parallel through the CLI: same losses as one
    process; the pp2 checkpoint (stage-local shards) merges to the single-process weights."""
    args = ["--meta_path", meta, "--max_steps", "3", "--save_steps", "3", "--gradient_accumulation_steps", "2",
            *FAST]
    runs = {"single": ["--data_parallel_degree", "1", "--nproc_per_node", "1"],
            "pp2": ["--data_parallel_degree", "1", "--pipeline_parallel_degree", "2"],
            "mp2_sp": ["--data_parallel_degree", "1", "--tensor_parallel_degree", "2", "--sequence_parallel", "true"]}
    for name, extra in runs.items():
        assert_ok(sft([*args, "--output_dir", str(tmp_path / name), *extra]), tmp_path / name)
    reference = losses(tmp_path / "single")
    for name in ("pp2", "mp2_sp"):
        for step, value in losses(tmp_path / name).items():
            assert abs(value - reference[step]) <= 1e-5 * abs(reference[step]), (name, step, value)
    from ckpt_tools.merge import merge_dist_checkpoint
    from network.weights import iter_checkpoint

    merged = {}
    for name in ("single", "pp2"):
        merge_dist_checkpoint(str(tmp_path / name / "checkpoint-3"), str(tmp_path / f"{name}_merged"),
                              format="safetensors", progress=False)
        merged[name] = {key: array for key, array, _ in iter_checkpoint(str(tmp_path / f"{name}_merged"))}
    assert merged["pp2"].keys() == merged["single"].keys()
    for key, value in merged["single"].items():
        np.testing.assert_allclose(np.asarray(merged["pp2"][key], np.float32), np.asarray(value, np.float32),
                                   rtol=0, atol=2e-5, err_msg=key)
