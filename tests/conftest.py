"""Every process a test starts inherits one BLAS setting, so single-process references and multi-process runs
use the same sgemm kernels (importing `network` switches MKL to AVX2 on AMD CPUs, which changes rounding)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "helpers"))

import network  # noqa: E402,F401  (sets MKL_DEBUG_CPU_TYPE before any matmul; inherited by workers)
