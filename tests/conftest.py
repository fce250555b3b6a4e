"""Every process a test starts inherits one BLAS setting, so single-process references and multi-process runs
use the same sgemm kernels (importing `network` switches MKL to AVX2 on AMD CPUs, which changes rounding)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "helpers"))

import network  # noqa: E402,F401  (sets MKL_DEBUG_CPU_TYPE before any matmul; inherited by workers)

import pytest  # noqa: E402

from network.log import logger  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_project_logger():
    """A test that runs a command in-process installs the project's console handler on that test's (captured)
    stderr and stops propagation. Later tests would then log into a closed stream ("--- Logging error ---") and
    caplog would see nothing: every test starts and ends with the logger as Python creates it."""
    yield
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    logger.propagate = True
    logger.setLevel("NOTSET")
