"""Issue 29: communication and memory per rank and step, measured against the planner, per layout.

Each layout trains the tiny preset for STEPS steps through `qwen2vl-ap sft` (or `lora`) on synthetic data. The
bytes are rank 0's `comm_bytes` of metrics.jsonl (the communication ledger: the kernel's TCP counters of the
rank's gloo sockets), averaged over the steps after the first; planned = the planner's ideal bytes that rank
sends per step on CPU (`planned_sent_by_kind` of `communication(cpu=True)`: ring volumes, reduce-scatters as
all-reduces as gloo runs them). The GPU column takes the CPU-only workarounds out of the measurement (a ring
reduce-scatter sends half the all-reduce cpu_compat runs) and divides by the GPU plan. Memory: rank 0's peak
allocated bytes during the steps (Paddle's host allocator, `peak_allocated_bytes` of metrics.jsonl) against the
planner's CPU step total (state + the step's peak). Both plans are for the workload each step actually ran
(`step_workload`: its padded length, rank 0's patches and loss positions, recorded per step), not for
max_seq_length and the config's largest image.

"mp2 decoding": rank 0's bytes sent per generated token (greedy, batch 1, tensor-parallel model of
`launch.infer.load_model`) against `decode_communication`.
"""
import common  # noqa: I001  (first: pins BLAS threads)

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = "comm"
BENCH_TIMEOUT = 3600
REPO = Path(__file__).resolve().parents[1]
STEPS = 3
FAST = ["--per_device_train_batch_size", "2", "--max_seq_length", "128", "--evaluation_strategy", "no",
        "--learning_rate", "1e-3", "--warmup_steps", "0", "--logging_steps", "1", "--save_total_limit", "0",
        "--max_steps", str(STEPS)]
LORA = ["--lora_rank", "4", "--lora_alpha", "8"]
# name -> (command, processes, arguments)
LAYOUTS = {
    "dp2": ("sft", 2, ["--data_parallel_degree", "2"]),
    "mp2": ("sft", 2, ["--data_parallel_degree", "1", "--tensor_parallel_degree", "2"]),
    "mp2+SP": ("sft", 2, ["--data_parallel_degree", "1", "--tensor_parallel_degree", "2",
                          "--sequence_parallel", "true"]),
    "sharding1": ("sft", 2, ["--data_parallel_degree", "1", "--sharding", "stage1", "--sharding_parallel_degree", "2"]),
    "sharding2": ("sft", 2, ["--data_parallel_degree", "1", "--sharding", "stage2", "--sharding_parallel_degree", "2"]),
    "sharding3": ("sft", 2, ["--data_parallel_degree", "1", "--sharding", "stage3", "--sharding_parallel_degree", "2"]),
    "pp2": ("sft", 2, ["--data_parallel_degree", "1", "--pipeline_parallel_degree", "2"]),
    "packing dp2": ("sft", 2, ["--data_parallel_degree", "2", "--packing", "true"]),
    "ViT dp2": ("sft", 2, ["--data_parallel_degree", "2", "--freeze_vit", "false", "--freeze_aligner", "false"]),
    "LoRA mp2": ("lora", 2, ["--data_parallel_degree", "1", "--tensor_parallel_degree", "2", *LORA]),
    "dp2xmp2": ("sft", 4, ["--data_parallel_degree", "2", "--tensor_parallel_degree", "2"]),
    "cp2": ("sft", 2, ["--data_parallel_degree", "1", "--context_parallel_degree", "2"]),
}


