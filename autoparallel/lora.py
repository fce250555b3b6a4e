"""LoRA on the auto-parallel engine: `qwen2vl-ap lora` = the SFT engine with adapters on chosen Linears.

Layers. Targets are paddlenlp's `LoRALinear` (a `nn.Linear` subclass: base `weight`/`bias` keep their names,
adapters are `lora_A` [in, r] Kaiming-uniform and `lora_B` [r, out] zero, forward `x@W + (x@A)@B*scaling`).
It works on distributed tensors unchanged: its forward is plain matmuls, `dist.parallelize` shards its base
weight with the layer's ColWise/RowWise style and its adapters through the "layer.lora_X" plan entries of
placements/lora.py (checked: placements, logits and gradients match one process). paddlenlp's `LoRAModel` is
not used for training: it wraps the model (every name gains a "model." prefix, so checkpoint keys and the
engine's name rules would change) and reads PretrainedConfig fields our config does not have. Its file format
is kept: `lora_config.json` + `lora_model_state.pdparams` with the plain model's names
(`model.layers.0.self_attn.q_proj.lora_A`), which `LoRAModel.from_pretrained(plain_model, dir)` and
PaddleMIX's merge script read.

Frozen vision. The ViT blocks run as dense per-rank ops outside the distributed model (step.py), so adapters
there are rejected. The merger may carry adapters (`visual.merger.mlp.*`): it then runs as dist ops
(`train_merger` is set, meaning under lora "the merger trains through its adapters"; its weights stay frozen).

Optimizer. Only adapters reach the optimizer (autoparallel/parallelize.py), so frozen weights have no state
and ZeRO-2/3 accept the model; ZeRO-3 therefore shards only the adapters over "dp" — split the frozen base
weights with tensor parallel. With lora_dropout > 0 runs are not bit-comparable across layouts (the masks depend
on how each tensor is split); PaddleMIX's presets use 0.

Export. Every checkpoint gets the adapter next to its dist checkpoint (which keeps serving resume), and the
final one is also written to `output_dir`. Gathering sharded adapters is a collective, while checkpoint extras
are written by rank 0 only: `LoraTrainer.save` gathers on every rank first, `write_adapter` then writes.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import paddle
import paddle.distributed as dist

from autoparallel.engine import Trainer
from network.log import logger
from placements.lora import LORA_PARAMS
from placements.qwen2_vl import MERGER_PREFIX, is_dense_vision

LORA_CONFIG_NAME = "lora_config.json"
LORA_WEIGHTS_NAME = "lora_model_state.pdparams"

# PaddleMIX auto_2b_lora_bs32_1e8.sh: every projection of every decoder layer.
PADDLEMIX_TARGETS = ["model.layers.*q_proj.*", "model.layers.*k_proj.*", "model.layers.*v_proj.*",
                     "model.layers.*gate_proj.*", "model.layers.*up_proj.*", "model.layers.*down_proj.*",
                     "model.layers.*o_proj.*"]


@dataclass
class LoraArgs:
    lora: bool = True
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    rslora: bool = False
    # Regexes matched (re.fullmatch) against full sublayer names; only nn.Linear matches are wrapped.
    lora_target_modules: list[str] = field(default_factory=lambda: list(PADDLEMIX_TARGETS))

    def __post_init__(self) -> None:
        problems = []
        if self.lora_rank < 1:
            problems.append(f"lora_rank={self.lora_rank} must be >= 1")
        if self.lora_alpha <= 0:
            problems.append(f"lora_alpha={self.lora_alpha} must be > 0")
        if not 0.0 <= self.lora_dropout < 1.0:
            problems.append(f"lora_dropout={self.lora_dropout} must be in [0, 1)")
        if self.lora and not self.lora_target_modules:
            problems.append("lora_target_modules is empty")
        for pattern in self.lora_target_modules:
            try:
                re.compile(pattern)
            except re.error as exc:
                problems.append(f"lora_target_modules: {pattern!r} is not a regex ({exc})")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.lora_rank) if self.rslora else self.lora_rank)


def _lora_linear_cls() -> type:
    # paddlenlp's import takes ~10 s and ~250 MB: only processes that build LoRA layers pay for it.
    from paddlenlp.peft.lora.lora_layers import LoRALinear

    return LoRALinear


def target_names(model: paddle.nn.Layer, patterns: list[str]) -> list[str]:
    """Names of the nn.Linear sublayers matching any pattern; raises on frozen-ViT or missing targets."""
    linears = [name for name, layer in model.named_sublayers() if isinstance(layer, paddle.nn.Linear)]
    names = [n for n in linears if any(re.fullmatch(p, n) for p in patterns)]
    dense = [n for n in names if is_dense_vision(n, train_merger=True)]  # the ViT blocks, always dense
    if dense:
        raise ValueError(
            f"lora_target_modules {patterns} match {len(dense)} layers of the frozen vision tower "
            f"(e.g. {dense[0]}): the ViT blocks run as dense per-rank ops outside the distributed model and take no "
            "adapters; target the decoder (model.layers.*) or the merger (visual.merger.mlp.*)")
    for pattern in patterns:
        if not any(re.fullmatch(pattern, n) for n in names):
            logger.warning("lora_target_modules: %r matches no Linear layer", pattern)
    if not names:
        raise ValueError(f"lora_target_modules {patterns} match no Linear layer of the model")
    return names


def apply_lora(model: paddle.nn.Layer, args: LoraArgs) -> list[str]:
    """Replace the target Linears of a plain model by LoRA layers sharing their weight/bias tensors; only the
    adapters stay trainable. Returns the wrapped sublayer names (model order)."""
    lora_linear = _lora_linear_cls()
    names = target_names(model, args.lora_target_modules)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_sublayer(parent_name) if parent_name else model
        base = getattr(parent, child)
        saved = paddle.get_default_dtype()
        paddle.set_default_dtype(base.weight.dtype)  # adapters in the base dtype, as paddlenlp's LoRAModel does
        try:
            layer = lora_linear(base.weight.shape[0], base.weight.shape[1], r=args.lora_rank,
                                lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, rslora=args.rslora,
                                bias_attr=False if base.bias is None else None)
        finally:
            paddle.set_default_dtype(saved)
        layer.weight = base.weight
        if base.bias is not None:
            layer.bias = base.bias
        setattr(parent, child, layer)
    for name, param in model.named_parameters():
        param.stop_gradient = name.rpartition(".")[2] not in LORA_PARAMS
    trainable = sum(int(np.prod(p.shape)) for p in model.parameters() if not p.stop_gradient)
    total = sum(int(np.prod(p.shape)) for p in model.parameters())
    logger.info("LoRA r=%d alpha=%s scaling=%.4g on %d layers: %d trainable of %d parameters (%.3f%%)",
                args.lora_rank, args.lora_alpha, args.scaling, len(names), trainable, total, 100 * trainable / total)
    return names


# ---- adapter files ----------------------------------------------------------------------------------------
def gather_adapter(model: paddle.nn.Layer) -> dict[str, paddle.Tensor]:
    """Full (unsharded) adapter tensors by plain-model name. A collective: every rank must call it."""
    state = {}
    with paddle.no_grad():
        for name, param in model.named_parameters():
            if name.rpartition(".")[2] not in LORA_PARAMS:
                continue
            if param.is_dist():
                mesh = param.process_mesh
                param = dist.reshard(param, mesh, [dist.Replicate()] * len(mesh.shape))._local_value()
            state[name] = param.detach().clone()
    return state


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(str(tmp))
    os.replace(tmp, path)


def save_adapter(directory: str | os.PathLike, state: dict[str, paddle.Tensor], args: LoraArgs,
                 base_model_name_or_path: str | None = None) -> None:
    """Write `lora_config.json` + `lora_model_state.pdparams` (paddlenlp's format), each file atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dtype = str(next(iter(state.values())).dtype).replace("paddle.", "")
    # The fields of paddlenlp's LoRAConfig (its from_pretrained ignores unknown keys and drops "scaling").
    config = {"r": args.lora_rank, "lora_alpha": args.lora_alpha, "lora_dropout": args.lora_dropout,
              "rslora": args.rslora, "target_modules": list(args.lora_target_modules), "trainable_modules": None,
              "trainable_bias": None, "tensor_parallel_degree": -1, "dtype": dtype, "merge_weights": False,
              "base_model_name_or_path": base_model_name_or_path, "scaling": args.scaling}
    _atomic_write(directory / LORA_WEIGHTS_NAME, lambda p: paddle.save(state, p))
    _atomic_write(directory / LORA_CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(config, indent=2)))


