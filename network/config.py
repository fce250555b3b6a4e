"""Qwen2-VL configuration: dataclasses, HF `config.json` reader/writer and the published presets."""
from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict, dataclass
from typing import Any, Callable

CONFIG_NAME = "config.json"
_DTYPES = {"float32", "bfloat16", "float16"}
_OPTIONAL = ("hidden_act", "attention_dropout", "image_token_id", "video_token_id", "vision_start_token_id",
             "vision_end_token_id", "bos_token_id", "eos_token_id", "pad_token_id")


@dataclass
class Qwen2VLVisionConfig:
    depth: int
    embed_dim: int
    hidden_size: int  # merger output width == LLM hidden size
    num_heads: int
    mlp_ratio: float
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    hidden_act: str = "quick_gelu"


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
    vision_config: Qwen2VLVisionConfig
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

    def __post_init__(self) -> None:
        if isinstance(self.vision_config, dict):
            self.vision_config = Qwen2VLVisionConfig(**self.vision_config)
        self.mrope_section = [int(s) for s in self.mrope_section]
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
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

        vis = need(d, "vision_config")
        vision = Qwen2VLVisionConfig(
            depth=need(vis, "depth", "vision_config."),
            embed_dim=need(vis, "embed_dim", "vision_config."),
            hidden_size=vis.get("hidden_size", need(text, "hidden_size")),
            num_heads=need(vis, "num_heads", "vision_config."),
            mlp_ratio=need(vis, "mlp_ratio", "vision_config."),
            in_channels=vis.get("in_channels", vis.get("in_chans", 3)),
            patch_size=vis.get("patch_size", vis.get("spatial_patch_size", 14)),
            spatial_merge_size=vis.get("spatial_merge_size", 2),
            temporal_patch_size=vis.get("temporal_patch_size", 2),
            hidden_act=vis.get("hidden_act", "quick_gelu"),
        )
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
        return cls(vision_config=vision, **kwargs)

    @classmethod
    def from_pretrained(cls, path: str) -> "Qwen2VLConfig":
        """Load `config.json` from a directory (or a direct path to the json file)."""
        file = os.path.join(path, CONFIG_NAME) if os.path.isdir(path) else path
        with open(file, encoding="utf-8") as f:
            return cls.from_dict(json.load(f), source=file)

    # ---- writing -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Flat Hub layout (what Qwen/Qwen2-VL-* ship), loadable by transformers 4.55 `Qwen2VLConfig`."""
        out = {k: v for k, v in asdict(self).items() if k not in ("vision_config", "mrope_section", "dtype")}
        out.update(
            architectures=["Qwen2VLForConditionalGeneration"],
            model_type="qwen2_vl",
            rope_scaling={"type": "mrope", "mrope_section": list(self.mrope_section)},
            torch_dtype=self.dtype,
            use_sliding_window=False,
            max_window_layers=self.num_hidden_layers,
            vision_config=asdict(self.vision_config),
        )
        return dict(sorted(out.items()))

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
    return Qwen2VLVisionConfig(depth=32, embed_dim=1280, hidden_size=hidden_size, num_heads=16, mlp_ratio=4)


def _published(**overrides: Any) -> Qwen2VLConfig:
    base: dict[str, Any] = dict(
        max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1e6, mrope_section=[16, 24, 24],
        dtype="bfloat16",
    )
    base.update(overrides)
    base.setdefault("vision_config", _vision(base["hidden_size"]))
    return Qwen2VLConfig(**base)


PRESETS: dict[str, Callable[[], Qwen2VLConfig]] = {
    "tiny": lambda: Qwen2VLConfig(
        vocab_size=151936, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1e6,
        mrope_section=[4, 6, 6], tie_word_embeddings=True,
        vision_config=Qwen2VLVisionConfig(depth=2, embed_dim=64, hidden_size=128, num_heads=4, mlp_ratio=2),
    ),
    "qwen2-vl-2b": lambda: _published(
        vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
        num_key_value_heads=2, tie_word_embeddings=True,
    ),
    "qwen2-vl-7b": lambda: _published(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, tie_word_embeddings=False,
    ),
    "qwen2-vl-72b": lambda: _published(
        vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80, num_attention_heads=64,
        num_key_value_heads=8, tie_word_embeddings=False,
    ),
    # QVQ-72B-Preview is a Qwen2-VL-72B fine-tune; its config only raises the advertised context length.
    "qvq-72b-preview": lambda: _published(
        vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80, num_attention_heads=64,
        num_key_value_heads=8, tie_word_embeddings=False, max_position_embeddings=128000,
    ),
}
