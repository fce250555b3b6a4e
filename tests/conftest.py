"""Every process a test starts inherits one BLAS setting, so single-process references and multi-process runs
use the same sgemm kernels (importing `network` switches MKL to AVX2 on AMD CPUs, which changes rounding)."""
import sys
from pathlib import Path

HELPERS = Path(__file__).resolve().parent / "helpers"
sys.path.insert(0, str(HELPERS))

import network  # noqa: E402,F401  (sets MKL_DEBUG_CPU_TYPE before any matmul; inherited by workers)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from dist_utils import LaunchResult, run_workers_ok  # noqa: E402
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


@pytest.fixture(scope="session")
def single_process_reference(tmp_path_factory) -> dict:
    """The single-process reference of every parallel_cases mode, trained once per session for all the tests that
    compare a parallel layout with it (layouts, pipeline, sequence parallel): mode -> {"losses", "params"} (every
    parameter after training), "initial" -> the initial weights, "grad_norm" -> the frozen mode's step-1 gradient
    norm before clipping. One launched process, so it gets the launcher's thread pinning like the layouts."""
    from parallel_cases import MODES

    out = tmp_path_factory.mktemp("reference")
    run = run_workers_ok(HELPERS / "parallel_worker.py", 1, out, ["--reference"], timeout=1200)
    refs = {mode: {"losses": run.results[0][mode], "params": dict(np.load(out / f"reference.{mode}.npz"))}
            for mode in MODES}
    refs["initial"] = dict(np.load(out / "initial.npz"))
    refs["grad_norm"] = run.results[0]["grad_norm"]
    return refs


@pytest.fixture(scope="session")
def pp_sp_launch(tmp_path_factory) -> tuple[LaunchResult, Path]:
    """One 2-process launch of tests/helpers/pp_sp_worker.py for the sequence-parallel and pipeline tests: the
    sp layouts, then the pp layouts and the dp2 resume of the pp2 checkpoint; its result and output directory."""
    out = tmp_path_factory.mktemp("pp_sp2")
    run = run_workers_ok(HELPERS / "pp_sp_worker.py", 2, out,
                         ["--sp", "mp2,mp2sp", "--pp", "pp2,pp2_m4", "--resume-dp2"], timeout=1800)
    return run, out


@pytest.fixture(scope="session")
def frozen_reference(single_process_reference) -> dict:
    """The frozen mode (ViT frozen, LLM trains) of `single_process_reference`: its losses, its trainable
    parameters after training and step 1's gradient norm."""
    from parallel_cases import MODES

    frozen = single_process_reference["frozen"]
    return {"losses": frozen["losses"], "grad_norm": single_process_reference["grad_norm"],
            "params": {k: v for k, v in frozen["params"].items() if MODES["frozen"].trains(k)}}
