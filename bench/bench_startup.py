"""Issue 16: start-up from a Qwen2-VL-2B-shaped checkpoint (random bf16, HF safetensors in 5 shards, ~4.4 GB).

Sides, each in a fresh process that reports its own load time (after imports) and peak RSS (VmHWM):
- today: the eager path this project had before #16 (fp32 model built with its random init on every rank, then
  every tensor loaded into it with set_value) — one process only (under mp2 it would be 2 x that);
- lazy: `Qwen2VLForConditionalGeneration.from_pretrained` (lazy build, one tensor at a time) in fp32 and bf16;
- lazy mp2: 2 processes, lazy build, tensor-parallel plan, each rank reads only its slices (`load_sharded`);
- HF transformers `from_pretrained` on the same files, fp32 and bf16;
- lora_mp2_run: `qwen2vl-ap lora` on that checkpoint, mp2, 2 optimizer steps of short synthetic samples: each
  rank's peak RSS before the final save (the trainer writes it to memory_rank{r}.txt) against the planner's
  per-rank peak for the same config, and the step time.
The machine is shared: every child runs in its own cgroup-v1 memory cgroup (a limit, so an overrun kills only that
child) when the cgroup file system is writable, and a side waits for enough free memory before it starts.
"""
import common  # noqa: I001  (first: pins BLAS threads)

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "bench" / "_work" / "startup_2b"
BENCH = "startup"
BENCH_TIMEOUT = 1500  # read by run_all: 4.4 GB written once, then seven loads on a shared machine
GiB = 2**30
CGROUP = Path("/sys/fs/cgroup/memory/bench16_startup")
# Peak estimates used only to wait for free memory (and as the cgroup limit with headroom).
EXPECTED_GIB = {"today": 11.0, "lazy_fp32": 9.5, "lazy_bf16": 5.0, "lazy_mp2": 2 * 6.0, "hf_fp32": 10.0,
                "hf_bf16": 5.0, "lora_mp2_run": 2 * 8.0}
# The real-shape LoRA run: mp2 on 2 processes, 2 steps of one short synthetic sample per step.
LORA_RUN = {"tensor_parallel_degree": "2", "max_steps": "2", "max_seq_length": "256",
            "per_device_train_batch_size": "1", "gradient_accumulation_steps": "1", "evaluation_strategy": "no",
            "logging_steps": "1", "save_steps": "0", "dataloader_num_workers": "0", "warmup_steps": "0"}


def write_checkpoint(path: Path) -> int:
    import ml_dtypes
    import numpy as np

    from network.config import Qwen2VLConfig
    from network.modeling_qwen2_vl import Qwen2VLForConditionalGeneration
    from network.weights import is_linear_weight
    from network.writers import PlannedTensor, ShardedWriter

    bf16 = np.dtype(ml_dtypes.bfloat16)
    config = Qwen2VLConfig.preset("qwen2-vl-2b")
    shapes = {n: tuple(p.shape) for n, p in Qwen2VLForConditionalGeneration.lazy(config).state_dict().items()}
    hf = {n: tuple(reversed(s)) if is_linear_weight(n) else s for n, s in shapes.items()}
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    config.save_pretrained(str(path))
    writer = ShardedWriter(str(path), "safetensors", "model", [PlannedTensor(n, s, bf16) for n, s in hf.items()],
                           shard_size=10**9)
    pool = (np.random.default_rng(0).standard_normal(1 << 22, np.float32) * 0.02).astype(bf16)  # tiled: fast
    for name, shape in hf.items():
        writer.write(name, np.resize(pool, shape))
    writer.finish()
    return sum(math.prod(s) for s in shapes.values()) * 2


