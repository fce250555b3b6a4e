"""LoRA: the adapter format (names, files, scaling) and adapters on a plain model — the one home that the
engine, `qwen2vl-ap merge-lora` and inference share.

Layers. Targets are paddlenlp's `LoRALinear` (a `nn.Linear` subclass: base `weight`/`bias` keep their names,
adapters are `lora_A` [in, r] Kaiming-uniform and `lora_B` [r, out] zero, forward `x@W + (x@A)@B*scaling`).
paddlenlp's `LoRAModel` wrapper is not used: it renames every key with a "model." prefix and reads
PretrainedConfig fields our config does not have. Its file format is kept: `lora_config.json` +
`lora_model_state.pdparams` with the plain model's names (`model.layers.0.self_attn.q_proj.lora_A`), which
`LoRAModel.from_pretrained(plain_model, dir)` and PaddleMIX's merge script read. Adapter files are read with the
restricted unpickler of `network.formats`, so a crafted adapter cannot run code.

Vision. Adapters may target the ViT (`visual.blocks.*.attn.qkv`, `.attn.proj`, `.mlp.fc1`, `.mlp.fc2`) and the
merger (`visual.merger.mlp.*`): the engine then runs that part of the tower as dist ops and trains only its
adapters (autoparallel/engine/lora_trainer.py).
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import ml_dtypes
import numpy as np

from network.formats import FormatError, index_pickle, read_ref
from network.log import logger

if TYPE_CHECKING:
    import paddle

LORA_CONFIG_NAME = "lora_config.json"
LORA_WEIGHTS_NAME = "lora_model_state.pdparams"
LORA_PARAMS = ("lora_A", "lora_B")
LORA_SUFFIXES = tuple(f".{p}" for p in LORA_PARAMS)

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

    @classmethod
    def from_adapter_config(cls, config: dict) -> "LoraArgs":
        """The settings of a `lora_config.json` (ours or paddlenlp's)."""
        return cls(lora_rank=int(config["r"]), lora_alpha=config["lora_alpha"],
                   lora_dropout=float(config.get("lora_dropout", 0.0)), rslora=bool(config.get("rslora", False)),
                   lora_target_modules=list(config.get("target_modules") or []), lora=False)


def _lora_linear_cls() -> type:
    # paddlenlp's import takes ~10 s and ~250 MB: only processes that build LoRA layers pay for it.
    from paddlenlp.peft.lora.lora_layers import LoRALinear

    return LoRALinear


def target_names(model: "paddle.nn.Layer", patterns: list[str]) -> list[str]:
    """Names of the nn.Linear sublayers matching any pattern; raises when none matches."""
    import paddle

    linears = [name for name, layer in model.named_sublayers() if isinstance(layer, paddle.nn.Linear)]
    names = [n for n in linears if any(re.fullmatch(p, n) for p in patterns)]
    for pattern in patterns:
        if not any(re.fullmatch(pattern, n) for n in names):
            logger.warning("lora_target_modules: %r matches no Linear layer", pattern)
    if not names:
        raise ValueError(f"lora_target_modules {patterns} match no Linear layer of the model")
    return names


def apply_lora(model: "paddle.nn.Layer", args: LoraArgs) -> list[str]:
    """Replace the target Linears of a plain model by LoRA layers sharing their weight/bias tensors; only the
    adapters stay trainable. Returns the wrapped sublayer names (model order)."""
    import paddle

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
def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(str(tmp))
    os.replace(tmp, path)


def save_adapter(directory: str | os.PathLike, state: dict[str, "paddle.Tensor"], args: LoraArgs,
                 base_model_name_or_path: str | None = None, base_model_fingerprint: str | None = None) -> None:
    """Write `lora_config.json` + `lora_model_state.pdparams` (paddlenlp's format), each file atomically.
    `base_model_fingerprint`: `weights_fingerprint` of the base the adapter was trained on (see `base_mismatch`)."""
    import paddle

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dtype = str(next(iter(state.values())).dtype).replace("paddle.", "")
    # The fields of paddlenlp's LoRAConfig (its from_pretrained ignores unknown keys and drops "scaling").
    config = {"r": args.lora_rank, "lora_alpha": args.lora_alpha, "lora_dropout": args.lora_dropout,
              "rslora": args.rslora, "target_modules": list(args.lora_target_modules), "trainable_modules": None,
              "trainable_bias": None, "tensor_parallel_degree": -1, "dtype": dtype, "merge_weights": False,
              "base_model_name_or_path": base_model_name_or_path, "scaling": args.scaling,
              "base_model_fingerprint": base_model_fingerprint}
    _atomic_write(directory / LORA_WEIGHTS_NAME, lambda p: paddle.save(state, p))
    _atomic_write(directory / LORA_CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(config, indent=2)))


