"""Qwen2-VL / Qwen2.5-VL configuration: dataclasses, HF `config.json` reader/writer and the published presets.

One `Qwen2VLConfig` describes both families: the decoder is the same, the vision tower differs and is described
by `Qwen2VLVisionConfig` or `Qwen2_5_VLVisionConfig` (which one is `model_type` in config.json). Vision fields
use the Qwen2-VL names everywhere (`embed_dim` = ViT width, `hidden_size` = merger output = LLM width); the
Qwen2.5-VL names (`hidden_size` = ViT width, `out_hidden_size`) are translated when reading and writing.
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from network.formats import FormatError

CONFIG_NAME = "config.json"
_DTYPES = {"float32", "bfloat16", "float16"}
_OPTIONAL = ("hidden_act", "attention_dropout", "image_token_id", "video_token_id", "vision_start_token_id",
             "vision_end_token_id", "bos_token_id", "eos_token_id", "pad_token_id")


# Upper bounds of config.json values, far above every published model (72B: 80 layers, hidden 8192, vocab 152064,
# 128k context) and low enough that a crafted file fails here instead of allocating terabytes or building
# millions of layers; keys as config.json spells them (both vision families' names).
TEXT_LIMITS = {"vocab_size": 2**22, "hidden_size": 65536, "intermediate_size": 2**20, "num_hidden_layers": 1024,
               "num_attention_heads": 1024, "num_key_value_heads": 1024, "max_position_embeddings": 2**22}
VISION_LIMITS = {"depth": 1024, "embed_dim": 65536, "hidden_size": 65536, "out_hidden_size": 65536,
                 "num_heads": 1024, "intermediate_size": 2**20, "in_channels": 64, "in_chans": 64, "patch_size": 1024,
                 "spatial_patch_size": 1024, "spatial_merge_size": 64, "temporal_patch_size": 64,
                 "window_size": 65536}


def _check_ints(source: str, values: dict[str, Any], limits: dict[str, int], where: str = "") -> None:
    """Every present key of `limits` holds an integer in [1, limit] (JSON numbers only: bool and float are not)."""
    for key, limit in limits.items():
        value = values.get(key)
        if key in values and (type(value) is not int or not 1 <= value <= limit):
            raise FormatError(f"{source}: '{where}{key}' = {value!r} must be an integer between 1 and {limit}")


def _check_numbers(source: str, values: dict[str, Any], limits: dict[str, float], where: str = "") -> None:
    """Every present key of `limits` holds a finite number in (0, limit]."""
    for key, limit in limits.items():
        value = values.get(key)
        if key in values and (type(value) not in (int, float) or not 0 < value <= limit):
            raise FormatError(f"{source}: '{where}{key}' = {value!r} must be a number in (0, {limit:g}]")


# transformers' Qwen2VLVisionConfig defaults (the shared 675M ViT of every published Qwen2-VL size).
QWEN2_VL_VISION_DEFAULTS = {"depth": 32, "embed_dim": 1280, "num_heads": 16, "mlp_ratio": 4}


@dataclass(kw_only=True)
class VisionConfig:
    """Fields every Qwen-VL vision tower has."""

    depth: int
    embed_dim: int
    hidden_size: int  # merger output width == LLM hidden size
    num_heads: int
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2


@dataclass(kw_only=True)
class Qwen2VLVisionConfig(VisionConfig):
    mlp_ratio: float
    hidden_act: str = "quick_gelu"

    @property
    def mlp_hidden_size(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)


@dataclass(kw_only=True)
class Qwen2_5_VLVisionConfig(VisionConfig):
    """Qwen2.5-VL ViT: RMSNorm, SwiGLU MLP of `intermediate_size`, attention inside windows of `window_size`
    pixels except in `fullatt_block_indexes`; video M-RoPE time advances `tokens_per_second` per second."""

    intermediate_size: int
    fullatt_block_indexes: list[int] = field(default_factory=lambda: [7, 15, 23, 31])
    window_size: int = 112
    tokens_per_second: float = 2
    hidden_act: str = "silu"

    @property
    def mlp_hidden_size(self) -> int:
        return self.intermediate_size

    def __post_init__(self) -> None:
        self.fullatt_block_indexes = [int(i) for i in self.fullatt_block_indexes]
        unit = self.patch_size * self.spatial_merge_size
        if self.window_size % unit:
            raise ValueError(f"vision_config.window_size {self.window_size} must be a multiple of "
                             f"patch_size * spatial_merge_size = {unit}")


MODEL_TYPES = {"qwen2_vl": Qwen2VLVisionConfig, "qwen2_5_vl": Qwen2_5_VLVisionConfig}
_ARCHITECTURES = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}


@dataclass
class Qwen2VLConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: list[int]
    tie_word_embeddings: bool
    vision_config: Qwen2VLVisionConfig | Qwen2_5_VLVisionConfig
    hidden_act: str = "silu"
    attention_dropout: float = 0.0
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    bos_token_id: int = 151643
    eos_token_id: int = 151645
    pad_token_id: int = 151643
    dtype: str = "float32"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def model_type(self) -> str:
        """"qwen2_vl" or "qwen2_5_vl", from the vision tower."""
        return "qwen2_5_vl" if isinstance(self.vision_config, Qwen2_5_VLVisionConfig) else "qwen2_vl"

    def __post_init__(self) -> None:
        if isinstance(self.vision_config, dict):  # asdict() round trip: the 2.5 tower has intermediate_size
            cls = Qwen2_5_VLVisionConfig if "intermediate_size" in self.vision_config else Qwen2VLVisionConfig
            self.vision_config = cls(**self.vision_config)
        if not all(type(s) is int and s >= 0 for s in self.mrope_section):
            raise ValueError(f"mrope_section {self.mrope_section} must be non-negative integers")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                             f"{self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not divisible by num_key_value_heads "
                             f"{self.num_key_value_heads}")
        vision = self.vision_config
        if vision.embed_dim % vision.num_heads or (vision.embed_dim // vision.num_heads) % 2:
            raise ValueError(f"vision_config: the width {vision.embed_dim} must split into num_heads "
                             f"{vision.num_heads} heads of an even size (rotary embedding)")
        if sum(self.mrope_section) * 2 != self.head_dim:
            raise ValueError(f"mrope_section {self.mrope_section} must sum to head_dim/2 = {self.head_dim // 2}")
        if self.vision_config.hidden_size != self.hidden_size:
            raise ValueError(
                f"vision_config.hidden_size {self.vision_config.hidden_size} must equal hidden_size {self.hidden_size}"
            )

    # ---- reading -------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "<dict>") -> "Qwen2VLConfig":
        """Read the flat Hub layout or the transformers-5 nested layout; unknown keys are ignored."""
        # Nested layout: LLM fields live in text_config, but top-level keys (notably tie_word_embeddings,
        # which transformers 5 writes only there) take precedence.
        text = {**d.get("text_config", {}), **{k: v for k, v in d.items() if k != "text_config"}}

        def need(src: dict[str, Any], key: str, where: str = "") -> Any:
            if key not in src:
                raise KeyError(f"{source}: required config field '{where}{key}' is missing")
            return src[key]

        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
        if "mrope_section" not in rope:
            raise KeyError(f"{source}: required field 'mrope_section' (in rope_scaling/rope_parameters) is missing")
        rope_theta = rope.get("rope_theta", text.get("rope_theta"))
        if rope_theta is None:
            raise KeyError(f"{source}: required config field 'rope_theta' is missing")

        model_type = d.get("model_type", "qwen2_vl")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"{source}: model_type {model_type!r} is not supported; known: {sorted(MODEL_TYPES)}")
        vis = need(d, "vision_config")
        if not isinstance(vis, dict):
            raise FormatError(f"{source}: 'vision_config' must be an object")
        _check_ints(source, text, TEXT_LIMITS)
        _check_numbers(source, text, {"rms_norm_eps": 1, "rope_theta": 1e12})
        _check_ints(source, vis, VISION_LIMITS, "vision_config.")
        _check_numbers(source, vis, {"mlp_ratio": 64, "tokens_per_second": 1e6}, "vision_config.")
        if not isinstance(rope["mrope_section"], list):
            raise FormatError(f"{source}: 'mrope_section' must be a list of integers")
        if model_type == "qwen2_vl":
            # transformers >= 4.45 writes only the non-default vision keys: a missing one takes HF's
            # Qwen2VLVisionConfig default (the merger width defaults to the LLM's, which it must equal).
            vis = {**QWEN2_VL_VISION_DEFAULTS, **vis}
        common = dict(
            depth=need(vis, "depth", "vision_config."),
            num_heads=need(vis, "num_heads", "vision_config."),
            in_channels=vis.get("in_channels", vis.get("in_chans", 3)),
            patch_size=vis.get("patch_size", vis.get("spatial_patch_size", 14)),
            spatial_merge_size=vis.get("spatial_merge_size", 2),
            temporal_patch_size=vis.get("temporal_patch_size", 2),
        )
        try:
            if model_type == "qwen2_vl":
                vision = Qwen2VLVisionConfig(
                    embed_dim=need(vis, "embed_dim", "vision_config."),
                    hidden_size=vis.get("hidden_size", need(text, "hidden_size")),
                    mlp_ratio=need(vis, "mlp_ratio", "vision_config."),
                    hidden_act=vis.get("hidden_act", "quick_gelu"),
                    **common,
                )
            else:  # Qwen2.5-VL names: hidden_size is the ViT width, out_hidden_size the merger output
                vision = Qwen2_5_VLVisionConfig(
                    embed_dim=need(vis, "hidden_size", "vision_config."),
                    hidden_size=vis.get("out_hidden_size", need(text, "hidden_size")),
                    intermediate_size=need(vis, "intermediate_size", "vision_config."),
                    fullatt_block_indexes=need(vis, "fullatt_block_indexes", "vision_config."),
                    window_size=need(vis, "window_size", "vision_config."),
                    tokens_per_second=need(vis, "tokens_per_second", "vision_config."),
                    hidden_act=vis.get("hidden_act", "silu"),
                    **common,
                )
        except (ValueError, TypeError) as exc:
            raise FormatError(f"{source}: {exc}") from None
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "max_position_embeddings", "rms_norm_eps")
        kwargs: dict[str, Any] = {k: need(text, k) for k in required}
        kwargs["num_key_value_heads"] = text.get("num_key_value_heads") or kwargs["num_attention_heads"]
        for key in _OPTIONAL:
            if text.get(key) is not None:
                kwargs[key] = text[key]
        kwargs["rope_theta"] = float(rope_theta)
        kwargs["mrope_section"] = list(rope["mrope_section"])
        # transformers' own default for Qwen2-VL text configs is untied.
        kwargs["tie_word_embeddings"] = bool(text.get("tie_word_embeddings", False))
        dtype = text.get("dtype") or text.get("torch_dtype") or "float32"
        kwargs["dtype"] = dtype if dtype in _DTYPES else "float32"
        eos = kwargs.get("eos_token_id")
        if isinstance(eos, list):  # generation-style lists: the first is the chat end token
            kwargs["eos_token_id"] = eos[0]
        try:
            return cls(vision_config=vision, **kwargs)
        except (ValueError, TypeError) as exc:  # the consistency checks of __post_init__, named with their file
            raise FormatError(f"{source}: {exc}") from None

    @classmethod
    def from_pretrained(cls, path: str) -> "Qwen2VLConfig":
        """Load `config.json` from a directory (or a direct path to the json file)."""
        file = os.path.join(path, CONFIG_NAME) if os.path.isdir(path) else path
        with open(file, encoding="utf-8") as f:
            return cls.from_dict(json.load(f), source=file)

    # ---- writing -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Flat Hub layout (what Qwen/Qwen2-VL-* and Qwen/Qwen2.5-VL-* ship), loadable by transformers 4.55
        `Qwen2VLConfig` / `Qwen2_5_VLConfig`."""
        out = {k: v for k, v in asdict(self).items() if k not in ("vision_config", "mrope_section", "dtype")}
        out.update(
            architectures=[_ARCHITECTURES[self.model_type]],
            model_type=self.model_type,
            rope_scaling={"type": "mrope", "mrope_section": list(self.mrope_section)},
            torch_dtype=self.dtype,
            use_sliding_window=False,
            max_window_layers=self.num_hidden_layers,
            vision_config=self._vision_dict(),
        )
        return dict(sorted(out.items()))

    def _vision_dict(self) -> dict[str, Any]:
        vision = asdict(self.vision_config)
        if self.model_type == "qwen2_5_vl":
            vision["out_hidden_size"] = vision.pop("hidden_size")
            vision["hidden_size"] = vision.pop("embed_dim")
        return dict(sorted(vision.items()))

    def save_pretrained(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")

    @classmethod
    def preset(cls, name: str) -> "Qwen2VLConfig":
        if name not in PRESETS:
            raise KeyError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
        return copy.deepcopy(PRESETS[name]())


def _vision(hidden_size: int) -> Qwen2VLVisionConfig:
    # Every published Qwen2-VL size shares the same 675M-parameter ViT; only the merger output differs.
    return Qwen2VLVisionConfig(hidden_size=hidden_size, **QWEN2_VL_VISION_DEFAULTS)


def _vision_2_5(hidden_size: int) -> Qwen2_5_VLVisionConfig:
    # Likewise one window-attention ViT for every published Qwen2.5-VL size.
    return Qwen2_5_VLVisionConfig(depth=32, embed_dim=1280, hidden_size=hidden_size, num_heads=16,
                                  intermediate_size=3420)


def _published(vision: Callable[[int], VisionConfig] = _vision, **overrides: Any) -> Qwen2VLConfig:
    base: dict[str, Any] = dict(
        max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1e6, mrope_section=[16, 24, 24],
        dtype="bfloat16",
    )
    base.update(overrides)
    base.setdefault("vision_config", vision(base["hidden_size"]))
    return Qwen2VLConfig(**base)


def _published_2_5(**overrides: Any) -> Qwen2VLConfig:
    return _published(_vision_2_5, max_position_embeddings=128000, **overrides)


_TINY_TEXT: dict[str, Any] = dict(
    vocab_size=151936, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1e6,
    mrope_section=[4, 6, 6], tie_word_embeddings=True,
)

# Decoder shapes that Qwen2-VL and Qwen2.5-VL share.
_TEXT_7B: dict[str, Any] = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False)
_TEXT_72B: dict[str, Any] = dict(vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                                 num_attention_heads=64, num_key_value_heads=8, tie_word_embeddings=False)

