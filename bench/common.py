"""Shared benchmark helpers: thread pinning, interleaved timing, matmul peak, and the result record.

Import this module FIRST in every bench script (before numpy, paddle or torch): it pins the BLAS/OpenMP thread
pools through the environment, which those libraries read only when they load.

Writing a benchmark: drop `bench/bench_<name>.py` next to this file. `bench/run_all.py` runs every such script in
a fresh subprocess (cwd = repo root, env BENCH_THREADS set) and collects the lines it prints that start with
`BENCH_RECORD ` followed by one JSON object — use `emit(Record(...))`. Optional: a line
`BENCH_TIMEOUT = <seconds>` anywhere in the script raises or lowers its time limit (default in run_all).

Record schema (one JSON object per result row; `ratio` is always ours / theirs):
    bench        str    script short name, e.g. "train_step" for bench_train_step.py
    metric       str    what is measured, e.g. "tokens/s, fwd+bwd+AdamW (small preset)"
    unit         str    e.g. "tokens/s", "images/s", "s", "GiB"
    better       str    "higher" | "lower": which direction of `ours` is good
    ours         float | null
    theirs       float | null   the alternative a user would pick (null when there is none)
    theirs_name  str | null     e.g. "HF transformers 4.55.4 (torch 2.13.0 CPU, eager)"
    ratio        float | null   ours / theirs
    device       str    e.g. "CPU AMD EPYC, 2 cores, 1 thread per side"
    date         str    ISO date of the measurement
    note         str    optional: why we are ahead/behind, what would close the gap, caveats
    extra        dict   optional: raw samples, sizes, sanity values (written to results.json, not the table)

Timing: `interleave` alternates the sides (A B, B A, A B, ...) after warm-up and every summary uses the median,
so drift from other jobs on the shared CPU hits both sides alike.
"""
from __future__ import annotations

import os

THREADS = int(os.environ.get("BENCH_THREADS", "1"))
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = str(THREADS)

import datetime  # noqa: E402  (after the environment is pinned)
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from typing import Any, Callable  # noqa: E402

import numpy as np  # noqa: E402

RECORD_PREFIX = "BENCH_RECORD "


def pin_threads() -> None:
    """Set the intra-op thread count of every already-imported framework to THREADS (call after importing)."""
    if "paddle" in sys.modules:
        from paddle.base import core

        core.set_num_threads(THREADS)  # MKL/OpenBLAS math threads of Paddle's CPU kernels
    if "torch" in sys.modules:
        import torch

        torch.set_num_threads(THREADS)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def device() -> str:
    return f"CPU {cpu_model()}, {os.cpu_count()} cores, {THREADS} thread{'s' if THREADS > 1 else ''} per side"


def today() -> str:
    return datetime.date.today().isoformat()


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleave(sides: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each side, `repeats` each after `warmup` calls each; the order alternates per round."""
    names = list(sides)
    for _ in range(warmup):
        for name in names:
            sides[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            times[name].append(timed(sides[name]))
    return times


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


class MatmulPeak:
    """fp32 sgemm GFLOP/s of numpy and every imported framework at THREADS threads; the best is the "peak".

    Pass an instance as one more side to `interleave`: it then samples the peak in every round, next to the
    steps it normalises, so MFU = achieved / peak is measured against the same neighbours on a shared CPU.
    """

    def __init__(self, n: int = 1024, reps: int = 3):
        rng = np.random.default_rng(0)
        a, b = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
        self.flop, self.reps = 2 * n**3, reps
        self.sides: dict[str, Callable[[], Any]] = {"numpy": lambda: a @ b}
        if "paddle" in sys.modules:
            import paddle

            pa, pb = paddle.to_tensor(a), paddle.to_tensor(b)
            self.sides["paddle"] = lambda: paddle.matmul(pa, pb)
        if "torch" in sys.modules:
            import torch

            ta, tb = torch.from_numpy(a), torch.from_numpy(b)
            self.sides["torch"] = lambda: ta @ tb
        self.samples: dict[str, list[float]] = {name: [] for name in self.sides}

    def __call__(self) -> None:
        for name, fn in self.sides.items():
            fn()
            self.samples[name].append(self.flop / min(timed(fn) for _ in range(self.reps)) / 1e9)

    def summary(self) -> dict[str, float]:
        """Median GFLOP/s per library over the calls so far, and "peak" = the best library."""
        if not self.samples["numpy"]:
            self()
        out = {name: median(v) for name, v in self.samples.items()}
        out["peak"] = max(out.values())
        return out


@dataclass
class Record:
    bench: str
    metric: str
    unit: str
    ours: float | None
    theirs: float | None = None
    theirs_name: str | None = None
    better: str = "higher"
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    device: str = field(default_factory=device)
    date: str = field(default_factory=today)
    ratio: float | None = None

    def __post_init__(self) -> None:
        if self.better not in ("higher", "lower"):
            raise ValueError(f"better must be 'higher' or 'lower', got {self.better!r}")
        if self.ratio is None and self.ours is not None and self.theirs:
            self.ratio = self.ours / self.theirs


def emit(record: Record) -> None:
    """Print the record on its own line for run_all (and a human reading the log)."""
    print(RECORD_PREFIX + json.dumps(asdict(record), default=float), flush=True)
