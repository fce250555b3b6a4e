"""The engine started from a checkpoint directory (lazy model, plan, each rank reads its slices) trains exactly like
the same weights built eagerly from the preset: pipeline stages (each reads only its layers) and LoRA under mp2."""
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

REPO = Path(__file__).resolve().parents[2]
SEED = 42
FAST = ["--per_device_train_batch_size", "2", "--max_seq_length", "128", "--evaluation_strategy", "no",
        "--learning_rate", "1e-3", "--warmup_steps", "0", "--logging_steps", "1", "--save_total_limit", "0",
        "--max_steps", "2", "--save_steps", "0", "--seed", str(SEED)]
LORA = ["--lora_rank", "4", "--lora_alpha", "8", "--lora_target_modules", "model.layers.*q_proj.*,model.layers.*down_proj.*"]


@pytest.fixture(scope="module")
def meta(tmp_path_factory) -> str:
    from autoparallel.data.synthetic import make_synthetic_dataset

    return str(make_synthetic_dataset(tmp_path_factory.mktemp("data"), n_train=32, n_eval=4, seed=1))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    """The preset's weights (same seed, same init order as the engine) saved as an HF checkpoint directory."""
    from autoparallel.config import model_config
    from network.modeling_qwen2_vl import Qwen2VLForConditionalGeneration

    paddle.seed(SEED)
    path = tmp_path_factory.mktemp("tiny_ckpt")
    Qwen2VLForConditionalGeneration(model_config("tiny")).save_pretrained(str(path))
    return str(path)


def run(command: str, args: list[str], output_dir: Path) -> list[float]:
    proc = subprocess.run([sys.executable, "-m", "launch.cli", command, "--output_dir", str(output_dir), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=900, env=dict(os.environ))
    logs = "".join(p.read_text(errors="replace")[-3000:] for p in sorted((output_dir / "logs").glob("workerlog.*")))
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-3000:]}\n{logs}"
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]


@pytest.mark.parametrize("command, layout", [
    ("sft", ["--pipeline_parallel_degree", "2", "--gradient_accumulation_steps", "2"]),
    ("lora", ["--tensor_parallel_degree", "2", *LORA]),
], ids=["sft-pp2", "lora-mp2"])
def test_checkpoint_start_trains_like_the_preset(meta, tiny_dir, tmp_path, command, layout):
    args = ["--meta_path", meta, *layout, *FAST]
    eager = run(command, ["--model_name_or_path", "tiny", *args], tmp_path / "preset")
    lazy = run(command, ["--model_name_or_path", tiny_dir, *args], tmp_path / "checkpoint")
    # Same weights: the first loss is bit-identical. Later steps agree to float noise (pp2: ~3e-5 relative at
    # step 2, not explained yet; see the #16 report).
    assert len(lazy) == 2 and lazy[0] == eager[0]
    assert lazy[1] == pytest.approx(eager[1], rel=1e-4)
    log = "".join(p.read_text(errors="replace") for p in (tmp_path / "checkpoint" / "logs").glob("workerlog.*"))
    assert "loaded this rank's pieces" in log


