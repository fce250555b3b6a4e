"""What the current device can run: the one place the bf16/flash-attention gates read."""
from __future__ import annotations

import paddle


def on_gpu() -> bool:
    """The current place is a CUDA GPU (a CUDA build can also run on CPU; other builds never use CUDA kernels)."""
    return paddle.is_compiled_with_cuda() and paddle.framework._current_expected_place().is_gpu_place()


def bf16_supported() -> bool:
    """bf16 kernels, flash attention included, on the current device: a CUDA GPU of compute capability >= 8.0
    (Ampere). `paddle.amp.is_bfloat16_supported` also checks the CUDA version; flash attention needs sm80 itself."""
    return flash_attention_supported() and bool(paddle.amp.is_bfloat16_supported())


def flash_attention_supported() -> bool:
    """Paddle's flash-attention kernels: CUDA GPUs of compute capability >= 8.0."""
    return on_gpu() and paddle.device.cuda.get_device_capability()[0] >= 8
