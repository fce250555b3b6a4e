"""Issue #31 metrics against their reference definitions on hand-built prediction/reference sets."""
from __future__ import annotations

import pytest

from autoparallel.engine import eval_metrics as m


def _anls_reference(prediction: str, answers: list[str]) -> float:
    """The DocVQA formula written out with a plain dynamic-programming Levenshtein (no rapidfuzz)."""
    def lev(a: str, b: str) -> int:
        row = list(range(len(b) + 1))
        for i, ca in enumerate(a, 1):
            prev, row[0] = row[0], i
            for j, cb in enumerate(b, 1):
                prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
        return row[-1]

    best = 0.0
    for answer in answers:
        gt, det = " ".join(answer.strip().lower().split()), " ".join(prediction.strip().lower().split())
        length = max(len(gt), len(det))
        best = max(best, 1.0 if length == 0 else 1 - lev(gt, det) / length)
    return best if best >= 0.5 else 0.0


def test_exact_match_normalises_case_punctuation_whitespace_and_takes_any_reference():
    assert m.exact_match("  The  Red. ", "the red") == 1.0
    assert m.exact_match("red", "blue") == 0.0
    assert m.exact_match("blue!", ["red", "Blue"]) == 1.0
    assert m.exact_match("", "") == 1.0
    assert m.exact_match("red shape", "red") == 0.0


@pytest.mark.parametrize("prediction, reference, expected", [
    ("12.5", "12", 1.0),          # |12.5 - 12| / 12 = 4.2%
    ("104", "100", 1.0),          # 4% off
    ("106", "100", 0.0),          # 6% off
    ("0.3", "30%", 1.0),          # percentage reference -> 0.30
    ("31%", "30%", 1.0),          # 0.31 vs 0.30: 3.3%
    ("30", "30%", 0.0),           # 30 vs 0.30: not a percentage
    ("12 kg", "12 kg", 1.0),      # units do not parse: string match (reference code)
    ("12", "12 kg", 0.0),         # ... so a bare number does not match a number with a unit
    ("12 KG", "12 kg", 1.0),      # string match is case-insensitive
    ("0", "0", 1.0),              # zero reference: string match
    ("0.0", "0", 0.0),
    ("Yes", "yes", 1.0),
    ("", "", 1.0),
])
def test_relaxed_accuracy_follows_chartqa_relaxed_correctness(prediction, reference, expected):
    assert m.relaxed_accuracy(prediction, reference) == expected


def test_relaxed_accuracy_multi_reference():
    assert m.relaxed_accuracy("51", ["abc", "50"]) == 1.0
    assert m.relaxed_accuracy("60", ["abc", "50"]) == 0.0


@pytest.mark.parametrize("prediction, answers", [
    ("Hello World", ["hello   world"]),     # case and whitespace are normalised
    ("helo world", ["hello world"]),        # one edit
    ("abcdef", ["abcxyz"]),                 # 0.5: kept
    ("abcdefg", ["abxyzuv"]),               # below 0.5: zeroed
    ("", [""]),                             # both empty: 1
    ("", ["abc"]),                          # empty prediction: 0
    ("abc", [""]),
    ("ACME corp", ["acme inc", "ACME Corp."]),  # the best reference counts
])
def test_anls_equals_docvqa_formula(prediction, answers):
    assert m.anls(prediction, answers) == pytest.approx(_anls_reference(prediction, answers))


def test_anls_known_values():
    assert m.anls("", "") == 1.0
    assert m.anls("Hello World", "hello world") == 1.0
    assert m.anls("abcdefg", "abxyzuv") == 0.0
    assert m.anls("helo world", "hello world") == pytest.approx(1 - 1 / 11)


@pytest.mark.parametrize("prediction, reference, expected", [
    ("B", "B", 1.0),
    ("(B)", "B", 1.0),
    ("B. a red square", "B", 1.0),
    ("The answer is C.", "C", 1.0),
    ("Answer: D", "(D) blue", 1.0),
    ("A", "B", 0.0),
    ("Blue", "B", 0.0),        # a word starting with B is not option B
    ("I think so", "A", 0.0),  # no option letter at all
    ("I think B", "B", 1.0),   # "I" starts a sentence: not option I
    ("A red square", "A", 0.0),
    ("The red one, (C).", "C", 1.0),
    ("", "A", 0.0),
])
def test_mc_accuracy_extracts_option_letters(prediction, reference, expected):
    assert m.mc_accuracy(prediction, reference) == expected


