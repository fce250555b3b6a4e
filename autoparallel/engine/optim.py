"""The optimizer of a run: AdamW with the weight-decay rule, and the warmup + decay learning-rate schedule."""
from __future__ import annotations

import functools
import math

import paddle

from autoparallel.config import RunConfig, TrainingArgs
from network.device import bf16_supported
from placements.qwen2_vl import model_part


def lr_multiplier(step: int, warmup: int, total: int, kind: str, min_ratio: float = 0.0) -> float:
    """Linear warmup then cosine/linear decay to `min_ratio`, or constant; `step` counts from 0. Warmup is
    PaddleNLP's (and HF's) `step / warmup`: the first step runs at learning rate 0."""
    if warmup > 0 and step < warmup:
        return step / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * decay


def no_weight_decay(name: str) -> bool:
    """Biases and norm weights are not decayed (HF/PaddleNLP rule)."""
    return name.endswith(".bias") or "norm" in name or "ln_q" in name


def module_lr_scales(train: TrainingArgs) -> dict[str, float]:
    """Peak LR of each model part relative to `learning_rate` ("vit", "merger"; absent = 1)."""
    rates = {"vit": train.vit_lr, "merger": train.merger_lr}
    return {part: lr / train.learning_rate for part, lr in rates.items() if lr is not None}


def apply_module_learning_rates(model: paddle.nn.Layer, train: TrainingArgs) -> dict[str, float]:
    """Give ViT/merger parameters their own peak LR on the shared warmup/decay schedule; returns the scales.

    Paddle's optimizer multiplies its scheduled LR by each parameter's `optimize_attr["learning_rate"]`
    (`Optimizer._create_param_lr`). Parameter groups would say the same, but `dist.parallelize` rebuilds the
    optimizer from the model's flat parameter list and drops them; the attribute lives on the parameter
    (`shard_tensor` carries it to the dist parameter), so this works before or after parallelizing.
    """
    scales = module_lr_scales(train)
    for name, param in model.named_parameters():
        param.optimize_attr["learning_rate"] = scales.get(model_part(name), 1.0)
    return scales


def use_bf16(cfg: RunConfig) -> bool:
    """bf16 O2 (bf16 weights and activations, fp32 master weights and moments) needs bf16 kernels."""
    return cfg.model.bf16 and bf16_supported()


def param_dtype(cfg: RunConfig) -> str:
    """The dtype weights are loaded in: bf16 under bf16 O2 (what `paddle.amp.decorate` would cast them to), else fp32."""
    return "bfloat16" if use_bf16(cfg) else "float32"


def build_optimizer(model: paddle.nn.Layer, cfg: RunConfig, total_steps: int
                    ) -> tuple[paddle.optimizer.AdamW, paddle.optimizer.lr.LambdaDecay]:
    train = cfg.train
    warmup = train.num_warmup_steps(total_steps)
    schedule = paddle.optimizer.lr.LambdaDecay(
        train.learning_rate,
        functools.partial(lr_multiplier, warmup=warmup, total=total_steps, kind=train.lr_scheduler_type,
                          min_ratio=train.min_lr_ratio))
    decay_names = {p.name for n, p in model.named_parameters() if not no_weight_decay(n)}
    optimizer = paddle.optimizer.AdamW(
        learning_rate=schedule, parameters=model.parameters(), beta1=train.adam_beta1, beta2=train.adam_beta2,
        epsilon=train.adam_epsilon, weight_decay=train.weight_decay,
        apply_decay_param_fun=lambda name: name in decay_names,
        # No grad_clip: autoparallel.step.train_step computes the global norm once per step (for metrics and the
        # non-finite check) and clips with it, instead of ClipGradByGlobalNorm computing it again.
        multi_precision=use_bf16(cfg))
    return optimizer, schedule
