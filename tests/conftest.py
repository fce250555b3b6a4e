"""Every process a test starts inherits one BLAS setting, so single-process references and multi-process runs
use the same sgemm kernels (cpu_compat switches MKL to AVX2 on AMD CPUs, which changes rounding)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "helpers"))

from autoparallel.cpu_compat import prefer_mkl_avx2  # noqa: E402

prefer_mkl_avx2()