def test_bleu_is_sacrebleu_scaled_to_unit_interval():
    import sacrebleu

    preds = ["the cat sat on the mat", "a dog runs in the park today"]
    refs = ["the cat is on the mat", ["a dog runs in a park", "the dog runs in the park today"]]
    for p, r in zip(preds, refs):
        expected = sacrebleu.sentence_bleu(p, [r] if isinstance(r, str) else r).score / 100
        assert m.bleu(p, r) == pytest.approx(expected)
    corpus = sacrebleu.corpus_bleu(preds, [[refs[0], refs[1][0]], [None, refs[1][1]]]).score / 100
    assert m.corpus_bleu(preds, refs) == pytest.approx(corpus)
    assert m.bleu("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)
    assert 0.0 <= m.bleu("x", "y") <= 1.0


def test_rouge_l_is_rouge_score_fmeasure_best_of_references():
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    pred = "a small red square on white"
    refs = ["a red square", "the small red squares on a white background"]
    expected = max(scorer.score(r, pred)["rougeL"].fmeasure for r in refs)
    assert m.rouge_l(pred, refs) == pytest.approx(expected)
    # LCS "a red square" = 3 tokens: P = 3/6, R = 3/3, F = 2PR/(P+R) = 2/3
    assert m.rouge_l(pred, "a red square") == pytest.approx(2 / 3)


def test_edit_distance_is_one_minus_normalised_levenshtein():
    assert m.edit_distance(r"\frac{a}{b}", r"\frac{a}{b}") == 1.0
    assert m.edit_distance(r"\frac{a}{c}", r"\frac{a}{b}") == pytest.approx(1 - 1 / 11)
    assert m.edit_distance("", "") == 1.0
    assert m.edit_distance("", "abcd") == 0.0
    assert m.edit_distance("abcd", ["zzzz", "abce"]) == pytest.approx(0.75)
    assert m.edit_distance("AB", "ab") == 0.0  # OCR: case matters


def test_every_metric_is_in_unit_interval_and_aggregate_is_the_mean():
    preds = ["Red", "12", "B", ""]
    refs = ["red", ["11.9", "x"], "(B)", ""]
    names = list(m.METRICS)
    per_sample = [m.score_sample(p, r, names) for p, r in zip(preds, refs)]
    for scores in per_sample:
        assert all(0.0 <= v <= 1.0 for v in scores.values())
    total = m.aggregate(preds, refs, per_sample, names)
    assert total["exact_match"] == pytest.approx(sum(s["exact_match"] for s in per_sample) / 4)
    assert total["relaxed_accuracy"] == pytest.approx(3 / 4)  # "Red" string match, 12 vs 11.9, "" == ""
    assert total["bleu"] == pytest.approx(m.corpus_bleu(preds, refs))
    assert set(total) == set(names)


def test_bad_metric_names_and_references_are_one_clear_error():
    with pytest.raises(m.MetricError, match="unknown metric.*'acc'.*exact_match"):
        m.parse_metric_names("exact_match,acc")
    assert m.parse_metric_names(" anls , bleu ") == ["anls", "bleu"]
    with pytest.raises(m.MetricError, match="reference must be a string"):
        m.exact_match("a", [])
    with pytest.raises(m.MetricError, match="reference must be a string"):
        m.exact_match("a", [1])


def test_eval_scores_an_existing_predictions_file_with_per_source_results(tmp_path, capsys):
    """`qwen2vl-ap eval --predictions FILE`: only prediction and reference are required; several sources get
    per-source results; a bad row is one line naming the file, line and field (exit code 2)."""
    import json

    from launch.evaluate import eval_main

    rows = [{"prediction": "12", "reference": "12.3", "source": "chartqa"},
            {"prediction": "30%", "reference": ["0.5", "29.5%"], "source": "chartqa"},
            {"prediction": "Acme Inc", "reference": "ACME inc.", "source": "docvqa"},
            {"prediction": "", "reference": "x", "source": "docvqa"}]
    path = tmp_path / "preds.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    code = eval_main(["--predictions", str(path), "--output_dir", str(out), "--metrics", "relaxed_accuracy,anls"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    anls_rows = [m.anls(r["prediction"], r["reference"]) for r in rows]
    assert anls_rows[1:] == [0.0, pytest.approx(1 - 1 / 9), 0.0]  # "30%" vs "29.5%": 4 edits; "." counts
    assert metrics["relaxed_accuracy"] == pytest.approx(2 / 4)  # 12 vs 12.3 (2.4%), 0.30 vs 0.295 (1.7%)
    assert metrics["anls"] == pytest.approx(sum(anls_rows) / 4)
    assert metrics["per_source"] == {
        "chartqa": {"relaxed_accuracy": 1.0, "anls": pytest.approx(sum(anls_rows[:2]) / 2)},
        "docvqa": {"relaxed_accuracy": 0.0, "anls": pytest.approx(sum(anls_rows[2:]) / 2)}}
    written = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert written[2]["scores"] == {"relaxed_accuracy": 0.0, "anls": pytest.approx(anls_rows[2])}

    path.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"prediction": "a"}) + "\n")
    capsys.readouterr()
    assert eval_main(["--predictions", str(path), "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f'qwen2vl-ap eval: error: {path} line 2: field "reference" must be a string or a non-empty list of strings'
    assert eval_main(["--predictions", str(path), "--output_dir", str(out), "--metrics", "accuracy"]) == 2
    assert "unknown metric(s) ['accuracy']" in capsys.readouterr().err


def _run_config(**train):
    from autoparallel.config import RunConfig

    base = {"evaluation_strategy": "steps", "eval_steps": 2, "save_steps": 2, "eval_meta_path": "eval.json"}
    return RunConfig.build("sft", [("test", {**base, **train})])


def test_best_step_and_early_stopping_follow_the_metric():
    """metric_for_best_model keeps the step of the best value (greater or smaller is better); patience counts
    evaluations without improvement; the state round-trips through trainer_state.json's dict."""
    from autoparallel.engine.training_eval import TrainingEvaluation

    hook = TrainingEvaluation(_run_config(metric_for_best_model="exact_match", early_stopping_patience=2), None)
    assert hook.greater and hook.key == "eval_exact_match"
    stops = []
    for step, value in ((2, 0.1), (4, 0.5), (6, 0.4), (8, 0.5)):  # equal to the best is no improvement
        hook.observe(step, {"eval_exact_match": value, "eval_loss": 1.0})
        stops.append(hook.should_stop())
    assert stops == [False, False, False, True]
    assert (hook.state.best_step, hook.state.best_metric, hook.state.evals_without_improvement) == (4, 0.5, 2)
    resumed = TrainingEvaluation(_run_config(metric_for_best_model="exact_match", early_stopping_patience=2), None)
    resumed.load_state_dict(hook.state_dict())
    assert resumed.state == hook.state and resumed.should_stop()

    loss = TrainingEvaluation(_run_config(metric_for_best_model="eval_loss"), None)
    assert not loss.greater
    for step, value in ((2, 3.0), (4, 2.0), (6, 2.5)):
        loss.observe(step, {"eval_loss": value})
    assert loss.state.best_step == 4 and not loss.should_stop()  # patience 0: never stops


@pytest.mark.parametrize("keys, problem", [
    ({"eval_generate": True, "eval_meta_path": None}, "eval_generate: true needs evaluation_strategy: steps"),
    ({"eval_generate": True, "eval_metrics": "exact,anls"}, "eval_metrics: unknown metric(s) ['exact']"),
    ({"metric_for_best_model": "anls"}, "metric_for_best_model='anls' is not evaluated (evaluated at eval_steps: "
                                        "eval_loss)"),
    ({"metric_for_best_model": "eval_loss", "save_steps": 3}, "metric_for_best_model needs save_steps, a multiple"),
    ({"early_stopping_patience": 2}, "early_stopping_patience needs metric_for_best_model"),
    ({"eval_generate": True, "eval_metrics": "anls", "metric_for_best_model": "anls"}, None),
    # the held-out split is evaluation data too; it and eval_meta_path never both choose it
    ({"eval_meta_path": None, "val_size": 0.1, "eval_generate": True, "metric_for_best_model": "eval_loss"}, None),
    ({"eval_meta_path": None, "metric_for_best_model": "eval_loss"}, "metric_for_best_model='eval_loss' is not "
                                                                      "evaluated (evaluated at eval_steps: nothing)"),
    ({"split_dataset_ratio": 0.1}, "eval_meta_path and val_size=0.1 (split_dataset_ratio) both choose"),
])
def test_evaluation_keys_that_cannot_work_together_are_one_line(keys, problem):
    from autoparallel.engine.training_eval import evaluation_problem

    found = evaluation_problem(_run_config(**keys))
    assert (found is None) if problem is None else (found is not None and found.startswith(problem)), found