# ---- children -------------------------------------------------------------------------------------------------
def child(mode: str, model: str, out: str | None) -> None:
    from network.process_memory import peak_rss_bytes

    if mode.startswith("hf_"):
        import torch
        import transformers

        start = time.perf_counter()
        dtype = torch.float32 if mode == "hf_fp32" else torch.bfloat16
        transformers.Qwen2VLForConditionalGeneration.from_pretrained(model, torch_dtype=dtype)
        seconds = time.perf_counter() - start
    else:
        import paddle

        from network.config import Qwen2VLConfig
        from network.modeling_qwen2_vl import Qwen2VLForConditionalGeneration
        from network.weights import load_weights

        start = time.perf_counter()
        if mode == "today":
            model_obj = Qwen2VLForConditionalGeneration(Qwen2VLConfig.from_pretrained(model))  # eager fp32 + init
            load_weights(model_obj, model)
        elif mode in ("lazy_fp32", "lazy_bf16"):
            Qwen2VLForConditionalGeneration.from_pretrained(model, "float32" if mode == "lazy_fp32" else "bfloat16")
        elif mode == "lazy_mp2":
            import paddle.distributed as dist

            from autoparallel.mesh import build_mesh
            from autoparallel.parallelize import parallelize
            from autoparallel.sharded_load import load_sharded
            from placements.degrees import ParallelDegrees

            dist.init_parallel_env()
            start = time.perf_counter()
            lazy = Qwen2VLForConditionalGeneration.lazy(Qwen2VLConfig.from_pretrained(model))
            degrees = ParallelDegrees(tensor_parallel_degree=2)
            lazy, _ = parallelize(lazy, None, build_mesh(degrees, lazy.config), degrees)
            load_sharded(lazy, model)
            dist.barrier()
        seconds = time.perf_counter() - start
        del paddle
    result = {"seconds": seconds, "peak_bytes": peak_rss_bytes()}
    if out:
        rank = os.environ.get("PADDLE_TRAINER_ID", "0")
        Path(out, f"result.{rank}.json").write_text(json.dumps(result))
    else:
        print("RESULT " + json.dumps(result), flush=True)


def _cgroup(limit_gib: float) -> Path | None:
    try:
        CGROUP.mkdir(exist_ok=True)
        (CGROUP / "memory.limit_in_bytes").write_text(str(int(limit_gib * GiB)))
        return CGROUP
    except OSError:
        return None


def _wait_for_memory(need_gib: float, patience: float = 240) -> bool:
    deadline = time.time() + patience
    while psutil.virtual_memory().available < (need_gib + 1) * GiB:
        if time.time() > deadline:
            return False
        time.sleep(10)
    return True


def lora_run_overrides(model: Path, out_dir: Path) -> dict[str, str]:
    return {"model_name_or_path": str(model), "output_dir": str(out_dir / "run"),
            "synthetic_data_dir": str(out_dir / "data"), **LORA_RUN}


def lora_run_result(model: Path, out_dir: Path) -> dict:
    """Per-rank peaks the trainer wrote, the planner's per-rank peak of the same config, the step time."""
    from autoparallel.planning.setup import PlanOptions, plan_run
    from launch.config import load_run_config

    run = out_dir / "run"
    peaks = []
    for rank in (0, 1):
        lines = (run / f"memory_rank{rank}.txt").read_text().splitlines()
        peaks.append(float([x for x in lines if x.startswith("peak RSS")][-1].split(": ")[-1].split()[0]))
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    step_times = [r["step_time_s"] for r in records if "step_time_s" in r]
    cfg = load_run_config("lora", None, lora_run_overrides(model, out_dir))
    # The synthetic samples hold 56x56 or 112x112 images: plan for the larger (the default is max_pixels).
    planned = plan_run(cfg, PlanOptions(device="cpu", nproc_per_node=2, image_size=112)).memory
    saved = sum(f.stat().st_size for f in run.glob("checkpoint-*/dist_ckpt/*") if f.is_file())
    return {"per_rank_peak_gib": peaks, "peak_bytes": max(peaks) * GiB, "planned_bytes": planned.total,
            "planned_phase": planned.peak_phase, "step_time_s": step_times[-1], "seconds": step_times[-1],
            "dist_ckpt_bytes": saved}


