"""Issue #31 point 5: `qwen2vl-ap eval --temperature` samples through `generate`'s seeded sampler, so a seeded run
is reproducible (the same predictions twice) and differs from the greedy answers. One process, tiny model."""
from __future__ import annotations

import json
from pathlib import Path

from tiny_model import save_tiny_model

from autoparallel.data.synthetic import eval_meta_path, make_synthetic_dataset
from launch.evaluate import eval_main


def _predictions(out: Path) -> list[str]:
    return [json.loads(line)["prediction"] for line in (out / "predictions.jsonl").read_text().splitlines()]


def test_seeded_sampling_is_reproducible_and_differs_from_greedy(tmp_path):
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
