"""The communication ledger (autoparallel/comm_ledger.py) against an independent count (issue 29)."""
from __future__ import annotations

from pathlib import Path

from dist_utils import run_workers_ok

WORKER = Path(__file__).resolve().parents[1] / "helpers" / "comm_worker.py"


def test_ledger_dp2_gradient_all_reduce_is_the_ring_volume(tmp_path):
    """dp2, stage 0, untied tiny model: each rank's measured all-reduce bytes per step = a ring all-reduce of the
    summed gradient bytes, 2(n-1)/n x sum = sum at n = 2, up to gloo's message headers; the step's total sent
    (transport counters over all the rank's group sockets) adds only scalar reductions."""
    run = run_workers_ok(WORKER, 2, tmp_path)
    for rank, result in run.results.items():
        ring = 2 * (2 - 1) / 2 * result["grad_bytes"]
        for record in result["records"]:
            reduced = record["kinds"]["all_reduce"]
            assert reduced["calls"] >= result["tensors"], (rank, record)
            assert ring <= reduced["sent"] <= ring * 1.01, (rank, ring, record)
            assert ring <= reduced["received"] <= ring * 1.01, (rank, ring, record)
            assert record["sent"] <= ring * 1.02, (rank, ring, record)
            assert record["kinds"]["other"]["sent"] <= 0.01 * ring, (rank, record)
