"""`qwen2vl-ap eval` options in one process (tiny model): seeded sampling (issue #31 point 5) and the checks of
the tensor-parallel options that run in the parent before any process starts (point 2)."""
from __future__ import annotations

import json
from pathlib import Path

from tiny_model import save_tiny_model

from autoparallel.data.synthetic import eval_meta_path, make_synthetic_dataset
from launch.evaluate import eval_main


def _predictions(out: Path) -> list[str]:
    return [json.loads(line)["prediction"] for line in (out / "predictions.jsonl").read_text().splitlines()]


def test_seeded_sampling_is_reproducible_and_differs_from_greedy(tmp_path):
    """`--temperature` samples through `generate`'s seeded sampler: the same predictions twice, not greedy's."""
    save_tiny_model(tmp_path / "model")
    make_synthetic_dataset(str(tmp_path / "data"), n_train=4, n_eval=4)
    args = ["--model", str(tmp_path / "model"), "--meta_path", eval_meta_path(str(tmp_path / "data")),
            "--max_samples", "4", "--batch_size", "4", "--max_new_tokens", "6"]
    sampled = ["--temperature", "1.0", "--top_k", "50", "--seed", "7"]
    assert eval_main([*args, "--output_dir", str(tmp_path / "greedy")]) == 0
    assert eval_main([*args, *sampled, "--output_dir", str(tmp_path / "a")]) == 0
    assert eval_main([*args, *sampled, "--output_dir", str(tmp_path / "b")]) == 0
    greedy, first, second = (_predictions(tmp_path / d) for d in ("greedy", "a", "b"))
    assert first == second
    assert first != greedy
    assert len(first) == 4 and all(isinstance(p, str) for p in first)


def test_tensor_parallel_options_fail_in_the_parent_with_one_line(tmp_path, capsys):
    """Processes that do not split into tensor-parallel groups, and a degree that does not divide the model's
    heads, are refused before launching."""
    save_tiny_model(tmp_path / "model")
    capsys.readouterr()  # the tokenizer's save messages
    args = ["--model", str(tmp_path / "model"), "--meta_path", str(tmp_path / "meta.json"),
            "--output_dir", str(tmp_path / "out")]
    assert eval_main([*args, "--nproc_per_node", "3", "--tensor_parallel_degree", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "qwen2vl-ap eval: error: --nproc_per_node 3 is not a multiple of --tensor_parallel_degree 2"
    assert eval_main([*args, "--tensor_parallel_degree", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qwen2vl-ap eval: error: ") and "3" in err[0], err
    assert not (tmp_path / "out").exists()