def planned(output_dir: Path, nproc: int, steps: list[dict]) -> dict:
    """The planner for the run config the engine saved, each step planned as it ran (`step_workload`: the padded
    length, rank 0's patches and loss positions that step recorded), for rank 0's pipeline stage: CPU and GPU
    bytes sent per step (the mean over `steps[1:]`, as measured) and the CPU step total (state + the step's
    peak, the largest over all steps)."""
    from autoparallel.planning.communication import communication, planned_sent_by_kind
    from autoparallel.planning.memory import stage_memory_plans
    from autoparallel.planning.setup import PlanOptions, step_workload
    from launch.plan import build

    base = build(str(output_dir / "run_config.yaml"), {}, PlanOptions(device="cpu", nproc_per_node=nproc)).setup
    setups = [dataclasses.replace(base, workload=step_workload(base.workload, r["seq_len"], r["patches"],
                                                               r["loss_positions"])) for r in steps]
    by_device = {cpu: [planned_sent_by_kind(communication(setup, cpu=cpu, stage=0), setup) for setup in setups[1:]]
                 for cpu in (True, False)}
    mean = lambda plans: sum(sum(p.values()) for p in plans) / len(plans)
    return {"planned_cpu": mean(by_device[True]), "planned_gpu": mean(by_device[False]),
            "by_kind_cpu": by_device[True][-1],
            "planned_memory": max(stage_memory_plans(setup)[0].step_total for setup in setups),
            "seq_lens": [r["seq_len"] for r in steps], "patches": [r["patches"] for r in steps]}


def run_layout(name: str, meta: str, root: Path) -> dict:
    command, nproc, args = LAYOUTS[name]
    out = root / name.replace(" ", "_").replace("+", "_")
    cli = [sys.executable, "-m", "launch.cli", command, "--meta_path", meta, "--output_dir", str(out),
           "--nproc_per_node", str(nproc), *FAST, *args]
    proc = subprocess.run(cli, cwd=REPO, capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        return {"layout": name, "error": proc.stderr.strip().splitlines()[-1:] or ["failed"]}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    all_steps = [r for r in records if "comm_bytes" in r]
    steps = all_steps[1:]
    sent = sum(r["comm_bytes"] for r in steps) / len(steps)
    workaround = sum(w["sent"] for r in steps for w in r["comm"].get("workaround", {}).values()) / len(steps)
    other = sum(r["comm"]["kinds"]["other"]["sent"] for r in steps) / len(steps)
    by_kind = {k: sum(r["comm"]["kinds"].get(k, {}).get("sent", 0) for r in steps) / len(steps)
               for k in steps[0]["comm"]["kinds"]}
    last = [r for r in records if "peak_allocated_bytes" in r][-1]
    return {"layout": name, "sent": sent, "workaround": workaround, "gpu_equivalent": sent - workaround / 2,
            "other": other, "by_kind": by_kind, "peak_rss": last["peak_rss_gib"] * 2**30, "peak_allocated": last["peak_allocated_bytes"],
            **planned(out, nproc, all_steps)}


DECODE = "mp2 decoding"
DECODE_TOKENS = 12  # new tokens per run; the first (from the prefill's logits) is left out of the mean


def decode_child(out: str, model_dir: str) -> None:
    """Worker of `run_decode` (one of 2 ranks): greedy decoding of DECODE_TOKENS tokens from a 16-token text
    prompt through `launch.infer.load_model`'s tensor-parallel model; the ledger's sent bytes are read at every
    new token (the streamer), so each decode step's bytes are a difference."""
    import numpy as np
    import paddle.distributed as dist

    from autoparallel.comm_ledger import Ledger
    from launch.infer import load_model
    from network.generation import GenerationConfig, generate

    dist.init_parallel_env()
    ledger = Ledger().install()
    model = load_model(model_dir, 2)
    marks = []
    ids = np.random.default_rng(0).integers(0, 1000, (1, 16)).astype(np.int64)
    config = GenerationConfig(max_new_tokens=DECODE_TOKENS, min_new_tokens=DECODE_TOKENS)
    generate(model, ids, np.ones_like(ids), generation_config=config,
             streamer=lambda tokens: marks.append(ledger.totals()[0]))
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps({"per_token": np.diff(marks).tolist()}))
    dist.barrier()


