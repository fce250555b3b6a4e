"""MKL's fast sgemm on AMD CPUs for Paddle's CPU build.

The MKL inside Paddle's CPU wheel (MKLML 2019) picks a slow generic sgemm path on non-Intel CPUs;
`MKL_DEBUG_CPU_TYPE=5` selects its AVX2 kernels (bench/bench_train_step_mkl_avx2.py measures the gap). MKL reads
the variable at its first call, so `network/__init__.py` runs `prefer_mkl_avx2()` on import: a user importing
the model directly gets it as well as the CLI, whose workers inherit the environment.
"""
from __future__ import annotations

import importlib.metadata
import os


def _amd_cpu() -> bool:
    try:
        with open("/proc/cpuinfo") as handle:
            return "AuthenticAMD" in handle.read(4096)
    except OSError:
        return False


def prefer_mkl_avx2() -> bool:
    """Set MKL_DEBUG_CPU_TYPE=5 on an AMD CPU with Paddle's CPU build; never overrides a value the user set.
    Returns whether it set the variable."""
    if "MKL_DEBUG_CPU_TYPE" in os.environ or not _amd_cpu() or not _paddle_cpu_wheel():
        return False
    os.environ["MKL_DEBUG_CPU_TYPE"] = "5"
    return True


def _paddle_cpu_wheel() -> bool:
    """Whether the installed Paddle is the CPU wheel, read from package metadata: importing paddle here would make
    every `import network` (and the paddle-free plan modules that read its config) load all of Paddle."""
    try:
        importlib.metadata.version("paddlepaddle")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True
