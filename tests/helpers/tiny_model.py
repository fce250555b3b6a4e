"""The tiny Qwen2-VL saved for CLI tests: real tokenizer and vocabulary, O(1)-scale random weights."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import paddle

from network.config import Qwen2VLConfig
from network.modeling_qwen2_vl import Qwen2VLForConditionalGeneration
from network.processor import Qwen2VLProcessor


def tiny_model(seed: int = 0) -> Qwen2VLForConditionalGeneration:
    """O(1)-scale weights: decisive argmaxes, so padded and unpadded runs cannot flip a near-tie."""
    paddle.seed(seed)
    model = Qwen2VLForConditionalGeneration(Qwen2VLConfig.preset("tiny"))
    rng = np.random.default_rng(seed)
    for name, p in model.named_parameters():
        scale = np.prod(p.shape[1:]) ** -0.5 if p.ndim >= 2 else 0.1
        mean = 1.0 if "norm" in name and name.endswith("weight") else 0.0
        p.set_value(rng.normal(mean, scale, p.shape).astype("float32"))
    return model


def save_tiny_model(directory: Path, format: str = "safetensors", processor_files: bool = True,
                    model: Qwen2VLForConditionalGeneration | None = None) -> Qwen2VLForConditionalGeneration:
    """`directory` as `from_pretrained` reads it; with `processor_files`, the tokenizer/processor files too."""
    model = model or tiny_model()
    model.save_pretrained(str(directory), format=format)
    if processor_files:
        Qwen2VLProcessor.from_pretrained(None).save_pretrained(str(directory))
    return model
