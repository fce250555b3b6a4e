"""The trainer's evaluation hook: generation metrics at `eval_steps` (`eval_generate`), the best checkpoint
(`metric_for_best_model`, `greater_is_better`) and early stopping (`early_stopping_patience`).

Generation runs on the training ranks with the training layout (dp, mp, sharding): every rank answers the same
prompts in lockstep, as tensor-parallel `infer` does (ranks sharing a parameter must run the same forwards), so
each rank scores the same predictions and reaches the same early-stopping decision without a collective. Pipeline
stages are refused at config time (a stage holds only some layers; `launch/prepare.py`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional

import paddle

from autoparallel.config import RunConfig
from autoparallel.data import SFTDataset
from autoparallel.engine.eval_metrics import parse_metric_names
from autoparallel.engine.evaluation import (TensorParallelModel, eval_records, predict, prediction_rows, score_rows,
                                            stop_token_ids)
from network.generation import GenerationConfig
from network.log import logger

EVAL_PREFIX = "eval_"


def best_metric_key(name: str) -> str:
    """The metrics.jsonl key of `metric_for_best_model`: "exact_match" and "eval_exact_match" both name it."""
    return name if name.startswith(EVAL_PREFIX) else EVAL_PREFIX + name


def has_eval_data(cfg: RunConfig) -> bool:
    """Evaluation data: eval_meta_path, or the records val_size holds out of the training data."""
    return bool(cfg.train.eval_meta_path or cfg.data.val_size)


def evaluation_problem(cfg: RunConfig) -> Optional[str]:
    """Why the evaluation keys of `cfg` cannot work together (None when they can), checked before workers start."""
    train = cfg.train
    evaluates = train.evaluation_strategy == "steps" and train.eval_steps > 0
    if train.eval_meta_path and cfg.data.val_size:
        return (f"eval_meta_path and val_size={cfg.data.val_size:g} (split_dataset_ratio) both choose the evaluation "
                "data: set one of them")
    if train.eval_generate:
        if not evaluates or not has_eval_data(cfg):
            return ("eval_generate: true needs evaluation_strategy: steps, eval_steps > 0 and eval_meta_path "
                    "(or val_size)")
        try:
            parse_metric_names(train.eval_metrics)
        except ValueError as exc:
            return f"eval_metrics: {exc}"
    if train.metric_for_best_model:
        key = best_metric_key(train.metric_for_best_model)
        names = [EVAL_PREFIX + n for n in (parse_metric_names(train.eval_metrics) if train.eval_generate else [])]
        available = names + ([EVAL_PREFIX + "loss"] if has_eval_data(cfg) else [])
        if not evaluates or key not in available:
            return (f"metric_for_best_model={train.metric_for_best_model!r} is not evaluated (evaluated at eval_steps: "
                    f"{', '.join(available) or 'nothing'})")
        if not train.save_steps or train.save_steps % train.eval_steps:
            return "metric_for_best_model needs save_steps, a multiple of eval_steps (the best step must be saved)"
    if train.early_stopping_patience and not train.metric_for_best_model:
        return "early_stopping_patience needs metric_for_best_model (the metric that must keep improving)"
    return None


@dataclass
class EarlyStoppingState:
    """Saved in trainer_state.json, so a resumed run keeps its best and its patience count."""

    best_metric: Optional[float] = None
    best_step: Optional[int] = None
    evals_without_improvement: int = 0


class TrainingEvaluation:
    def __init__(self, cfg: RunConfig, eval_dataset: Optional[SFTDataset]):
        train = cfg.train
        self.dataset = eval_dataset if train.eval_generate else None
        self.names = parse_metric_names(train.eval_metrics) if train.eval_generate else []
        self.records = eval_records(self.dataset, train.eval_max_samples) if self.dataset is not None else []
        self.max_new_tokens = train.eval_max_new_tokens
        self.batch_size = train.per_device_eval_batch_size
        self.key = best_metric_key(train.metric_for_best_model) if train.metric_for_best_model else None
        greater = train.greater_is_better
        self.greater = greater if greater is not None else not (self.key or "").endswith("loss")
        self.patience = train.early_stopping_patience
        self.state = EarlyStoppingState()

    def generation_metrics(self, model: Any) -> dict[str, float]:
        """`eval_<metric>` over the evaluation records, greedy answers of the (parallelized) training model."""
        if self.dataset is None:
            return {}
        config = GenerationConfig(max_new_tokens=self.max_new_tokens,
                                  stop_token_ids=stop_token_ids(self.dataset.processor, model.config))
        model.eval()
        with paddle.no_grad():
            predictions = predict(TensorParallelModel(model), self.dataset, self.records, config, self.batch_size)
        model.train()
        metrics = score_rows(prediction_rows(self.records, predictions), self.names)
        return {EVAL_PREFIX + name: value for name, value in metrics.items() if name != "per_source"}

    def observe(self, step: int, metrics: dict[str, float]) -> None:
        """Track the best value of `metric_for_best_model` among this evaluation's `metrics`."""
        if self.key is None:
            return
        if self.key not in metrics:
            raise ValueError(f"metric_for_best_model={self.key!r} was not computed at step {step} (have: "
                             f"{', '.join(metrics) or 'nothing'}); set eval_generate/eval_metrics or eval_meta_path (or val_size)")
        value, best = metrics[self.key], self.state.best_metric
        if best is None or (value > best if self.greater else value < best):
            self.state = EarlyStoppingState(value, step, 0)
        else:
            self.state.evals_without_improvement += 1

    def should_stop(self) -> bool:
        stop = self.patience > 0 and self.state.evals_without_improvement >= self.patience
        if stop:
            logger.info("early stopping: %s has not improved for %d evaluations (best %.4g at step %s)", self.key,
                        self.state.evals_without_improvement, self.state.best_metric, self.state.best_step)
        return stop

    def state_dict(self) -> dict[str, Any]:
        return asdict(self.state)

    def load_state_dict(self, state: Optional[dict[str, Any]]) -> None:
        self.state = EarlyStoppingState(**state) if state else EarlyStoppingState()
