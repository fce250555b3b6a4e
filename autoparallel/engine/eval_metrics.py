"""Generation metrics for `qwen2vl-ap eval` and in-training evaluation: one prediction string against a reference
(a string, or a list of acceptable answers: a sample scores its best match, as the benchmarks do).

Every value is in [0, 1]. The names are the keys of `metrics.json` and the values `--metrics` accepts:

- `exact_match`: equal after `normalize_text` (lower case, punctuation dropped, whitespace collapsed).
- `relaxed_accuracy`: ChartQA's `relaxed_correctness` (pix2struct / ChartQA reference code): when both strings
  parse as floats (a trailing "%" divides by 100) and the reference is non-zero, right within 5% relative error;
  otherwise a case-insensitive string match. Numbers with units ("12 kg") do not parse and so compare as strings,
  exactly like the reference code.
- `anls`: DocVQA's Average Normalized Levenshtein Similarity: 1 - distance / max length on lower-cased,
  whitespace-collapsed strings, 0 below the 0.5 threshold; two empty strings score 1.
- `mc_accuracy`: the option letter (A-J) extracted from prediction and reference ("B", "(B)", "B. text",
  "The answer is B"; a capital starting a sentence such as "A red square" or "I think" is not one) must agree.
- `bleu`: sacrebleu's BLEU / 100 (per sample: sentence BLEU; the aggregate is corpus BLEU, as sacrebleu defines it).
- `rouge_l`: rouge-score's ROUGE-L F-measure (stemming on).
- `edit_distance`: a similarity for OCR / LaTeX: 1 - Levenshtein distance / max length (rapidfuzz); two empty
  strings score 1.
"""
from __future__ import annotations

import re
import string
from typing import Callable, Iterable, Sequence, Union

Reference = Union[str, Sequence[str]]

_PUNCTUATION = str.maketrans("", "", string.punctuation)
ANLS_THRESHOLD = 0.5
RELAXED_TOLERANCE = 0.05
# An option letter: marked ("(B)", "B.", "B)", "B:") or standing alone, but not a word ("A red square", "I think").
_MARKED_OPTION = re.compile(r"(?<![A-Za-z])(?:\(([A-J])\)|([A-J])[.):](?!\w))")
_BARE_OPTION = re.compile(r"(?<![A-Za-z])([A-J])(?![A-Za-z])(?!\s+[a-z])")
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*", re.IGNORECASE)


class MetricError(ValueError):
    """An unknown metric name or an unusable reference."""


def normalize_text(text: str) -> str:
    """Lower case, punctuation removed, whitespace collapsed: "  The Red." -> "the red"."""
    return " ".join(text.lower().translate(_PUNCTUATION).split())


def _references(reference: Reference) -> list[str]:
    refs = [reference] if isinstance(reference, str) else list(reference)
    if not refs or not all(isinstance(r, str) for r in refs):
        raise MetricError(f"a reference must be a string or a non-empty list of strings, got {reference!r}")
    return refs


def exact_match(prediction: str, reference: Reference) -> float:
    target = normalize_text(prediction)
    return float(any(normalize_text(r) == target for r in _references(reference)))


def _to_float(text: str) -> float | None:
    """ChartQA's `_to_float`: "12.5" -> 12.5, "30%" -> 0.3, anything else (units, words) -> None."""
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def _relaxed_correctness(prediction: str, target: str) -> bool:
    prediction, target = prediction.strip(), target.strip()
    predicted, expected = _to_float(prediction), _to_float(target)
    if predicted is not None and expected:  # a zero reference falls back to the string match (reference code)
        return abs(predicted - expected) / abs(expected) <= RELAXED_TOLERANCE
    return prediction.lower() == target.lower()


def relaxed_accuracy(prediction: str, reference: Reference) -> float:
    return float(any(_relaxed_correctness(prediction, r) for r in _references(reference)))


def _levenshtein_similarity(a: str, b: str) -> float:
    from rapidfuzz.distance import Levenshtein

    if not a and not b:
        return 1.0
    return 1.0 - Levenshtein.distance(a, b) / max(len(a), len(b))


def anls(prediction: str, reference: Reference) -> float:
    def norm(text: str) -> str:
        return " ".join(text.strip().lower().split())

    best = max(_levenshtein_similarity(norm(prediction), norm(r)) for r in _references(reference))
    return best if best >= ANLS_THRESHOLD else 0.0


def option_letter(text: str) -> str | None:
    """The option letter a text names: in the text after the last "answer is"/"answer:" when there is one, a
    marked letter first ("(B)", "B."), else a bare one that does not start a sentence ("A red ..." is no answer)."""
    part = _ANSWER_IS.split(text.strip())[-1]
    for pattern in (_MARKED_OPTION, _BARE_OPTION):
        match = pattern.search(part)
        if match:
            return next(g for g in match.groups() if g)
    return None


def mc_accuracy(prediction: str, reference: Reference) -> float:
    letter = option_letter(prediction)
    return float(letter is not None and any(option_letter(r) == letter for r in _references(reference)))


def bleu(prediction: str, reference: Reference) -> float:
    import sacrebleu

    return sacrebleu.sentence_bleu(prediction, _references(reference)).score / 100.0


_ROUGE = None


def rouge_l(prediction: str, reference: Reference) -> float:
    global _ROUGE
    if _ROUGE is None:  # the scorer builds a stemmer: once per process
        from rouge_score import rouge_scorer

        _ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return max(_ROUGE.score(r, prediction)["rougeL"].fmeasure for r in _references(reference))


def edit_distance(prediction: str, reference: Reference) -> float:
    return max(_levenshtein_similarity(prediction, r) for r in _references(reference))


METRICS: dict[str, Callable[[str, Reference], float]] = {
    "exact_match": exact_match,
    "relaxed_accuracy": relaxed_accuracy,
    "anls": anls,
    "mc_accuracy": mc_accuracy,
    "bleu": bleu,
    "rouge_l": rouge_l,
    "edit_distance": edit_distance,
}


def parse_metric_names(names: str | Iterable[str]) -> list[str]:
    """"exact_match,anls" (or a list) -> validated names; an unknown one raises MetricError naming the choices."""
    wanted = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    unknown = [n for n in wanted if n not in METRICS]
    if unknown or not wanted:
        raise MetricError(f"unknown metric(s) {unknown or wanted!r}; choose from {', '.join(METRICS)}")
    return wanted


def score_sample(prediction: str, reference: Reference, names: Sequence[str]) -> dict[str, float]:
    return {name: METRICS[name](prediction, reference) for name in names}


def corpus_bleu(predictions: Sequence[str], references: Sequence[Reference]) -> float:
    """sacrebleu's corpus BLEU / 100. Samples with fewer references than the most are padded with None, which
    sacrebleu skips (it needs equally long reference streams)."""
    import sacrebleu

    refs = [_references(r) for r in references]
    width = max((len(r) for r in refs), default=1)
    streams = [[r[k] if k < len(r) else None for r in refs] for k in range(width)]
    return sacrebleu.corpus_bleu(list(predictions), streams).score / 100.0


def aggregate(predictions: Sequence[str], references: Sequence[Reference], per_sample: Sequence[dict[str, float]],
              names: Sequence[str]) -> dict[str, float]:
    """Metric name -> value over a set: the mean of the per-sample scores, corpus BLEU for `bleu`."""
    if not per_sample:
        raise MetricError("no samples to score")
    out = {}
    for name in names:
        if name == "bleu":
            out[name] = corpus_bleu(predictions, references)
        else:
            out[name] = sum(s[name] for s in per_sample) / len(per_sample)
    return out