PRESETS: dict[str, Callable[[], Qwen2VLConfig]] = {
    "tiny": lambda: Qwen2VLConfig(
        **_TINY_TEXT,
        vision_config=Qwen2VLVisionConfig(depth=2, embed_dim=64, hidden_size=128, num_heads=4, mlp_ratio=2),
    ),
    "qwen2-vl-2b": lambda: _published(
        vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
        num_key_value_heads=2, tie_word_embeddings=True,
    ),
    "qwen2-vl-7b": lambda: _published(**_TEXT_7B),
    "qwen2-vl-72b": lambda: _published(**_TEXT_72B),
    # QVQ-72B-Preview is a Qwen2-VL-72B fine-tune; its config only raises the advertised context length.
    "qvq-72b-preview": lambda: _published(**_TEXT_72B, max_position_embeddings=128000),
    # Three ViT blocks: windowed, full, windowed; 56-pixel windows (2 x 2 merged tokens) so that small test
    # images already span several windows, some of them cut by the image border.
    "tiny-qwen2.5-vl": lambda: Qwen2VLConfig(
        **_TINY_TEXT,
        vision_config=Qwen2_5_VLVisionConfig(depth=3, embed_dim=64, hidden_size=128, num_heads=4,
                                             intermediate_size=96, fullatt_block_indexes=[1], window_size=56),
    ),
    "qwen2.5-vl-3b": lambda: _published_2_5(
        vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
        num_key_value_heads=2, tie_word_embeddings=True,
    ),
    "qwen2.5-vl-7b": lambda: _published_2_5(**_TEXT_7B),
    "qwen2.5-vl-32b": lambda: _published_2_5(
        vocab_size=152064, hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
        num_key_value_heads=8, tie_word_embeddings=False,
    ),
    "qwen2.5-vl-72b": lambda: _published_2_5(**_TEXT_72B),
}