def run_side(mode: str, model: Path) -> dict:
    need = EXPECTED_GIB[mode]
    if not _wait_for_memory(need):
        return {"skipped": f"less than {need + 1:.0f} GiB free for 4 min"}
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    me = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--model", str(model)]
    out_dir = WORK.parent / f"out_{mode}"
    if mode == "lora_mp2_run":
        shutil.rmtree(out_dir, ignore_errors=True)
        flags = [f"--{k}={v}" for k, v in lora_run_overrides(model, out_dir).items()]
        me = [sys.executable, "-m", "launch.cli", "lora", *flags]
    if mode == "lazy_mp2":
        shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.mkdir(parents=True)
        me = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir",
              str(out_dir / "log"), *me[1:], "--out", str(out_dir)]
    cgroup = _cgroup(need + 2)
    command = me if cgroup is None else ["sh", "-c", f'echo $$ > {cgroup}/tasks && exec "$@"', "sh", *me]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    rank_file = out_dir / "run" / "memory_rank1.txt"
    if mode == "lora_mp2_run" and rank_file.is_file() and "peak RSS" in rank_file.read_text():
        # The peaks are written after the last step, before the final save: a save that fails still measured.
        result = lora_run_result(model, out_dir)
        if proc.returncode != 0:
            result["final_save_failed"] = f"exit {proc.returncode}: {proc.stderr[-300:]}"
        shutil.rmtree(out_dir, ignore_errors=True)
        return result
    if proc.returncode != 0:
        return {"failed": f"exit {proc.returncode}: {proc.stderr[-400:]}"}
    if mode == "lazy_mp2":
        ranks = [json.loads(p.read_text()) for p in sorted(out_dir.glob("result.*.json"))]
        shutil.rmtree(out_dir, ignore_errors=True)
        return {"seconds": max(r["seconds"] for r in ranks), "peak_bytes": max(r["peak_bytes"] for r in ranks),
                "per_rank_peak_gib": [r["peak_bytes"] / GiB for r in ranks]}
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child")
    parser.add_argument("--model")
    parser.add_argument("--out")
    parser.add_argument("--sides", default="hf_bf16,lazy_bf16,hf_fp32,lazy_fp32,lazy_mp2,today,lora_mp2_run")
    parser.add_argument("--keep", action="store_true", help="keep bench/_work/startup_2b for another run")
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.model, args.out)
    if not (WORK / "model.safetensors.index.json").is_file():
        written = write_checkpoint(WORK)
        print(f"wrote {written / 1e9:.2f} GB of bf16 weights to {WORK}", flush=True)
    results = {}
    for mode in args.sides.split(","):
        results[mode] = run_side(mode, WORK)
        print(mode, results[mode], flush=True)
    try:
        CGROUP.rmdir()
    except OSError:
        pass
    name = "Qwen2-VL-2B shapes, random bf16 HF safetensors (5 shards, 4.4 GB)"
    ok = {m: r for m, r in results.items() if "peak_bytes" in r}
    hf_name = "HF transformers 4.55.4 from_pretrained"
    for dtype in ("fp32", "bf16"):
        ours, theirs = ok.get(f"lazy_{dtype}"), ok.get(f"hf_{dtype}")
        if ours and theirs:
            common.emit(common.Record(BENCH, f"load time, {name}, {dtype}, 1 process", "s", ours["seconds"],
                                      theirs["seconds"], f"{hf_name} ({dtype})", better="lower",
                                      extra={"ours": ours, "theirs": theirs}))
            note = ("HF keeps bf16 tensors as views of the memory-mapped files (no copy until touched); Paddle "
                    "holds its own copy, and Linear weights are transposed (Paddle [in, out] vs HF [out, in])"
                    if dtype == "bf16" else "")
            common.emit(common.Record(BENCH, f"peak RSS, {name}, {dtype}, 1 process", "GiB",
                                      ours["peak_bytes"] / GiB, theirs["peak_bytes"] / GiB,
                                      f"{hf_name} ({dtype})", better="lower", note=note))
    today = ok.get("today")
    for mode, label in (("lazy_fp32", "lazy, 1 process"), ("lazy_mp2", "lazy mp2, peak of the 2 ranks")):
        if mode in ok:
            common.emit(common.Record(
                BENCH, f"start-up peak RSS per rank, {name}, fp32, {label}", "GiB", ok[mode]["peak_bytes"] / GiB,
                today["peak_bytes"] / GiB if today else None,
                "today's eager path, 1 process (fp32 build + random init, then load)" if today else None,
                better="lower", extra=ok[mode],
                note="" if today else f"today's side: {results.get('today')}"))
    run = ok.get("lora_mp2_run")
    if run:
        common.emit(common.Record(
            BENCH, f"qwen2vl-ap lora mp2, {name}, 2 steps of 256 tokens: peak RSS per rank (max of 2)", "GiB",
            run["peak_bytes"] / GiB, run["planned_bytes"] / GiB, f"qwen2vl-ap plan, per rank ({run['planned_phase']})",
            better="lower", extra=run, note=f"step time {run['step_time_s']:.1f} s (fp32 on CPU); final dist_ckpt "
            f"{run['dist_ckpt_bytes'] / 2**20:.1f} MiB (adapters + their optimizer state)"
            + (f"; the final save failed: {run['final_save_failed']}" if "final_save_failed" in run else "")))
    for mode, result in results.items():
        if "peak_bytes" not in result:
            print(f"{mode}: {result}", flush=True)
    if not args.keep:
        shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()
