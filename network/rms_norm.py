"""RMSNorm as Qwen2 uses it (decoder layers, and the Qwen2.5-VL vision blocks and merger)."""
from __future__ import annotations

import paddle
import paddle.nn as nn


class Qwen2RMSNorm(nn.Layer):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = self.create_parameter([hidden_size], default_initializer=nn.initializer.Constant(1.0))

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        # Normalise in fp32, cast back before the weight multiply (reference order; matters in bf16).
        x32 = x.astype("float32")
        x32 = x32 * paddle.rsqrt(paddle.square(x32).mean(-1, keepdim=True) + self.eps)  # pow(2) is ~60x slower on CPU
        # Under bf16 O2 the input can be fp32 (the embedding stays fp32) while the weight is bf16: return the weight's
        # half dtype then, as PaddleMIX does, so the projections after it run in bf16.
        half = self.weight.dtype in (paddle.float16, paddle.bfloat16)
        return self.weight * x32.astype(self.weight.dtype if half else x.dtype)