def run_decode(root: Path) -> dict:
    """Rank 0's bytes sent per generated token under mp2 against `decode_communication` (batch 1, fp32)."""
    from autoparallel.planning.communication import decode_communication, planned_sent_by_kind
    from autoparallel.planning.memory import PlanSetup, Workload
    from network.config import Qwen2VLConfig
    from network.modeling_qwen2_vl import Qwen2VLForConditionalGeneration
    from network.processor import Qwen2VLProcessor
    from placements.degrees import ParallelDegrees

    config = Qwen2VLConfig.preset("tiny")
    model_dir, out = root / "decode_model", root / "decode.json"
    Qwen2VLForConditionalGeneration(config).save_pretrained(str(model_dir))
    Qwen2VLProcessor.from_pretrained(None).save_pretrained(str(model_dir))
    cli = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir",
           str(root / "decode_log"), str(Path(__file__).resolve()), "--decode-child", str(out), str(model_dir)]
    proc = subprocess.run(cli, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                          timeout=1200)
    if proc.returncode != 0 or not out.is_file():
        return {"layout": DECODE, "error": [f"exit {proc.returncode}, logs in {root / 'decode_log'}"]}
    steps = json.loads(out.read_text())["per_token"][1:]
    setup = PlanSetup(config, ParallelDegrees(tensor_parallel_degree=2), Workload(batch=1, seq_len=1))
    planned = planned_sent_by_kind(decode_communication(setup), setup)
    return {"layout": DECODE, "sent": sum(steps) / len(steps), "planned_cpu": sum(planned.values()),
            "per_token": steps, "by_kind_cpu": planned}


def table(rows: list[dict]) -> str:
    mib = lambda b: f"{b / 2**20:.2f}"
    lines = ["| layout | sent MiB/step (rank 0) | planned CPU | measured/planned | CPU workaround MiB | "
             "GPU-equivalent / GPU plan | in C++ dispatch (other) MiB | peak allocated MiB | planned MiB | "
             "memory measured/planned | peak RSS GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['layout']} | failed: {r['error'][0]} |" + "  |" * 9)
            continue
        ratio = r["sent"] / r["planned_cpu"] if r["planned_cpu"] else float("nan")
        if r["layout"] == DECODE:
            lines.append(f"| {r['layout']} (per generated token) | {mib(r['sent'])} | {mib(r['planned_cpu'])} | "
                         f"{ratio:.2f} |" + "  |" * 7)
            continue
        gpu = r["gpu_equivalent"] / r["planned_gpu"] if r["planned_gpu"] else float("nan")
        lines.append(f"| {r['layout']} | {mib(r['sent'])} | {mib(r['planned_cpu'])} | {ratio:.2f} | "
                     f"{mib(r['workaround'])} | {gpu:.2f} | {mib(r['other'])} | {mib(r['peak_allocated'])} | "
                     f"{mib(r['planned_memory'])} | {r['peak_allocated'] / r['planned_memory']:.2f} | "
                     f"{r['peak_rss'] / 2**30:.2f} |")
    return "\n".join(lines)


def main() -> None:
    from autoparallel.data.synthetic import make_synthetic_dataset

    names = sys.argv[1].split(",") if len(sys.argv) > 1 else [*LAYOUTS, DECODE]
    with tempfile.TemporaryDirectory(prefix="bench-comm-") as tmp:
        root = Path(tmp)
        meta = str(make_synthetic_dataset(root / "data", n_train=32, n_eval=2, seed=1))
        rows = []
        for name in names:
            rows.append(run_decode(root) if name == DECODE else run_layout(name, meta, root))
            print(json.dumps(rows[-1]), flush=True)
            if "error" not in rows[-1]:
                r = rows[-1]
                if name == DECODE:
                    common.emit(common.Record(
                        bench=BENCH, metric=f"{name}: measured / planned bytes sent per rank and generated token",
                        unit="ratio", better="lower", ours=r["sent"] / r["planned_cpu"],
                        note="ledger (TCP counters) vs decode_communication; tiny preset, batch 1", extra=r))
                    continue
                common.emit(common.Record(
                    bench=BENCH, metric=f"{name}: measured / planned bytes sent per rank and step (CPU)",
                    unit="ratio", better="lower", ours=r["sent"] / max(r["planned_cpu"], 1),
                    note="ledger (TCP counters) vs planner ideal; tiny preset", extra=r))
                common.emit(common.Record(
                    bench=BENCH, metric=f"{name}: peak allocated / planned step total per rank (CPU)",
                    unit="ratio", better="lower", ours=r["peak_allocated"] / r["planned_memory"],
                    note="Paddle's host allocator peak during the steps vs planner state + step peak; tiny preset"))
    print(table(rows))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--decode-child"]:
        decode_child(*sys.argv[2:4])
    else:
        main()
