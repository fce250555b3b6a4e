"""LoRA on the auto-parallel engine: `qwen2vl-ap lora` = the SFT engine with adapters (network/lora.py) added
before `dist.parallelize`.

Adapters work on distributed tensors unchanged: LoRALinear's forward is plain matmuls, `dist.parallelize` shards
its base weight with the layer's ColWise/RowWise style and its adapters through the "layer.lora_X" plan entries
of placements/lora.py (checked: placements, logits and gradients match one process).

Optimizer. Only adapters reach the optimizer (autoparallel/parallelize.py), so frozen weights have no state
and ZeRO-2/3 accept the model; ZeRO-3 therefore shards only the adapters over "dp" — split the frozen base
weights with tensor parallel. With lora_dropout > 0 runs are not bit-comparable across layouts (the masks depend
on how each tensor is split); PaddleMIX's presets use 0.

Checkpoints. When the base is a checkpoint on disk (a directory or Hub id), `dist_ckpt/` holds the adapters and
their optimizer state only: a resume reads the base from `model_name_or_path` again (each rank its slices) and
merge-lora finds it through `base_model_name_or_path` in lora_config.json. A preset's random base exists nowhere
else, so it stays in the checkpoint.

Each adapter records the `weights_fingerprint` of that base (lora_config.json): a resume on other base weights
is refused, and merge-lora / `infer --lora` check it too (`network.lora.base_mismatch`).

Export. Every checkpoint gets the adapter next to its dist checkpoint (which keeps serving resume), and the
final one is also written to `output_dir`. Gathering sharded adapters is a collective, while checkpoint extras
are written by rank 0 only: `LoraTrainer.save` gathers on every rank first, `write_adapter` then writes.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import paddle
import paddle.distributed as dist

from autoparallel.config import RunConfig
from autoparallel.engine.trainer import Trainer
from network.config import PRESETS
from network.formats import CheckpointError
from network.hub import resolve_model_dir
from network.log import logger
from network.lora import (LORA_CONFIG_NAME, LORA_PARAMS, LORA_WEIGHTS_NAME, LoraArgs, apply_lora, base_mismatch,
                          save_adapter)
from network.weights import weights_fingerprint
from placements.qwen2_vl import Trainable


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


class LoraTrainer(Trainer):
    """The SFT engine with adapters added before `dist.parallelize` and exported with every checkpoint."""

    def __init__(self, cfg: RunConfig) -> None:
        self._gathered: dict[str, paddle.Tensor] | None = None
        super().__init__(cfg)

    @property
    def lora_args(self) -> LoraArgs:
        return self.cfg.lora

    def prepare_model(self) -> None:
        if not self.cfg.uses_lora:
            logger.info("lora: false: full fine-tuning")
            return
        names = apply_lora(self.model, self.lora_args)
        # Under lora, an unfrozen ViT/merger trains through its adapters (the adapter files carry only LoRA
        # weights); parallelize then runs that part as dist ops, its base weights stay frozen.
        adapted = Trainable.holding(names)
        for part, key, targets in (("vit", "freeze_vit", r"'visual.blocks.*.(attn.qkv|attn.proj|mlp.fc1|mlp.fc2)'"),
                                   ("merger", "freeze_merger", "'visual.merger.mlp.*'")):
            if getattr(self.trainable, part) and not getattr(adapted, part):
                raise ValueError(f"{key}: false with lora trains the {part} through adapters: add {targets} to "
                                 f"lora_target_modules (or set {key}: true)")
        self.trainable = adapted

    def checkpoint_holds_frozen_weights(self) -> bool:
        return not self.cfg.uses_lora or self.cfg.model.model_name_or_path in PRESETS

    @functools.cached_property
    def base_dir(self) -> str | None:
        """The base model directory an adapters-only checkpoint depends on (None: the checkpoint holds the base)."""
        return None if self.checkpoint_holds_frozen_weights() else resolve_model_dir(self.cfg.model.model_name_or_path)

    @functools.cached_property
    def base_fingerprint(self) -> str | None:
        """`weights_fingerprint` of that base, read once: the resume check and every adapter export use it."""
        return None if self.base_dir is None else weights_fingerprint(self.base_dir)

    def load_weights(self) -> None:
        if self.resume_path is not None and self.base_dir is not None:
            mismatch = base_mismatch(self.resume_path, self.base_dir, self.base_fingerprint)
            if mismatch:
                raise CheckpointError(f"resume_from_checkpoint: {mismatch}; resume with the base the run started from")
        super().load_weights()

    def save(self) -> Path:
        if self.cfg.uses_lora:
            self._gathered = gather_adapter(self.model)
        try:
            return super().save()
        finally:
            self._gathered = None

    def write_adapter(self, directory: Path) -> None:
        if self._gathered is None:
            return
        base = self.cfg.model.model_name_or_path
        if os.path.isdir(base):  # merge-lora may run from another directory
            base = os.path.abspath(base)
        save_adapter(directory, self._gathered, self.lora_args, base, self.base_fingerprint)
        if self.step == self.total_steps:
            save_adapter(self.output_dir, self._gathered, self.lora_args, base, self.base_fingerprint)
            logger.info("adapter written to %s (%s, %s)", self.output_dir, LORA_CONFIG_NAME, LORA_WEIGHTS_NAME)
