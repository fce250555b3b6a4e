"""The synthetic demo dataset: loadable, deterministic, idempotent, with a held-out split and gold answers."""
import json
import os

import numpy as np
import pytest

from autoparallel.data import DataConfig, SFTDataset
from autoparallel.data.synthetic import (
    COLOURS,
    SHAPES,
    eval_meta_path,
    eval_questions,
    make_synthetic_dataset,
)
from autoparallel.engine.eval_metrics import exact_match


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("syn") / "data")
    return out, make_synthetic_dataset(out, n_train=40, n_eval=12, seed=7)


def test_writes_a_loadable_dataset_with_all_question_kinds(generated):
    out, meta = generated
    ds = SFTDataset(DataConfig(meta_path=meta, max_seq_length=128))
    assert len(ds) == 40
    kinds = {json.load(open(os.path.join(out, "train.json")))[i]["kind"] for i in range(40)}
    assert kinds == {"colour", "shape", "count", "which"}
    answers = set(COLOURS) | set(SHAPES) | {"1", "2", "3", "4", "first", "second"}
    for i in range(len(ds)):
        s = ds[i]
        answer = ds.processor.decode(s["input_ids"][s["labels"] != -100][:-1])  # drop <|im_end|>
        assert answer in answers and s["num_tokens"] <= 64
        assert s["image_grid_thw"].shape[0] in (1, 2) and set(np.prod(s["image_grid_thw"], 1)) <= {16, 64}
    assert len(SFTDataset(DataConfig(meta_path=eval_meta_path(out)))) == 12


def test_is_deterministic_and_idempotent(generated, tmp_path):
    out, meta = generated
    stamp = os.path.getmtime(os.path.join(out, "train.json"))
    assert make_synthetic_dataset(out, n_train=40, n_eval=12, seed=7) == meta
    assert os.path.getmtime(os.path.join(out, "train.json")) == stamp  # reused, not rewritten
    other = make_synthetic_dataset(str(tmp_path / "again"), n_train=40, n_eval=12, seed=7)
    assert open(other.replace("meta_train", "train")).read() == open(meta.replace("meta_train", "train")).read()
    with open(os.path.join(out, "images", "train_00003_0.png"), "rb") as a, \
            open(os.path.join(tmp_path, "again", "images", "train_00003_0.png"), "rb") as b:
        assert a.read() == b.read()
    make_synthetic_dataset(out, n_train=10, n_eval=2, seed=7)  # new parameters regenerate in place
    assert len(json.load(open(os.path.join(out, "train.json")))) == 10


def test_eval_questions_have_gold_answers(tmp_path):
    out = str(tmp_path / "d")
    make_synthetic_dataset(out, n_train=4, n_eval=6, seed=0)
    questions = eval_questions(out)
    assert len(questions) == 6
    for q in questions:
        assert q["question"].count("<image>") == len(q["images"]) and all(map(os.path.isfile, q["images"]))
        assert q["answer"] == q["answer"].strip().lower() and exact_match(f" {q['answer'].capitalize()}.", q["answer"])