def base_mismatch(adapter_dir: str | os.PathLike, base_dir: str, fingerprint: str | None = None) -> str | None:
    """None when the weights in `base_dir` (their `weights_fingerprint`, if already known) are the base the adapter
    in `adapter_dir` was trained on, by the `base_model_fingerprint` its lora_config.json records (adapters that
    record none pass); else the sentence saying so. Adapters on another base give a model nobody trained, with no
    error anywhere else: callers refuse or warn."""
    from network.weights import weights_fingerprint

    path = Path(adapter_dir) / LORA_CONFIG_NAME
    if not path.is_file():
        return None
    config = json.loads(path.read_text())
    recorded = config.get("base_model_fingerprint")
    if not recorded or (fingerprint or weights_fingerprint(base_dir)) == recorded:
        return None
    return (f"the weights in {base_dir} are not the base the adapter was trained on ({path}: "
            f"base_model_name_or_path {config.get('base_model_name_or_path')}, "
            f"base_model_fingerprint {recorded[:16]}...)")


def read_adapter_state(directory: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """(lora_config.json as a dict, {tensor name: array as stored}) of an adapter directory, read through the
    restricted unpickler (bf16 arrives as ml_dtypes.bfloat16)."""
    directory = Path(directory)
    config = json.loads((directory / LORA_CONFIG_NAME).read_text())
    refs = index_pickle(str(directory / LORA_WEIGHTS_NAME))
    bf16 = np.dtype(ml_dtypes.bfloat16)
    state = {k: read_ref(r).view(bf16) if r.dtype == np.uint16 else read_ref(r) for k, r in refs.items()}
    return config, state


def read_adapter(directory: str | os.PathLike) -> tuple[dict, dict[str, tuple[np.ndarray, np.ndarray, float]]]:
    """(lora_config.json as a dict, {base weight name: (A [in, r], B [r, out], scaling)}) in Paddle layout,
    float32 numpy; the merged weight is `W + A @ B * scaling`."""
    config, state = read_adapter_state(directory)
    scaling = LoraArgs.from_adapter_config(config).scaling
    file = Path(directory) / LORA_WEIGHTS_NAME
    adapters = {}
    for key, a in state.items():
        if key.endswith(".lora_A"):
            b = state.get(key[: -len("lora_A")] + "lora_B")
            if b is None:
                raise FormatError(f"{file}: '{key}' has no matching '{key[: -len('A')]}B'")
            adapters[key[: -len("lora_A")] + "weight"] = (a.astype(np.float32), b.astype(np.float32), scaling)
    if not adapters:  # folding nothing would serve the base model under the adapter's name
        raise FormatError(f"{file} holds no LoRA tensors ('*.lora_A' / '*.lora_B'); refusing an empty adapter")
    return config, adapters


def fold_adapter(model: "paddle.nn.Layer", directory: str | os.PathLike) -> list[str]:
    """Merge the adapter in `directory` into a plain model's weights in place (`W + A @ B * scaling`), for
    serving an unmerged adapter at base-model speed; returns the merged weight names."""
    import paddle

    _, adapters = read_adapter(directory)
    params = dict(model.named_parameters())
    for name, (a, b, scaling) in adapters.items():
        if name not in params or list(params[name].shape) != [a.shape[0], b.shape[1]]:
            found = list(params[name].shape) if name in params else "no such weight"
            raise ValueError(f"{Path(directory) / LORA_WEIGHTS_NAME}: adapter for {name} "
                             f"([{a.shape[0]}, {b.shape[1]}]) does not fit the model ({found})")
        weight = params[name]
        merged = weight.astype("float32").numpy() + a @ b * scaling
        weight.set_value(paddle.to_tensor(merged).astype(weight.dtype))
    return sorted(adapters)


def load_adapter(model: "paddle.nn.Layer", directory: str | os.PathLike) -> list[str]:
    """Add the adapter in `directory` to a plain single-process model; returns the wrapped layer names."""
    import paddle

    directory = Path(directory)
    config, state = read_adapter_state(directory)
    args = LoraArgs.from_adapter_config(config)
    args.lora = True
    names = apply_lora(model, args)
    params = dict(model.named_parameters())
    expected = {f"{n}.{p}" for n in names for p in LORA_PARAMS}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(f"{directory / LORA_WEIGHTS_NAME} does not fit lora_target_modules on this model: "
                         f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected {extra[:3]}")
    for key, value in state.items():
        if list(value.shape) != list(params[key].shape):
            raise ValueError(f"{key}: adapter shape {list(value.shape)} != model {list(params[key].shape)}")
        params[key].set_value(paddle.to_tensor(value.astype(np.float32)).astype(params[key].dtype))
    return names
