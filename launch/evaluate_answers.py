"""Held-out answer accuracy: greedy short answers, normalised exact match (the demo's before/after number)."""
from __future__ import annotations

from typing import Any

from autoparallel.data.synthetic import normalize_answer
from launch.infer import Request, answer_batch, stop_token_ids
from network.generation import GenerationConfig
from network.log import logger
from network.processor import Qwen2VLProcessor


def answer_accuracy(model, processor: Qwen2VLProcessor, questions: list[dict[str, Any]], batch_size: int = 8,
                    max_new_tokens: int = 8) -> float:
    """Fraction of `questions` ({"question" with <image>/<video> placeholders, "images", "answer", optional
    "videos"/"id"}, e.g. `autoparallel.data.synthetic.eval_questions`) answered right after `normalize_answer`.

    Prompts use the chat template's default system prompt, as the SFT data does. Generation stops at
    `<|im_end|>` or after `max_new_tokens` (a one-word answer needs a few).
    """
    if not questions:
        raise ValueError("no questions to score")
    config = GenerationConfig(max_new_tokens=max_new_tokens, stop_token_ids=stop_token_ids(processor, model.config))
    correct = 0
    for start in range(0, len(questions), batch_size):
        chunk = questions[start: start + batch_size]
        requests = [Request(q.get("id", start + i), q["question"], list(q.get("images", [])),
                            list(q.get("videos", []))) for i, q in enumerate(chunk)]
        answers, _ = answer_batch(model, processor, requests, config)
        for i, (q, a) in enumerate(zip(chunk, answers)):
            ok = normalize_answer(a.answer) == normalize_answer(q["answer"])
            correct += ok
            if start + i < 3:
                logger.info("question %r: expected %r, answered %r (%s)", q["question"], q["answer"], a.answer,
                            "right" if ok else "wrong")
    accuracy = correct / len(questions)
    logger.info("answer accuracy %.3f (%d / %d)", accuracy, correct, len(questions))
    return accuracy