def test_lora_on_a_checkpoint_saves_adapters_only_resumes_and_merges(meta, tiny_dir, tmp_path, caplog):
    """A LoRA run on a base read from disk checkpoints its adapters and their optimizer state only; a resume on
    another layout reads the base again and continues the run; merge-lora without --base finds the base through
    lora_config.json; merge-ckpt says to use merge-lora."""
    from ckpt_tools.distckpt import DistCheckpoint
    from ckpt_tools.lora_merge import merge_lora
    from ckpt_tools.merge import merge_dist_checkpoint
    from network.formats import CheckpointError
    from network.lora import LORA_CONFIG_NAME, LORA_SUFFIXES
    from network.modeling_qwen2_vl import Qwen2VLForConditionalGeneration
    from network.weights import index_weights, weights_fingerprint

    steps = ["--max_steps", "4", "--save_steps", "2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    args = ["--meta_path", meta, "--model_name_or_path", tiny_dir, *LORA, *FAST]
    a = run("lora", [*args, "--tensor_parallel_degree", "2", "--per_device_train_batch_size", "4", *steps], straight)
    with DistCheckpoint(str(straight / "checkpoint-2")) as ck:
        model_keys, optimizer_keys = ck.split_keys()
        assert model_keys and all(k.endswith(LORA_SUFFIXES) for k in model_keys)
        assert len(optimizer_keys) == 4 * len(model_keys)  # AdamW: 2 moments + 2 beta powers per adapter
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    # dp2 x 2 per device: the global batch of mp2 x 4
    b = run("lora", [*args, "--data_parallel_degree", "2", *steps, "--resume_from_checkpoint", "auto"], resumed)
    assert len(a) == 4 and len(b) == 2
    for x, y in zip(a[2:], b):
        assert y == pytest.approx(x, rel=1e-5)
    # The adapters record their base; a resume on other base weights is refused, the checkpoint kept.
    lora_config = json.loads((straight / "checkpoint-2" / LORA_CONFIG_NAME).read_text())
    assert lora_config["base_model_fingerprint"] == weights_fingerprint(tiny_dir)
    other = tmp_path / "other_base"
    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_dir)
    with paddle.no_grad():
        dict(model.named_parameters())["model.layers.1.mlp.up_proj.weight"][0] += 1.0
    model.save_pretrained(str(other))
    (tmp_path / "refused").mkdir()
    shutil.copytree(straight / "checkpoint-2", tmp_path / "refused" / "checkpoint-2")
    proc = subprocess.run([sys.executable, "-m", "launch.cli", "lora", *args, "--model_name_or_path", str(other),
                           "--data_parallel_degree", "2", *steps, "--resume_from_checkpoint", "auto",
                           "--output_dir", str(tmp_path / "refused")],
                          cwd=REPO, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert proc.returncode != 0
    assert f"resume_from_checkpoint: the weights in {other} are not the base the adapter was trained on" in proc.stderr
    assert "resume with the base the run started from" in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(p.name for p in (tmp_path / "refused").glob("checkpoint-*")) == ["checkpoint-2"]

    merged = {}
    # checkpoint-4 of both runs, with and without --base, and the final adapter files in output_dir
    for name, base, lora in (("straight", None, straight / "checkpoint-4"), ("resumed", None, resumed / "checkpoint-4"),
                             ("given", tiny_dir, straight / "checkpoint-4"), ("files", None, straight)):
        summary = merge_lora(base, str(lora), str(tmp_path / f"merged_{name}"), progress=False)
        assert summary["merged"] > 0
        merged[name] = {s.name: s.read() for s in index_weights(str(tmp_path / f"merged_{name}"))}
    base_weights = {s.name: s.read() for s in index_weights(tiny_dir)}
    assert sorted(merged["straight"]) == sorted(base_weights)
    changed = [k for k in base_weights if not np.array_equal(merged["straight"][k], base_weights[k])]
    assert changed and all("q_proj" in k or "down_proj" in k for k in changed)
    for key, value in merged["straight"].items():
        np.testing.assert_array_equal(merged["given"][key], value, err_msg=key)
        np.testing.assert_allclose(merged["files"][key], value, rtol=0, atol=1e-6, err_msg=key)
        np.testing.assert_allclose(merged["resumed"][key], value, rtol=0, atol=1e-6, err_msg=key)
    with pytest.raises(CheckpointError, match="holds LoRA adapters only .*`qwen2vl-ap merge-lora --lora"):
        merge_dist_checkpoint(str(straight / "checkpoint-4"), str(tmp_path / "merge_ckpt"), progress=False)
    assert not (tmp_path / "merge_ckpt").exists()
    # The recorded base changed on disk: merge-lora without --base refuses, an explicit --base is warned about.
    lora_config = json.loads((resumed / "checkpoint-4" / LORA_CONFIG_NAME).read_text())
    (resumed / "checkpoint-4" / LORA_CONFIG_NAME).write_text(
        json.dumps({**lora_config, "base_model_name_or_path": str(other)}))
    with pytest.raises(CheckpointError, match=f"the weights in {other} are not the base the adapter was trained"):
        merge_lora(None, str(resumed / "checkpoint-4"), str(tmp_path / "merged_moved"), progress=False)
    assert not (tmp_path / "merged_moved").exists()
    merge_lora(str(other), str(resumed / "checkpoint-4"), str(tmp_path / "merged_other"), progress=False)
    assert "are not the base the adapter was trained on" in caplog.text and "merging onto --base" in caplog.text