def _args_from_config(config: dict) -> LoraArgs:
    return LoraArgs(lora_rank=int(config["r"]), lora_alpha=config["lora_alpha"],
                    lora_dropout=float(config.get("lora_dropout", 0.0)), rslora=bool(config.get("rslora", False)),
                    lora_target_modules=list(config["target_modules"]))


def read_adapter(directory: str | os.PathLike) -> tuple[dict, dict[str, tuple[np.ndarray, np.ndarray, float]]]:
    """(lora_config.json as a dict, {base weight name: (A [in, r], B [r, out], scaling)}) in Paddle layout,
    float32 numpy; the merged weight is `W + A @ B * scaling`."""
    directory = Path(directory)
    config = json.loads((directory / LORA_CONFIG_NAME).read_text())
    scaling = _args_from_config(config).scaling
    state = paddle.load(str(directory / LORA_WEIGHTS_NAME))
    adapters = {}
    for key, a in state.items():
        if key.endswith(".lora_A"):
            b = state[key[: -len("lora_A")] + "lora_B"]
            adapters[key[: -len("lora_A")] + "weight"] = (a.astype("float32").numpy(), b.astype("float32").numpy(),
                                                         scaling)
    return config, adapters


def load_adapter(model: paddle.nn.Layer, directory: str | os.PathLike) -> list[str]:
    """Add the adapter in `directory` to a plain single-process model; returns the wrapped layer names."""
    directory = Path(directory)
    args = _args_from_config(json.loads((directory / LORA_CONFIG_NAME).read_text()))
    names = apply_lora(model, args)
    state = paddle.load(str(directory / LORA_WEIGHTS_NAME))
    params = dict(model.named_parameters())
    expected = {f"{n}.{p}" for n in names for p in LORA_PARAMS}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(f"{directory / LORA_WEIGHTS_NAME} does not fit lora_target_modules on this model: "
                         f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected {extra[:3]}")
    for key, value in state.items():
        if list(value.shape) != list(params[key].shape):
            raise ValueError(f"{key}: adapter shape {list(value.shape)} != model {list(params[key].shape)}")
        params[key].set_value(value.astype(params[key].dtype))
    return names


# ---- trainer ----------------------------------------------------------------------------------------------
class LoraTrainer(Trainer):
    """The SFT engine with adapters added before `dist.parallelize` and exported with every checkpoint."""

    def __init__(self, command: str, cfg) -> None:
        self._gathered: dict[str, paddle.Tensor] | None = None
        super().__init__(command, cfg)

    @property
    def lora_args(self) -> LoraArgs:
        return self.cfg.sections["lora"]

    def prepare_model(self) -> None:
        if not self.lora_args.lora:
            logger.info("lora: false: full fine-tuning")
            return
        names = apply_lora(self.model, self.lora_args)
        # Under lora, train_merger means "the merger trains through its adapters" (the adapter files carry
        # only LoRA weights); parallelize then runs the merger as dist ops, its base weights stay frozen.
        on_merger = any(n.startswith(MERGER_PREFIX) for n in names)
        if self.cfg.train_merger and not on_merger:
            raise ValueError("train_merger: true with lora trains the merger through adapters: add "
                             "'visual.merger.mlp.*' to lora_target_modules (or set train_merger: false)")
        self.cfg.sections["model"].train_merger = on_merger

    def save(self) -> Path:
        if self.lora_args.lora:
            self._gathered = gather_adapter(self.model)
        try:
            return super().save()
        finally:
            self._gathered = None

    def write_adapter(self, directory: Path) -> None:
        if self._gathered is None:
            return
        save_adapter(directory, self._gathered, self.lora_args, self.cfg.model_name_or_path)
        if self.step == self.total_steps:
            save_adapter(self.output_dir, self._gathered, self.lora_args, self.cfg.model_name_or_path)
            logger.info("adapter written to %s (%s, %s)", self.output_dir, LORA_CONFIG_NAME, LORA_WEIGHTS_NAME)
