"""What the current device can run: the one place the bf16/flash-attention gates read.

Under the simulated GPU (network/simulated_gpu.py, switched on by `QWEN2VL_AP_SIMULATE_GPU=1`) the gates report a
bf16-capable sm90 device while every tensor stays on the CPU: fp32 stands in for bf16 (`allocation_dtype`,
`kernel_dtypes`), because the CPU build has no bf16 matmul, and weights count as device memory only when created
on the expected place (`weights_zero_copy`)."""
from __future__ import annotations

import weakref

import paddle

SIMULATED_CAPABILITY = (9, 0)
_simulating = False
# Tensors a GPU build would hold in host memory (DLPack zero-copies of numpy arrays), by data pointer; weak, so
# an address freed and reused by another allocation is not mistaken for one.
_host_tensors: "weakref.WeakValueDictionary[int, paddle.Tensor]" = weakref.WeakValueDictionary()


class HostResidentError(RuntimeError):
    """A parameter or buffer that would live in host memory on a GPU build (simulated GPU only)."""


def simulate(on: bool) -> None:
    """Switch the simulated device on or off (network/simulated_gpu.py installs the kernels that go with it)."""
    global _simulating
    _simulating = on


def simulating() -> bool:
    return _simulating


def on_gpu() -> bool:
    """The current place is a CUDA GPU (a CUDA build can also run on CPU; other builds never use CUDA kernels)."""
    if _simulating:
        return True
    return paddle.is_compiled_with_cuda() and paddle.framework._current_expected_place().is_gpu_place()


def bf16_supported() -> bool:
    """bf16 kernels, flash attention included, on the current device: a CUDA GPU of compute capability >= 8.0
    (Ampere). `paddle.amp.is_bfloat16_supported` also checks the CUDA version; flash attention needs sm80 itself."""
    return flash_attention_supported() and (_simulating or bool(paddle.amp.is_bfloat16_supported()))


def flash_attention_supported() -> bool:
    """Paddle's flash-attention kernels: CUDA GPUs of compute capability >= 8.0."""
    return on_gpu() and device_capability()[0] >= 8


def device_capability() -> tuple[int, int]:
    return SIMULATED_CAPABILITY if _simulating else tuple(paddle.device.cuda.get_device_capability())


def allocation_dtype(dtype: str) -> str:
    """The dtype a model built "in `dtype`" allocates: `dtype`, except bf16/fp16 under the simulated GPU (fp32
    arithmetic, since the CPU build has no half-precision matmul)."""
    return "float32" if _simulating and dtype in ("bfloat16", "float16") else dtype


def kernel_dtypes() -> tuple:
    """q/k/v dtypes the fused attention kernels take: half precision, and fp32 as the simulated GPU's bf16."""
    half = (paddle.float16, paddle.bfloat16)
    return half + (paddle.float32,) if _simulating else half


def weights_zero_copy() -> bool:
    """Loaded weights may keep the host memory of their numpy arrays (DLPack) only when the expected place is the
    CPU; on a GPU place that would leave them in host memory, copied to the device at every op that reads them."""
    return not _simulating and paddle.framework._current_expected_place().is_cpu_place()


def note_host_tensor(tensor: paddle.Tensor) -> paddle.Tensor:
    """Record a tensor created in host memory (simulated GPU): `check_device_resident` then refuses it."""
    if _simulating:
        _host_tensors[tensor.data_ptr()] = tensor
    return tensor


def check_device_resident(name: str, value: paddle.Tensor) -> None:
    """Fail when `value` (or a distributed tensor's local value) would be host memory on a GPU build."""
    if not _simulating:
        return
    local = value._local_value() if value.is_dist() else value
    if local._is_initialized() and local.data_ptr() in _host_tensors:
        raise HostResidentError(f"simulated GPU: weight '{name}' would live in host memory on a GPU build "
                                f"(created from a numpy array by DLPack zero-copy on the CPU place)")


# ---- allocator counters -----------------------------------------------------------------------------------
# Exact byte counters of the allocator that holds the tensors: the CUDA device's on a GPU, else Paddle's host
# allocator (the CPU build, and the simulated GPU whose tensors stay on the host). What the planner's per-rank
# figures model: live tensors only, without the allocator's caching, the Python heap or the runtime that RSS holds.
def allocator() -> str:
    """"device" (CUDA) or "host": whose counters `allocated_bytes` and `peak_allocated_bytes` read."""
    return "device" if not _simulating and on_gpu() else "host"


def allocated_bytes() -> int:
    if allocator() == "device":
        return paddle.device.cuda.memory_allocated()
    return paddle.base.core.host_memory_stat_current_value("Allocated", 0)


def peak_allocated_bytes() -> int:
    """The most allocated at once since the last `reset_peak_allocated` (or the process start)."""
    if allocator() == "device":
        return paddle.device.cuda.max_memory_allocated()
    return paddle.base.core.host_memory_stat_peak_value("Allocated", 0)


def reset_peak_allocated() -> None:
    """Restart the peak from what is allocated now."""
    if allocator() == "device":
        paddle.device.cuda.reset_max_memory_allocated()
    else:
        paddle.base.core.host_memory_stat_reset_peak_value("Allocated", 0)
