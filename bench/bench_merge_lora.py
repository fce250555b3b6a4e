"""Issue 10 item 4: `qwen2vl-ap merge-lora` on the Qwen2-VL-2B preset's real shapes: wall time and peak RSS.

Base: every tensor of the 2B model (LLM + ViT, untied head, 2.2 B parameters) as random bf16 in HF-layout
safetensors shards of 1 GB (4.4 GB), written by ckpt_tools' own writer. Adapter: rank 16 / alpha 256 (the
PaddleMIX 2B LoRA preset) on every decoder projection (PADDLEMIX_TARGETS: 7 x 28 layers), fp32, in
`lora_model_state.pdparams`. The merge runs as `python -m launch.cli merge-lora` in a child process and writes
safetensors; its own summary gives the time and its peak RSS (VmHWM). There is no "theirs": PaddleMIX's
merge script loads the whole model and is not installed here; the note compares against the model size.
"""
import common  # noqa: I001  (first: pins BLAS threads)

import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import paddle

from network.lora import PADDLEMIX_TARGETS, LoraArgs, save_adapter, target_names
from network.writers import PlannedTensor, ShardedWriter
from network.config import Qwen2VLConfig
from network.modeling_qwen2_vl import Qwen2VLForConditionalGeneration
from network.weights import is_linear_weight

BENCH = "merge_lora"
BENCH_TIMEOUT = 300  # read by run_all: ~2-3 min (9 GB written and read on a shared disk)
REPO = Path(__file__).resolve().parent.parent
RANK, ALPHA = 16, 256
BF16 = np.dtype(ml_dtypes.bfloat16)


def write_case(root: Path) -> dict:
    """2B base (bf16 safetensors shards, HF layout) + rank-16 adapter; returns sizes for the record."""
    config = Qwen2VLConfig.preset("qwen2-vl-2b")
    with paddle.LazyGuard():  # names and shapes only, no parameter memory
        model = Qwen2VLForConditionalGeneration(config)
    shapes = {n: tuple(p.shape) for n, p in model.state_dict().items()}  # Paddle layout
    targets = target_names(model, PADDLEMIX_TARGETS)
    base = root / "base"
    base.mkdir()
    config.save_pretrained(str(base))
    hf = {n: tuple(reversed(s)) if is_linear_weight(n) else s for n, s in shapes.items()}
    writer = ShardedWriter(str(base), "safetensors", "model", [PlannedTensor(n, s, BF16) for n, s in hf.items()],
                           shard_size=10**9)
    pool = np.random.default_rng(0).standard_normal(1 << 22, np.float32).astype(BF16)  # tiled: fast to fill
    for name, shape in hf.items():
        writer.write(name, np.resize(pool, shape))
    writer.finish()
    rng = np.random.default_rng(1)
    state = {}
    for layer in targets:
        fan_in, fan_out = shapes[layer + ".weight"]
        state[layer + ".lora_A"] = paddle.to_tensor(rng.standard_normal((fan_in, RANK), np.float32) / 64)
        state[layer + ".lora_B"] = paddle.to_tensor(rng.standard_normal((RANK, fan_out), np.float32) / 64)
    save_adapter(root / "adapter", state, LoraArgs(lora_rank=RANK, lora_alpha=ALPHA))
    return {"base_bytes": sum(math.prod(s) * 2 for s in shapes.values()), "tensors": len(shapes),
            "adapted": len(targets), "adapter_params": sum(math.prod(v.shape) for v in state.values())}


def run_merge(root: Path) -> dict:
    cmd = [sys.executable, "-m", "launch.cli", "merge-lora", "--base", str(root / "base"), "--lora",
           str(root / "adapter"), "--out", str(root / "merged"), "--no_progress"]
    start, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=BENCH_TIMEOUT,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"merge-lora failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    out = proc.stdout
    summary = json.loads(out[out.index("{"):])
    summary["process_seconds"] = wall  # includes interpreter start and imports
    summary["cpu_user_seconds"] = after.ru_utime - before.ru_utime
    summary["cpu_system_seconds"] = after.ru_stime - before.ru_stime
    return summary


def import_baseline() -> int:
    code = "import json, ckpt_tools.lora_merge, ckpt_tools.cli; print(ckpt_tools.merge.peak_rss_bytes())"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    return int(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench_merge_lora.") as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        case = write_case(root)
        setup = time.perf_counter() - start
        summary = run_merge(root)
    baseline = import_baseline()
    largest = summary["largest_tensor_bytes"]
    peak = summary["peak_rss_bytes"]
    extra = {**case, "setup_seconds": round(setup, 1), "merged": summary["merged"], "bytes": summary["bytes"],
             "largest_tensor_bytes": largest, "import_baseline_rss_bytes": baseline, "peak_rss_bytes": peak,
             "merge_seconds": summary["seconds"], "process_seconds": round(summary["process_seconds"], 1),
             "cpu_user_seconds": round(summary["cpu_user_seconds"], 1),
             "cpu_system_seconds": round(summary["cpu_system_seconds"], 1),
             "throughput_gib_s": round(summary["bytes"] / 2**30 / summary["seconds"], 3)}
    shape = "Qwen2-VL-2B shapes, bf16 4.4 GB, rank-16 adapters on 196 decoder projections"
    common.emit(common.Record(
        bench=BENCH, metric=f"merge-lora wall time ({shape})", unit="s", better="lower",
        ours=round(summary["seconds"], 2), extra=extra,
        note=f"streams tensor by tensor: read + fp32 update in 32 MiB row blocks + write; "
             f"{extra['throughput_gib_s']} GiB/s of output; the process used {extra['cpu_user_seconds']} s user + "
             f"{extra['cpu_system_seconds']} s system CPU of its {extra['process_seconds']} s, the rest is waiting "
             f"on the shared disk"))
    common.emit(common.Record(
        bench=BENCH, metric=f"merge-lora peak RSS ({shape})", unit="GiB", better="lower",
        ours=round(peak / 2**30, 3), extra=extra,
        note=f"= import baseline {baseline / 2**30:.2f} GiB + {(peak - baseline) / 2**20:.0f} MiB "
             f"(largest tensor {largest / 2**20:.0f} MiB); a load-everything merge holds the "
             f"{case['base_bytes'] / 2**30:.1f} GiB model at least once"))


if __name__ == "__main__":
    main()
