"""Issue 10 item 2: state memory per rank (parameters, gradients, AdamW states) for each parallel layout.

2B: the Qwen2-VL-2B preset's real shapes (bf16 O2: bf16 parameters and gradients, fp32 moments and master
weights; frozen ViT dense on every rank), planned by `autoparallel.planning.memory.state_memory` — too big to
allocate 4-7 times over on this machine. Each layout's held bytes are set against its ideal: what the
layout should hold by `placements.layout` (the same numbers as `memory_report`'s ideal_* columns).

Validation: the planner is only worth printing if it equals what the engine allocates. tests/helpers/planner_worker.py
runs one real engine step (`parallelize` + `train_step`) of the tiny preset per layout — dp2, mp2,
sharding 1/2/3 on 2 processes, dp2 x mp2 on 4 — and returns `memory_report`'s held bytes per rank, which
must equal the plan byte for byte.
"""
import common  # noqa: I001  (first: pins BLAS threads)

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "helpers"))  # the multi-process harness and its workers live there

from placements.degrees import ParallelDegrees  # noqa: E402
from autoparallel.planning.memory import (DTYPE_BYTES, PlanSetup, StateMemory,  # noqa: E402
                                  Workload, state_memory)
from dist_utils import run_workers  # noqa: E402
from network.config import Qwen2VLConfig  # noqa: E402
from placements.qwen2_vl import layout, parameter_shapes  # noqa: E402
from planner_worker import DEGREES  # noqa: E402

BENCH = "memory_layouts"
BENCH_TIMEOUT = 360  # read by run_all: two launches (2 and 4 processes) of one tiny step per layout
WORKER = REPO / "tests" / "planner_worker.py"
LAYOUTS_2 = ["dp2", "mp2", "sharding1", "sharding2", "sharding3"]  # ZeRO-3 last (see tests/dist/test_planner.py)
LAYOUTS_4 = ["dp2mp2"]
KINDS = ("param", "grad", "optimizer")
GiB = 2**30


def ideal_state(config: Qwen2VLConfig, degrees: ParallelDegrees, dtype: str) -> StateMemory:
    """What the layout should hold per rank (`placements.layout`, the formula of memory_report's ideal_*)."""
    size, master = DTYPE_BYTES[dtype], (4 if dtype != "float32" else 0)
    mem = StateMemory()
    for name, shape in parameter_shapes(config).items():
        lay = layout(name, shape, config, degrees.dp, degrees.mp, degrees.sharding_stage)
        mem.param += int(np.prod(lay.local_shape)) * size
        if lay.grad_local_shape is not None:
            mem.grad += int(np.prod(lay.grad_local_shape)) * size
        if lay.state_local_shape is not None:
            mem.optimizer += int(np.prod(lay.state_local_shape)) * (8 + master) + 8  # moments (+master), beta pows
    return mem


def plan(config: Qwen2VLConfig, degrees: ParallelDegrees) -> StateMemory:
    return state_memory(PlanSetup(config, degrees, Workload(batch=1, seq_len=40), dtype=config.dtype))


def measure_tiny() -> tuple[dict[str, dict[int, dict]], float]:
    """layout -> rank -> memory_report totals after one engine step of the tiny preset; and the seconds."""
    start, measured = time.perf_counter(), {}
    with tempfile.TemporaryDirectory(prefix="bench_memory.") as tmp:
        for nproc, names in ((2, LAYOUTS_2), (4, LAYOUTS_4)):
            layouts = ",".join(f"tiny-{n}" for n in names)
            run = run_workers(WORKER, nproc, Path(tmp) / f"n{nproc}", ["--layouts", layouts],
                              timeout=BENCH_TIMEOUT - 60)
            if run.returncode != 0 or len(run.results) != nproc:
                raise RuntimeError(f"planner_worker x{nproc} failed ({run.returncode}):\n{run.logs()}")
            for rank, results in run.results.items():
                for name in names:
                    measured.setdefault(name, {})[rank] = results[f"tiny-{name}"]
    return measured, time.perf_counter() - start


def main() -> None:
    tiny, big = Qwen2VLConfig.preset("tiny"), Qwen2VLConfig.preset("qwen2-vl-2b")
    measured, seconds = measure_tiny()
    checks = {}
    for name, ranks in measured.items():
        degrees = ParallelDegrees(**DEGREES[name])
        planned, ideal = plan(tiny, degrees), ideal_state(tiny, degrees, tiny.dtype)
        match = all(all(r[k] == getattr(planned, k) for k in KINDS) for r in ranks.values())
        checks[name] = {"match": match, "planned": {k: getattr(planned, k) for k in KINDS},
                        "ideal": {k: getattr(ideal, k) for k in KINDS},
                        "measured_per_rank": {rank: {k: r[k] for k in KINDS} for rank, r in sorted(ranks.items())}}
        print(f"tiny {name:10} measured==plan: {match}  "
              + "  ".join(f"{k} {ranks[0][k]}/{getattr(planned, k)}/{getattr(ideal, k)}" for k in KINDS)
              + "  (measured/plan/ideal bytes, rank 0)", flush=True)
    matched = sum(c["match"] for c in checks.values())
    common.emit(common.Record(
        bench=BENCH, metric="tiny preset, layouts whose allocated state (memory_report, every rank) == plan",
        unit="layouts", better="higher", ours=matched, theirs=len(checks), theirs_name="layouts run",
        extra={"checks": checks, "seconds": round(seconds, 1)},
        note=f"one engine step per layout (tiny preset, fp32; {', '.join(LAYOUTS_2)} on 2 processes, "
             f"{', '.join(LAYOUTS_4)} on 4), then memory_report's held bytes per rank vs "
             f"autoparallel.planning.memory.state_memory: {matched}/{len(checks)} equal byte for byte on every rank "
             f"({seconds:.0f} s)"))

    single = plan(big, ParallelDegrees())
    for name in LAYOUTS_2 + LAYOUTS_4:
        degrees = ParallelDegrees(**DEGREES[name])
        held, ideal = plan(big, degrees), ideal_state(big, degrees, big.dtype)
        parts = ", ".join(f"{k} {getattr(held, k) / GiB:.2f}" for k in KINDS)
        vit = next(t.bytes for t in held.terms if t.name.startswith("frozen ViT"))
        why = [f"the frozen ViT ({vit / GiB:.2f} GiB) is dense on every rank"]
        why += {0: ["data parallel replicates everything else"] if degrees.dp > 1 else [],
                1: ["stage 1 shards only the optimizer states"], 2: ["stage 2 keeps parameters whole"],
                3: []}[degrees.sharding_stage]
        note = (f"2B {name} ({degrees.world_size} ranks), per rank {parts} GiB = {held.total / single.total:.0%} "
                f"of one process's {single.total / GiB:.2f} GiB, not 1/{degrees.world_size}: {'; '.join(why)}")
        common.emit(common.Record(
            bench=BENCH, metric=f"state per rank, Qwen2-VL-2B shapes bf16 O2, {name}", unit="GiB", better="lower",
            ours=round(held.total / GiB, 3), theirs=round(ideal.total / GiB, 3),
            theirs_name="ideal for the layout (placements.layout)", ratio=held.total / ideal.total,
            extra={"held": {k: getattr(held, k) for k in KINDS}, "ideal": {k: getattr(ideal, k) for k in KINDS},
                   "single_process_total": single.total, "terms": [t.__dict__ for t in held.terms]},
            note=note))


if __name__ == "__main__":
    main()
