"""Issue #31 `qwen2vl-ap eval` end to end on a trained tiny checkpoint (one 1-process training launch, two
2-process eval launches): checkpoint-N read directly equals its merge-ckpt output, greedy predictions equal
`infer`'s for the same prompts, data parallel over 2 processes equals one process, and so does tensor parallel
over 2 processes reading only its slices of the checkpoint."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cli_runs import FAST, sft

from autoparallel.data.synthetic import eval_meta_path, eval_questions
from ckpt_tools.merge import merge_dist_checkpoint
from launch.evaluate import eval_main
from launch.infer import infer_main

REPO = Path(__file__).resolve().parents[2]
STEPS = 4
EVAL = ["--max_samples", "6", "--batch_size", "4", "--max_new_tokens", "4",
        "--metrics", "exact_match,anls,edit_distance,rouge_l"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    run = sft(root / "run", ["--nproc_per_node", "1", "--synthetic_data_dir", str(root / "data"),
                             "--max_steps", str(STEPS), "--save_steps", str(STEPS), *FAST])
    run.assert_ok()
    ckpt = root / "run" / f"checkpoint-{STEPS}"
    merge_dist_checkpoint(str(ckpt), str(root / "merged"), progress=False)
    return root, ckpt


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


def test_checkpoint_n_equals_merged_and_greedy_equals_infer(trained, tmp_path, capsys):
    root, ckpt = trained
    meta = eval_meta_path(str(root / "data"))
    assert eval_main(["--model", str(ckpt), "--meta_path", meta, "--output_dir", str(tmp_path / "ckpt"), *EVAL]) == 0
    assert eval_main(["--model", str(root / "merged"), "--meta_path", meta, "--output_dir", str(tmp_path / "merged"),
                      *EVAL]) == 0
    from_ckpt, from_merged = _rows(tmp_path / "ckpt"), _rows(tmp_path / "merged")
    assert [r["prediction"] for r in from_ckpt] == [r["prediction"] for r in from_merged]
    metrics = json.loads((tmp_path / "ckpt" / "metrics.json").read_text())
    assert metrics == json.loads((tmp_path / "merged" / "metrics.json").read_text())
    assert set(metrics) == {"exact_match", "anls", "edit_distance", "rouge_l"}
    assert all(0.0 <= v <= 1.0 for v in metrics.values())

    questions = eval_questions(str(root / "data"))[:6]
    assert [r["reference"] for r in from_ckpt] == [q["answer"] for q in questions]
    assert [r["prompt"] for r in from_ckpt] == [q["question"] for q in questions]
    # the per-sample scores average to metrics.json
    assert metrics["edit_distance"] == pytest.approx(sum(r["scores"]["edit_distance"] for r in from_ckpt) / 6)

    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(json.dumps({"id": i, "prompt": q["question"], "images": q["images"]}) + "\n"
                                for i, q in enumerate(questions)))
    capsys.readouterr()
    assert infer_main(["--model", str(root / "merged"), "--input", str(requests), "--output",
                       str(tmp_path / "answers.jsonl"), "--batch_size", "4", "--max_new_tokens", "4"]) == 0
    answers = [json.loads(line)["answer"] for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert answers == [r["prediction"] for r in from_ckpt]
    print(f"[eval] checkpoint-{STEPS} == merged == infer: {answers[:3]}, metrics {metrics}")


def test_data_parallel_two_processes_equals_one(trained, tmp_path):
    root, ckpt = trained
    meta = eval_meta_path(str(root / "data"))
    args = ["--model", str(ckpt), "--meta_path", meta, *EVAL, "--batch_size", "2"]
    assert eval_main([*args, "--output_dir", str(tmp_path / "one")]) == 0
    proc = subprocess.run([sys.executable, "-m", "launch.cli", "eval", *args, "--output_dir", str(tmp_path / "dp2"),
                           "--nproc_per_node", "2", "--log_dir", str(tmp_path / "logs")],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, dp2 = _rows(tmp_path / "one"), _rows(tmp_path / "dp2")
    assert [r["id"] for r in dp2] == list(range(6))
    assert dp2 == one
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert not (tmp_path / "dp2" / ".eval-parts").exists()
    # each rank generated its share: rank 1's log shows its progress, not all 6 samples
    assert (tmp_path / "logs" / "workerlog.1").is_file()


@pytest.mark.parametrize("nproc", [2, 4], ids=["mp2", "dp2xmp2"])
def test_tensor_parallel_checkpoint_n_equals_one_process_and_each_rank_holds_its_slices(trained, tmp_path, nproc):
    """Issue #31 points 2-3: `eval --tensor_parallel_degree 2` of a checkpoint-N (saved by a 1-process run, so
    loading reshards it) gives one process's predictions and metrics, alone (mp2) and as 2 data-parallel groups
    (dp2 x mp2); each rank holds less than the whole model (the lazy model is split before `dist.load_state_dict`
    fills only this rank's pieces)."""
    root, ckpt = trained
    args = ["--model", str(ckpt), "--meta_path", eval_meta_path(str(root / "data")), *EVAL, "--batch_size", "2"]
    assert eval_main([*args, "--output_dir", str(tmp_path / "one")]) == 0
    proc = subprocess.run([sys.executable, "-m", "launch.cli", "eval", *args, "--output_dir", str(tmp_path / "mp2"),
                           "--tensor_parallel_degree", "2", "--nproc_per_node", str(nproc),
                           "--log_dir", str(tmp_path / "logs")],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _rows(tmp_path / "mp2") == _rows(tmp_path / "one")
    assert json.loads((tmp_path / "mp2" / "metrics.json").read_text()) == \
        json.loads((tmp_path / "one" / "metrics.json").read_text())
    for rank in range(nproc):
        log = (tmp_path / "logs" / f"workerlog.{rank}").read_text()
        held, total = map(int, re.search(rf"rank {rank} holds (\d+) of the model's (\d+) bytes", log).groups())
        assert held < total, (rank, held, total)


def test_training_eval_keeps_best_and_stops_early_and_resumes_its_state(tmp_path):
    """eval_generate on the dp2 training ranks: eval_exact_match in metrics.jsonl at every eval step; with the
    metric stalled (learning rate 0) the run stops after `early_stopping_patience` evaluations, `best` points at
    the first evaluated step and survives save_total_limit=1; a resumed run continues the patience count (it
    stops at its first evaluation instead of running two more). The evaluation data is the split val_size holds
    out of the training records (no eval_meta_path)."""
    from autoparallel.engine.metrics import read_metrics

    out = tmp_path / "run"
    args = ["--nproc_per_node", "2", "--synthetic_data_dir", str(tmp_path / "data"), "--max_steps", "10",
            "--per_device_train_batch_size", "2", "--max_seq_length", "128", "--learning_rate", "0",
            "--warmup_steps", "0", "--dataloader_num_workers", "0", "--evaluation_strategy", "steps",
            "--eval_steps", "1", "--save_steps", "1", "--save_total_limit", "1", "--eval_generate", "true",
            "--eval_max_samples", "4", "--eval_max_new_tokens", "3", "--per_device_eval_batch_size", "4",
            "--metric_for_best_model", "exact_match", "--early_stopping_patience", "2", "--val_size", "8"]
    sft(out, args).assert_ok()
    saved = yaml.safe_load((out / "run_config.yaml").read_text())
    assert saved["val_size"] == 8 and saved.get("eval_meta_path") is None
    evals = [r for r in read_metrics(out / "metrics.jsonl") if "eval_exact_match" in r]
    assert [r["step"] for r in evals] == [1, 2, 3]
    assert all(r["eval_exact_match"] == 0.0 and "eval_loss" in r for r in evals)
    assert (out / "best").is_symlink() and (out / "best").resolve() == (out / "checkpoint-1").resolve()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-3"]
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["early_stopping"]
    assert state == {"best_metric": 0.0, "best_step": 1, "evals_without_improvement": 2}

    sft(out, [*args, "--resume_from_checkpoint", "auto"]).assert_ok()
    evals = [r for r in read_metrics(out / "metrics.jsonl") if "eval_exact_match" in r]
    assert [r["step"] for r in evals] == [1, 2, 3, 4]
    assert (out / "best").resolve() == (out / "checkpoint-1").resolve()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-4"]
