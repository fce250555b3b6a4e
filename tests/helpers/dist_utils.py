"""Launch N Paddle workers, collect their results as JSON/npz files, clean up by PID, with a timeout.

A worker script gets `--out DIR` and writes `DIR/result.{rank}.json` (and optional npz files) itself; an
exception caught inside a worker still exits 0, so `run_workers` trusts only the result files and the exit
code, and attaches the worker-log tails to any failure.
"""
from __future__ import annotations

import json
import subprocess
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from launch.launcher import SIMULATE_GPU_ENV, WorkerLaunch, exit_launched, simulate_gpu_if_requested, stop
from network.simulated_gpu import COUNTS_DIR_ENV

REPO = Path(__file__).resolve().parents[2]


@dataclass
class LaunchResult:
    returncode: int
    results: dict[int, dict]  # rank -> parsed result.{rank}.json
    log_dir: Path

    def log_tail(self, rank: int, lines: int = 40) -> str:
        path = self.log_dir / f"workerlog.{rank}"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "<no log>"

    def logs(self, lines: int = 40) -> str:
        ranks = sorted(int(p.suffix[1:]) for p in self.log_dir.glob("workerlog.*"))
        return "\n".join(f"--- workerlog.{r} ---\n{self.log_tail(r, lines)}" for r in ranks)


def run_workers(script: Path, nproc: int, out_dir: Path, args: list[str] = (), timeout: float = 480,
                simulate_gpu: bool = False) -> LaunchResult:
    """Run `script --out out_dir *args` on `nproc` local workers with the project's launcher; with `simulate_gpu`
    on the simulated GPU (network/simulated_gpu.py), each rank's kernel counts written to out_dir/kernels."""
    out_dir.mkdir(parents=True, exist_ok=True)
    log_dir = out_dir / "log"
    env = {}
    if simulate_gpu:
        (out_dir / "kernels").mkdir(exist_ok=True)
        env = {SIMULATE_GPU_ENV: "1", COUNTS_DIR_ENV: str(out_dir / "kernels")}
    job = WorkerLaunch(Path(script), ["--out", str(out_dir), *map(str, args)], nproc, log_dir, env=env)
    proc = job.start(cwd=out_dir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(proc)  # the launcher's session: exactly its workers
        raise TimeoutError(f"{Path(script).name} x{nproc} exceeded {timeout}s\n"
                           + LaunchResult(-1, {}, log_dir).logs()) from None
    results = {}
    for path in out_dir.glob("result.*.json"):
        results[int(path.stem.split(".")[1])] = json.loads(path.read_text())
    return LaunchResult(proc.returncode, results, log_dir)


def worker_entry(main: Callable[[], None]) -> NoReturn:
    """Worker side, its `__main__`: run `main`, then exit the way the project's launched ranks do
    (`exit_launched`), with Python's own codes (1 and the traceback for an uncaught exception)."""
    simulate_gpu_if_requested()
    try:
        main()
        code = 0
    except SystemExit as e:  # argparse
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001 - reported in the worker log like an uncaught exception
        traceback.print_exc()
        code = 1
    exit_launched(code)


def write_result(out_dir: str | Path, rank: int, result: dict) -> None:
    """Worker side: atomically publish this rank's result."""
    path = Path(out_dir) / f"result.{rank}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(path)


def simulated_kernels(out_dir: Path) -> Counter:
    """Kernel calls of a `run_workers(..., simulate_gpu=True)` launch, summed over its ranks."""
    total = Counter()
    for path in (out_dir / "kernels").glob("kernels.*.json"):
        total.update(json.loads(path.read_text()))
    return total


def console_kernels(console: str) -> Counter:
    """The kernel counts of the simulated GPU's one closing console line (network/simulated_gpu.report_line)."""
    line, = [ln for ln in console.splitlines() if ln.startswith("simulated GPU kernels: ")]
    listed = line.split(": ", 1)[1]
    return Counter({} if listed == "none" else {k: int(n) for k, n in (p.rsplit(" ", 1) for p in listed.split(", "))})


def run_workers_ok(script: Path, nproc: int, out_dir: Path, args: list[str] = (), timeout: float = 600,
                   simulate_gpu: bool = False) -> LaunchResult:
    """`run_workers` that fails the test (with the worker logs) unless every rank finished and reported."""
    run = run_workers(script, nproc, out_dir, args, timeout=timeout, simulate_gpu=simulate_gpu)
    assert run.returncode == 0 and len(run.results) == nproc, (
        f"launcher exit {run.returncode}, {len(run.results)} of {nproc} ranks reported\n{run.logs()}")
    return run


def launch_layouts(worker: Path, tmp_path_factory, groups) -> dict[str, dict]:
    """One launch of tests/helpers/parallel_worker.py-style `worker` per (nproc, [(name, degrees kwargs, mode)])
    group, training its layouts back to back: name -> ranks' results, degrees, mode, rank 0's parameters."""
    import numpy as np

    runs = {}
    for nproc, layouts in groups:
        out = tmp_path_factory.mktemp(f"np{nproc}")
        # Several layouts back to back: minutes on a shared 2-core machine.
        run = run_workers_ok(worker, nproc, out, ["--layouts", ",".join(name for name, _, _ in layouts)], timeout=1800)
        for name, kw, mode in layouts:
            runs[name] = {"ranks": {r: res[name] for r, res in run.results.items()}, "degrees": kw,
                          "params": dict(np.load(out / f"params.{name}.npz")), "mode": mode}
    return runs
