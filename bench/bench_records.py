"""Issue #30 scale: what reading N annotation records costs each process, before and after the record index.

For N in 3k and 300k (`--sizes 3000,300000,3000000` for more) records of the PaddleMIX control's shape (JSONL, one
image each, unique text), a fresh process builds the run's `RecordStore` and reads one global batch (64 samples)
of conversations — what the parent and then every worker do before step 1. Measured: wall time and the process's
RSS growth (VmHWM after minus VmRSS before building). Sides: this tree cold (index and validation built), this tree
warm (what every worker and every later run does), and main's RecordStore (every process parses every record).

Length table (`--plan_sizes`, default 3k): the parent's one-off measuring of every record into the length table,
and one rank's planning time per step (global batch 64 over dp 2), planned from the table against probing each
sample of the global batch (tokenising it and reading its image header) as every rank did before.
"""
import common  # noqa: I001  (first: pins BLAS threads)

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

BENCH = "records"
BENCH_TIMEOUT = 3600
REPO = Path(__file__).resolve().parents[1]
MAIN = Path("/work/main")
CHILD = r"""
import json, sys, time
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
from autoparallel.data.records import RecordStore
import numpy as np
rss0, t0 = status("VmRSS:"), time.perf_counter()
store = RecordStore(sys.argv[1], seed=0)
batch = [store.conversation(int(i)) for i in np.random.default_rng(0).choice(len(store), 64, replace=False)]
print(json.dumps({"s": time.perf_counter() - t0, "rss": status("VmHWM:") - rss0, "n": len(store)}))
"""


CHILD_PLAN = r"""
import json, sys, time
from autoparallel.data import DataConfig, SFTDataLoader, SFTDataset
from network.processor import Qwen2VLProcessor
processor, config, steps = Qwen2VLProcessor.from_pretrained(None), DataConfig(meta_path=sys.argv[1]), 10
def plan_seconds(dataset):
    loader = SFTDataLoader(dataset, 32, 2, 0, num_workers=0)
    t0 = time.perf_counter()
    for step in range(steps):
        loader._plan(0, step)
    return (time.perf_counter() - t0) / steps
probed = plan_seconds(SFTDataset(config, processor))  # no table yet
t0 = time.perf_counter()
SFTDataset(config, processor).index_lengths()
build = time.perf_counter() - t0
print(json.dumps({"probe": probed, "table": plan_seconds(SFTDataset(config, processor)), "build": build}))
"""


def make(root: Path, n: int) -> str:
    Image.new("RGB", (56, 56), (200, 0, 0)).save(root / "red.png")
    with open(root / "train.jsonl", "w") as f:
        for i in range(n):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"<image>What colour is circle {i}?"},
                                             {"role": "assistant", "content": "It is red."}],
                                "images": ["red.png"]}) + "\n")
    (root / "meta.json").write_text(json.dumps({"d": {"annotation": "train.jsonl", "root": str(root)}}))
    return str(root / "meta.json")


def run(tree: Path, meta: str, child: str = CHILD) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    # cwd = the tree: `python -c` puts the working directory first on sys.path, ahead of PYTHONPATH
    out = subprocess.run([sys.executable, "-c", child, meta], env=env, cwd=tree, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    sizes = [3000, 300000]
    if "--sizes" in sys.argv:
        sizes = [int(s) for s in sys.argv[sys.argv.index("--sizes") + 1].split(",")]
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            meta = make(Path(tmp), n)
            cold, warm = run(REPO, meta), run(REPO, meta)
            old = run(MAIN, meta) if MAIN.is_dir() else None
            for side, result in (("cold index", cold), ("warm index", warm)):
                for metric, unit, key, scale in (("time to read the records and one global batch", "s", "s", 1),
                                                 ("RSS growth of the process", "GiB", "rss", 1 / 2**30)):
                    theirs = old[key] * scale if old else None
                    ours = result[key] * scale
                    common.emit(common.Record(
                        bench=BENCH, metric=f"{metric}, {n} records, {side}", unit=unit, better="lower",
                        ours=round(ours, 4), theirs=None if theirs is None else round(theirs, 4),
                        theirs_name="main before #30 (every process parses every record)",
                        ratio=None if not theirs else round(ours / theirs, 3), device=common.device(),
                        date=common.today(), extra={"samples": result["n"]}))
    plan_sizes = [3000]
    if "--plan_sizes" in sys.argv:
        plan_sizes = [int(s) for s in sys.argv[sys.argv.index("--plan_sizes") + 1].split(",")]
    for n in plan_sizes:
        with tempfile.TemporaryDirectory() as tmp:
            result = run(REPO, make(Path(tmp), n), CHILD_PLAN)
        common.emit(common.Record(
            bench=BENCH, metric=f"one rank's planning time per step (global batch 64), {n} records", unit="ms",
            better="lower", ours=round(result["table"] * 1e3, 3), theirs=round(result["probe"] * 1e3, 3),
            theirs_name="probing every sample of the global batch", ratio=round(result["table"] / result["probe"], 4),
            device=common.device(), date=common.today()))
        common.emit(common.Record(
            bench=BENCH, metric=f"parent's length table, built once per content and setting, {n} records", unit="s",
            better="lower", ours=round(result["build"], 3), theirs=None, theirs_name=None, ratio=None,
            device=common.device(), date=common.today()))


if __name__ == "__main__":
    main()
