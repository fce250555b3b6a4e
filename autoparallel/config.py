"""A training run's configuration: typed dataclass sections behind one flat key space.

Keys are flat and unique across sections, as in PaddleMIX's shell scripts, so `--learning_rate 1e-5` works
whichever section holds it; code reads them typed, through their section (`cfg.train.learning_rate`,
`cfg.lora.lora_rank`), so a section name can never stand for a key. Unknown keys and values of the wrong type
are errors naming the key and where it came from. Files and the command line are parsed by `launch/config.py`;
this module owns the schema and turns (source, flat dict) layers into a `RunConfig`.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from autoparallel.data.config import DataConfig
from network.config import PRESETS, Qwen2VLConfig
from network.hub import CONFIG_FILES, ModelNotFoundError, resolve_model_dir
from network.lora import LoraArgs
from placements.degrees import ParallelDegrees
from placements.qwen2_vl import Trainable

RUN_CONFIG_FILE = "run_config.yaml"


class ConfigError(ValueError):
    """A configuration problem the user must fix; the message names the key and its source."""


# ---- sections ---------------------------------------------------------------------------------------------
@dataclass
class ModelArgs:
    # A preset name (`tiny`, `qwen2-vl-2b`, ...) builds random weights; a directory loads a checkpoint
    # (HF safetensors or PaddleMIX `model_state.pdparams`).
    model_name_or_path: str = "tiny"
    # What trains (ms-swift's names; other spellings are KEY_ALIASES). A frozen ViT (and merger) runs dense per
    # rank outside the distributed model; a trainable one is replicated on the mesh (placements/qwen2_vl.py).
    freeze_vit: bool = True
    freeze_merger: bool = True
    freeze_llm: bool = False
    recompute: bool = False  # decoder layers (and a trainable ViT's blocks unless vit_recompute says otherwise)
    vit_recompute: Optional[bool] = None  # None: as `recompute`
    bf16: bool = False
    fp16: bool = False  # PaddleMIX's key; only false is accepted (fp16 needs loss scaling, bf16 does not)
    # bf16 O2 keeps fp32 gradients for the fp32 master weights (Paddle's `master_grad`); GPU builds only.
    amp_master_grad: bool = False

    def __post_init__(self) -> None:
        if self.fp16:
            raise ValueError("fp16: true is not supported (fp16 training needs dynamic loss scaling): use bf16: true")
        if self.freeze_vit and self.freeze_merger and self.freeze_llm:
            raise ValueError("freeze_vit, freeze_merger and freeze_llm are all true: nothing would train")

    def trainable(self) -> Trainable:
        return Trainable(vit=not self.freeze_vit, merger=not self.freeze_merger, llm=not self.freeze_llm)

    @property
    def recompute_vit(self) -> bool:
        return self.recompute if self.vit_recompute is None else self.vit_recompute


@dataclass
class TrainingArgs:
    output_dir: str = "output/tiny_sft"
    per_device_train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-5
    # Per-module peak learning rates (None: learning_rate), on the same warmup/decay schedule.
    vit_lr: Optional[float] = None
    merger_lr: Optional[float] = None
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
    # Evaluation data (eval loss, eval_generate); unset: the records val_size holds out of the training data.
    eval_meta_path: Optional[str] = None
    eval_steps: int = 0
    evaluation_strategy: Literal["no", "steps"] = "no"
    per_device_eval_batch_size: int = 1
    # Generation evaluation at eval_steps on eval_meta_path (autoparallel/engine/training_eval.py): greedy answers
    # to the first eval_max_samples records scored with eval_metrics (comma-separated names of `qwen2vl-ap eval`).
    eval_generate: bool = False
    eval_metrics: str = "exact_match"
    eval_max_samples: int = 64
    eval_max_new_tokens: int = 32
    # `best` link to the checkpoint with the best value of this metric ("eval_loss" or an eval_metrics name, with
    # or without "eval_"); greater_is_better None: true unless the name ends in "loss" (HF's rule).
    metric_for_best_model: Optional[str] = None
    greater_is_better: Optional[bool] = None
    # Stop after this many evaluations without improving metric_for_best_model (0 = never).
    early_stopping_patience: int = 0
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
            # Module rates are scales of the global schedule (autoparallel/engine/optim.py): needs a base rate.
            "vit_lr": self.vit_lr is None or self.vit_lr >= 0 and self.learning_rate > 0,
            "merger_lr": self.merger_lr is None or self.merger_lr >= 0 and self.learning_rate > 0,
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
            "eval_max_samples": self.eval_max_samples >= 1,
            "eval_max_new_tokens": self.eval_max_new_tokens >= 1,
            "early_stopping_patience": self.early_stopping_patience >= 0,
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


@dataclass
class ParallelArgs:
    # None: derived from the world size as PaddleNLP does, world / (tp x pp x sharding) (`resolve_data_parallel`).
    data_parallel_degree: Optional[int] = None
    tensor_parallel_degree: int = 1
    sharding_parallel_degree: int = 1
    pipeline_parallel_degree: int = 1
    sharding: str = ""  # PaddleMIX's --sharding: "", "stage1", "stage2" or "stage3"
    sequence_parallel: bool = False  # decoder activations sequence-sharded inside the mp group
    # Decoder layers per pipeline stage (empty: balanced by the cost model in placements/).
    layers_per_stage: list[int] = field(default_factory=list)
    # Context parallel: every sequence split over this many ranks, Ulysses attention (autoparallel/context_parallel.py).
    # Aliases: PaddleNLP/PaddleMIX sep_parallel_degree, ms-swift sequence_parallel_size (KEY_ALIASES).
    context_parallel_degree: int = 1

    def __post_init__(self) -> None:
        if self.sharding not in ("", "stage1", "stage2", "stage3"):
            raise ValueError(f"sharding={self.sharding!r} must be one of stage1, stage2, stage3 (or empty)")
        if self.sequence_parallel and self.tensor_parallel_degree < 2:
            raise ValueError("sequence_parallel=true needs tensor_parallel_degree > 1 (it shards within the mp group)")
        if self.sequence_parallel and self.pipeline_parallel_degree > 1:
            raise ValueError("sequence_parallel=true with pipeline_parallel_degree > 1 is not supported yet")

    def resolve_data_parallel(self, world_size: int) -> None:
        """Set an unset data_parallel_degree from the world size; an explicit one is checked by validate_degrees."""
        if self.data_parallel_degree is not None:
            return
        others = (self.tensor_parallel_degree * self.pipeline_parallel_degree * self.sharding_parallel_degree
                  * self.context_parallel_degree)
        if world_size % others:
            raise ValueError(f"{world_size} processes are not a multiple of tensor x pipeline x sharding x context "
                             f"degrees = {others}, so no data_parallel_degree fits")
        self.data_parallel_degree = world_size // others

    def degrees(self) -> ParallelDegrees:
        return ParallelDegrees(
            data_parallel_degree=self.data_parallel_degree or 1,
            tensor_parallel_degree=self.tensor_parallel_degree,
            sharding_parallel_degree=self.sharding_parallel_degree,
            sharding_stage=int(self.sharding[-1]) if self.sharding else 0,
            pipeline_parallel_degree=self.pipeline_parallel_degree,
            sequence_parallel=self.sequence_parallel,
            context_parallel_degree=self.context_parallel_degree,
        )


# Keys the schema accepts although no code reads them, each with the reason (tests/unit/test_config_schema.py fails
# on any other key that nothing reads).
UNREAD_KEYS: dict[str, str] = {
    "fp16": "PaddleMIX's key; only false is accepted (fp16 needs loss scaling; bf16 is the supported half type)",
    "image_max_token_num": "ms-swift's token budget; DataConfig.__post_init__ turns it into max_pixels",
    "video_max_token_num": "ms-swift's token budget; DataConfig.__post_init__ turns it into video_max_pixels",
}

# Other frameworks' spellings of our keys: alias -> (key, the alias means the negation). ms-swift: freeze_aligner,
# aligner_lr; LLaMA-Factory: freeze_vision_tower, freeze_multi_modal_projector, freeze_language_model; Qwen2-VL's
# own fine-tuning recipe: vision_tower_lr, mm_projector_lr; train_merger is this project's older key.
KEY_ALIASES: dict[str, tuple[str, bool]] = {
    "freeze_vision_tower": ("freeze_vit", False),
    "freeze_aligner": ("freeze_merger", False),
    "freeze_multi_modal_projector": ("freeze_merger", False),
    "train_merger": ("freeze_merger", True),
    "freeze_language_model": ("freeze_llm", False),
    "vision_tower_lr": ("vit_lr", False),
    "aligner_lr": ("merger_lr", False),
    "mm_projector_lr": ("merger_lr", False),
    "padding_free": ("packing", False),  # ms-swift
    "neat_packing": ("packing", False),  # LLaMA-Factory (packing without cross-sample attention, as ours)
    "cutoff_len": ("max_seq_length", False),  # LLaMA-Factory
    "max_length": ("max_seq_length", False),  # ms-swift
    "video_max_frames": ("video_maxlen", False),  # LLaMA-Factory
    "fps_max_frames": ("video_maxlen", False),  # ms-swift FPS_MAX_FRAMES
    "sep_parallel_degree": ("context_parallel_degree", False),  # PaddleNLP / PaddleMIX
    "sequence_parallel_size": ("context_parallel_degree", False),  # ms-swift
    "split_dataset_ratio": ("val_size", False),  # ms-swift
}

SECTIONS: dict[str, type] = {"model": ModelArgs, "data": DataConfig, "train": TrainingArgs,
                             "parallel": ParallelArgs, "lora": LoraArgs}
# Both commands take every key; they differ in the default of `lora` (PaddleMIX scripts pass `--lora True` to
# the same finetune script, so `sft --lora true` trains adapters exactly like `lora`).
COMMAND_DEFAULTS: dict[str, dict[str, Any]] = {"sft": {"lora": False}, "lora": {"lora": True}}
COMMANDS = tuple(COMMAND_DEFAULTS)


def section_classes(command: str) -> dict[str, type]:
    """The sections a command accepts."""
    if command not in COMMANDS:
        raise ValueError(f"unknown training command {command!r}")
    return SECTIONS


# ---- compatibility-only keys ------------------------------------------------------------------------------
# PaddleMIX/PaddleNLP training arguments that only select code paths of those projects. They are accepted so a
# script's argument list runs unchanged, and listed in one notice; they change nothing here. Value: the values
# accepted (None: any) and why the key has no effect.
COMPATIBILITY_ONLY: dict[str, tuple[Optional[tuple[str, ...]], str]] = {
    "do_train": (None, "sft/lora always train"),
    "do_eval": (None, "evaluation follows evaluation_strategy"),
    "enable_auto_parallel": (None, "always semi-automatic parallel"),
    "use_intermediate_api": (None, "plans are applied with dist.parallelize"),
    "to_static": (("0", "false", "False"), "dygraph only"),
    "auto_parallel_resume_form_hybrid_parallel": (None, "resume reads this project's dist checkpoints"),
    "overwrite_output_dir": (None, "checkpoints are published atomically and never overwritten mid-run"),
    "logging_dir": (None, "metrics go to output_dir/metrics.jsonl, worker logs to output_dir/logs"),
    "report_to": (("visualdl", "none"), "metrics go to output_dir/metrics.jsonl (and VisualDL when installed)"),
    "save_strategy": (("steps",), "saving follows save_steps"),
    "optim": (("adamw", "adamw_torch"), "the optimizer is AdamW"),
    "hybrid_parallel_topo_order": (None, "the mesh order is fixed by the plan (dp, mp)"),
    "fp16_opt_level": (("O2",), "bf16 runs at level O2"),
}


def _compatibility_value(key: str, value: Any, source: str) -> None:
    allowed, why = COMPATIBILITY_ONLY[key]
    if allowed is not None and str(value) not in allowed and str(value).lower() not in allowed:
        raise ConfigError(f"{key}={value!r} ({source}): only {', '.join(allowed)} is supported ({why})")


# ---- values -----------------------------------------------------------------------------------------------
def _field_types(section_cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_cls)}


def _convert(value: Any, annotation: Any, key: str, source: str) -> Any:
    """Coerce a YAML or command-line value to the field's annotated type."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")) and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, key, source)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}={value!r} ({source}): must be one of {list(args)}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} ({source}): expected a list")
        item = args[0] if args else Any
        return [_convert(v, item, key, source) for v in value]
    if annotation is Any:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}={value!r} ({source}): expected true/false")
    if annotation in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} ({source}): expected a number")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}={value!r} ({source}): expected {annotation.__name__}") from None
        if annotation is int:
            if number != int(number):
                raise ConfigError(f"{key}={value!r} ({source}): expected an integer")
            return int(number)
        return number
    if annotation is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}={value!r} ({source}): expected a string")
        return str(value)
    return value


