"""Issue #30 scale: what reading N annotation records costs each process, before and after the record index.

For N in 3k and 300k (`--sizes 3000,300000,3000000` for more) records of the PaddleMIX control's shape (JSONL, one
image each, unique text), a fresh process builds the run's `RecordStore` and reads one global batch (64 samples)
of conversations — what the parent and then every worker do before step 1. Measured: wall time and the process's
RSS growth (VmHWM after minus VmRSS before building). Sides: this tree cold (index and validation built), this tree
warm (what every worker and every later run does), and main's RecordStore (every process parses every record).

Length table (`--plan_sizes`, default 3k): the parent's one-off measuring of every record into the length table,
and one rank's planning time per step (global batch 64 over dp 2), planned from the table against probing each
sample of the global batch (tokenising it and reading its image header) as every rank did before.

Training start-up (`--sft_sizes`, default 3k and 300k): a real `qwen2vl-ap sft` (tiny preset, 2 processes,
max_steps 1, batch 2 x 128 tokens, no evaluation, no checkpoint but the final one) on N records, cold (a fresh
dataset: index, validation and length table built by the parent) then warm (later runs on the same files, three
rounds interleaved over the sizes; the fastest first step and the highest peaks): seconds from starting the
command to the first step's metrics line, and peak RSS (VmHWM) of the parent (polled from /proc) and of each
worker's training process (its memory_rank file, written after the last step).
"""
import common  # noqa: I001  (first: pins BLAS threads)

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
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


SFT = ["--model_name_or_path", "tiny", "--nproc_per_node", "2", "--max_steps", "1", "--per_device_train_batch_size",
       "2", "--max_seq_length", "128", "--evaluation_strategy", "no", "--logging_steps", "1", "--save_steps", "0",
       "--warmup_steps", "0"]
WARM_ROUNDS = 3


def _vm_hwm(pid: int) -> int:
    """Peak RSS (bytes) of a live process; 0 once it has exited."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return 0


def sft_start(meta: str, out: Path) -> dict:
    """One `qwen2vl-ap sft` run: seconds to the first step's metrics line, parent and worker peak RSS (bytes)."""
    shutil.rmtree(out, ignore_errors=True)
    metrics = out / "metrics.jsonl"
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "launch.cli", "sft", "--meta_path", meta, "--output_dir",
                             str(out), *SFT], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first_step = parent = 0
    while proc.poll() is None:
        parent = max(parent, _vm_hwm(proc.pid))
        if not first_step and metrics.is_file() and '"step": 1' in metrics.read_text():
            first_step = time.perf_counter() - t0
        time.sleep(0.05)
    if proc.returncode != 0 or not first_step:
        raise RuntimeError(f"qwen2vl-ap sft failed (exit {proc.returncode}): {proc.stderr.read()[-600:]}")
    workers = [float(next(x for x in (out / f"memory_rank{r}.txt").read_text().splitlines()
                          if x.startswith("peak RSS")).split(": ")[-1].split()[0]) * 2**30 for r in (0, 1)]
    return {"first_step": first_step, "parent": parent, "workers": workers}


def startup_runs(sizes: list[int]) -> dict[int, dict[str, dict]]:
    """Per size: the cold run, then the warm runs interleaved over the sizes (WARM_ROUNDS rounds, so a busy spell
    of the shared machine hits every size): the fastest first step and the highest peaks of them."""
    with tempfile.TemporaryDirectory() as tmp:
        metas = {}
        for n in sizes:
            (Path(tmp) / str(n)).mkdir()
            metas[n] = make(Path(tmp) / str(n), n)
        startup = {n: {"cold index": sft_start(metas[n], Path(tmp) / "run")} for n in sizes}
        warm: dict[int, list[dict]] = {n: [] for n in sizes}
        for _ in range(WARM_ROUNDS):
            for n in sizes:
                warm[n].append(sft_start(metas[n], Path(tmp) / "run"))
    for n, runs in warm.items():
        startup[n]["warm index"] = {"first_step": min(r["first_step"] for r in runs),
                                    "parent": max(r["parent"] for r in runs),
                                    "workers": [max(r["workers"][k] for r in runs) for k in (0, 1)],
                                    "first_steps": [r["first_step"] for r in runs]}
        print(n, json.dumps(startup[n]), flush=True)
    return startup


def main() -> None:
    sizes = [3000, 300000]
    if "--sizes" in sys.argv:
        sizes = [int(s) for s in sys.argv[sys.argv.index("--sizes") + 1].split(",") if s]
    sft_sizes = [3000, 300000]
    if "--sft_sizes" in sys.argv:
        sft_sizes = [int(s) for s in sys.argv[sys.argv.index("--sft_sizes") + 1].split(",") if s]
    startup = startup_runs(sft_sizes)
    base = startup.get(min(startup, default=0))
    for n, sides in startup.items():
        for side, result in sides.items():
            ref = base[side]
            for metric, unit, ours, theirs in (
                    ("time to the first training step", "s", result["first_step"], ref["first_step"]),
                    ("peak RSS of the parent", "GiB", result["parent"] / 2**30, ref["parent"] / 2**30),
                    ("peak RSS of a worker (max of 2)", "GiB", max(result["workers"]) / 2**30,
                     max(ref["workers"]) / 2**30)):
                common.emit(common.Record(
                    bench=BENCH, metric=f"qwen2vl-ap sft (tiny, 2 processes, 1 step), {metric}, {n} records, {side}",
                    unit=unit, better="lower", ours=round(ours, 3), theirs=round(theirs, 3),
                    theirs_name=f"the same, {min(startup)} records", ratio=round(ours / theirs, 3),
                    device=common.device(), date=common.today(), extra={"worker_peaks": result["workers"]}))
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
        plan_sizes = [int(s) for s in sys.argv[sys.argv.index("--plan_sizes") + 1].split(",") if s]
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
