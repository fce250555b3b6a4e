"""Model and training sections of a run's configuration (PaddleMIX/PaddleNLP key names)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional


@dataclass
class ModelArgs:
    # A preset name (`tiny`, `qwen2-vl-2b`, ...) builds random weights; a directory loads a checkpoint
    # (HF safetensors or PaddleMIX `model_state.pdparams`).
    model_name_or_path: str = "tiny"
    freeze_vit: bool = True
    train_merger: bool = False
    recompute: bool = False
    bf16: bool = False


@dataclass
class TrainingArgs:
    output_dir: str = "output/tiny_sft"
    per_device_train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-5
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    lr_scheduler_type: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    num_train_epochs: float = 1.0
    max_steps: int = -1
    save_steps: int = 0
    save_total_limit: int = 0
    logging_steps: int = 1
    seed: int = 42
    resume_from_checkpoint: Optional[str] = None
    eval_meta_path: Optional[str] = None
    eval_steps: int = 0
    evaluation_strategy: Literal["no", "steps"] = "no"
    per_device_eval_batch_size: int = 1
    # Optional cross-check (PaddleMIX has no such key): when set it must equal per_device_train_batch_size x
    # gradient_accumulation_steps x dp; it never changes the accumulation.
    global_batch_size: Optional[int] = None
    # A step whose loss or global grad norm is NaN/Inf stops training (NonFiniteError naming the step), or with
    # true is skipped: no weight update, gradients cleared, LR schedule and AdamW step count not advanced.
    skip_nonfinite_steps: bool = False
    # Seconds a rank may spend in one step, checkpoint save or resume before it dumps its stacks to its worker log
    # and exits, so the launcher stops the job (0 = off). Also the NCCL process-group timeout on GPU.
    step_timeout: int = 1800

    def __post_init__(self) -> None:
        checks = {
            "per_device_train_batch_size": self.per_device_train_batch_size >= 1,
            "gradient_accumulation_steps": self.gradient_accumulation_steps >= 1,
            "learning_rate": self.learning_rate >= 0,
            "warmup_ratio": 0.0 <= self.warmup_ratio < 1.0,
            "warmup_steps": self.warmup_steps >= 0,
            "max_grad_norm": self.max_grad_norm >= 0,
            "logging_steps": self.logging_steps >= 1,
            "save_steps": self.save_steps >= 0,
            "save_total_limit": self.save_total_limit >= 0,
            "num_train_epochs": self.num_train_epochs > 0,
            "min_lr_ratio": 0.0 <= self.min_lr_ratio <= 1.0,
            "adam_beta1": 0.0 <= self.adam_beta1 < 1.0,
            "adam_beta2": 0.0 <= self.adam_beta2 < 1.0,
            "adam_epsilon": self.adam_epsilon > 0,
            "weight_decay": self.weight_decay >= 0,
            "max_steps": self.max_steps == -1 or self.max_steps >= 1,
            "eval_steps": self.eval_steps >= 0,
            "per_device_eval_batch_size": self.per_device_eval_batch_size >= 1,
            "global_batch_size": self.global_batch_size is None or self.global_batch_size >= 1,
            "step_timeout": self.step_timeout >= 0,
        }
        bad = [key for key, ok in checks.items() if not ok]
        if bad:
            raise ValueError(", ".join(f"{k}={getattr(self, k)!r} is out of range" for k in bad))

    def total_steps(self, steps_per_epoch: int) -> int:
        if self.max_steps > 0:
            return self.max_steps
        return max(1, math.ceil(self.num_train_epochs * steps_per_epoch))

    def num_warmup_steps(self, total: int) -> int:
        # PaddleNLP semantics: an explicit warmup_steps wins over warmup_ratio.
        return self.warmup_steps if self.warmup_steps > 0 else int(math.ceil(total * self.warmup_ratio))


def lr_multiplier(step: int, warmup: int, total: int, kind: str, min_ratio: float = 0.0) -> float:
    """Linear warmup then cosine/linear decay to `min_ratio`, or constant; `step` counts from 0."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * decay