def _owners(classes: dict[str, type]) -> dict[str, tuple[str, Any]]:
    """Flat key -> (section name, annotation)."""
    owner: dict[str, tuple[str, Any]] = {}
    for name, section_cls in classes.items():
        for key, annotation in _field_types(section_cls).items():
            if key in owner:
                raise RuntimeError(f"config key {key!r} defined in two sections")  # programming error
            owner[key] = (name, annotation)
    return owner


# ---- the run config ---------------------------------------------------------------------------------------
@dataclass
class RunConfig:
    """Typed sections of one run; `lora` is None for `sft`."""

    command: str
    model: ModelArgs
    data: DataConfig
    train: TrainingArgs
    parallel: ParallelArgs
    lora: LoraArgs
    sources: list[tuple[str, dict[str, Any]]] = field(default_factory=list, repr=False)
    # Keys of COMPATIBILITY_ONLY that were given (accepted, without effect), for the one notice line.
    compatibility_keys: list[str] = field(default_factory=list, repr=False)

    @classmethod
    def build(cls, command: str, sources: list[tuple[str, dict[str, Any]]]) -> "RunConfig":
        """Instantiate every section of `command` from (source name, flat dict) layers; later layers win."""
        classes = section_classes(command)
        owner = _owners(classes)
        values: dict[str, dict[str, Any]] = {name: {} for name in classes}
        ignored: list[str] = []
        unknown: list[str] = []  # every unknown key of every layer, reported at once (not one per run)
        for source, layer in [(f"{command} default", COMMAND_DEFAULTS[command]), *sources]:
            spelled: dict[str, str] = {}  # key -> how this layer spelled it (aliases may collide)
            for given, raw in layer.items():
                if given in COMPATIBILITY_ONLY:
                    _compatibility_value(given, raw, source)
                    ignored += [given] if given not in ignored else []
                    continue
                key, negate = KEY_ALIASES.get(given, (given, False))
                if key not in owner:
                    close = difflib.get_close_matches(key, [*owner, *KEY_ALIASES], n=3)
                    hint = f" (did you mean {', '.join(close)}?)" if close else ""
                    unknown.append(f"{key!r} ({source}){hint}")
                    continue
                section, annotation = owner[key]
                value = _convert(raw, annotation, given, source)
                value = not value if negate else value
                if key in spelled and values[section][key] != value:
                    raise ConfigError(f"{given}={raw!r} ({source}) contradicts {spelled[key]} "
                                      f"(both set {key})")
                spelled[key] = f"{given}={raw!r}"
                values[section][key] = value
        if unknown:
            raise ConfigError(f"unknown config key{'s' if len(unknown) > 1 else ''} {'; '.join(unknown)}")
        built = {}
        for name, section_cls in classes.items():
            try:
                built[name] = section_cls(**values[name])
            except TypeError as exc:  # a required field without a default
                raise ConfigError(f"section {name}: {exc}") from None
            except ValueError as exc:  # __post_init__ range checks
                raise ConfigError(str(exc)) from None
        return cls(command=command, sources=list(sources), compatibility_keys=ignored, **built)

    def with_overrides(self, overrides: dict[str, Any], source: str = "overrides") -> "RunConfig":
        """The same sources plus one more layer (e.g. a planner's candidate change)."""
        return RunConfig.build(self.command, [*self.sources, (source, overrides)])

    @property
    def uses_lora(self) -> bool:
        return self.lora.lora

    def compatibility_notice(self) -> Optional[str]:
        """One line naming the given keys that have no effect here (None when there are none)."""
        if not self.compatibility_keys:
            return None
        return ("accepted for PaddleMIX compatibility, no effect here: "
                + ", ".join(f"{k} ({COMPATIBILITY_ONLY[k][1]})" for k in self.compatibility_keys))

    def section_items(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in section_classes(self.command)}

    def to_flat_dict(self) -> dict[str, Any]:
        flat: dict[str, Any] = {}
        for section in self.section_items().values():
            flat.update(dataclasses.asdict(section))
        return flat

    def save_yaml(self, path: str | os.PathLike) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_flat_dict(), sort_keys=False))


def model_config(model_name_or_path: str) -> Qwen2VLConfig:
    """A preset name, a local directory holding config.json, or a Hub id (only its config files are fetched)."""
    if model_name_or_path in PRESETS:
        return Qwen2VLConfig.preset(model_name_or_path)
    try:
        path = Path(resolve_model_dir(model_name_or_path, CONFIG_FILES))
    except ModelNotFoundError as exc:
        raise ConfigError(f"model_name_or_path: {exc} (presets: {', '.join(sorted(PRESETS))})") from None
    if not (path / "config.json").is_file():
        raise ConfigError(f"model_name_or_path={model_name_or_path!r}: {path} has no config.json")
    try:
        return Qwen2VLConfig.from_pretrained(str(path))
    except (KeyError, ValueError, TypeError) as exc:
        raise ConfigError(f"model_name_or_path={model_name_or_path!r}: {exc}") from None
