"""Issue #30 scale: what reading N annotation records costs each process, before and after the record index.

For N in 3k and 300k (`--sizes 3000,300000,3000000` for more) records of the PaddleMIX control's shape (JSONL, one
image each, unique text), a fresh process builds the run's `RecordStore` and reads one global batch (64 samples)
of conversations — what the parent and then every worker do before step 1. Measured: wall time and the process's
RSS growth (VmHWM after minus VmRSS before building). Sides: this tree cold (index and validation built), this tree
warm (what every worker and every later run does), and main's RecordStore (every process parses every record).
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


def make(root: Path, n: int) -> str:
    Image.new("RGB", (56, 56), (200, 0, 0)).save(root / "red.png")
    with open(root / "train.jsonl", "w") as f:
        for i in range(n):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"<image>What colour is circle {i}?"},
                                             {"role": "assistant", "content": "It is red."}],
                                "images": ["red.png"]}) + "\n")
    (root / "meta.json").write_text(json.dumps({"d": {"annotation": "train.jsonl", "root": str(root)}}))
    return str(root / "meta.json")


def run(tree: Path, meta: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    # cwd = the tree: `python -c` puts the working directory first on sys.path, ahead of PYTHONPATH
    out = subprocess.run([sys.executable, "-c", CHILD, meta], env=env, cwd=tree, capture_output=True, text=True,
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


if __name__ == "__main__":
    main()
