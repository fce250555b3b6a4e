"""PaddleMIX's Qwen2-VL scripts' argument lists, passed verbatim to `qwen2vl-ap sft|lora` with tiny-model
overrides (tiny model, 1-2 steps, 2 processes) on a PaddleMIX-layout meta file (root plus paths relative to the
working directory, records with and without `<image>`): each trains, with one notice line for the keys that only
select PaddleMIX code paths and a quiet console."""
from __future__ import annotations

import json
import math
import socket

import numpy as np
import pytest

from cli_runs import Run, assert_no_processes_left, metrics, no_leftover_processes  # noqa: F401
from dist_utils import console_kernels
from paddlemix_scripts import SCRIPTS, script_argv, write_paddlemix_dataset

pytestmark = pytest.mark.usefixtures("no_leftover_processes")
NOTICE = "accepted for PaddleMIX compatibility, no effect here: "
# Only rank 0's own log lines and the progress bar reach the console; these are from Paddle's launcher.
LAUNCHER_NOISE = ("LAUNCH INFO", "---  Configuration", "tcp store", "FLAGS_", "Traceback")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("name,command,steps", [
    ("auto_2b_bs32_1e8.sh", "sft", 2),
    ("auto_2b_lora_bs32_1e8.sh", "sft", 2),  # PaddleMIX passes --lora True to the same script: sft trains LoRA
    ("baseline_2b_bs32_1e8.sh", "sft", 1),
    ("baseline_2b_lora_bs32_1e8.sh", "lora", 1),
    ("baseline_7b_bs32_1e8.sh", "sft", 1),
    ("baseline_7b_lora_bs32_1e8.sh", "sft", 1),
])
def test_script_arguments_run_verbatim(tmp_path, name, command, steps):
    meta = write_paddlemix_dataset(tmp_path)  # 16 records, 8 of them without a placeholder
    output_dir = f"work_dirs/{name[:-3]}"
    argv = script_argv(name, gpus=2, batch_size=4 if name.startswith("auto") else 8, meta_path=meta,
                       output_dir=output_dir, master=f"127.0.0.1:{free_port()}")
    tiny = ["--model_name_or_path", "tiny", "--max_steps", str(steps)]
    run = Run(argv + tiny, tmp_path / output_dir, command=command, cwd=tmp_path).start().wait()
    run.assert_ok()
    assert_no_processes_left([run.tag])
    console = run.stdout + run.stderr
    notices = [line for line in console.splitlines() if NOTICE in line]
    assert len(notices) == 1, console
    for key in ("do_train", "overwrite_output_dir", "logging_dir", "report_to", "save_strategy", "optim",
                "hybrid_parallel_topo_order", "fp16_opt_level"):
        assert key in notices[0]
    if name.startswith("auto"):
        for key in ("enable_auto_parallel", "use_intermediate_api", "to_static",
                    "auto_parallel_resume_form_hybrid_parallel"):
            assert key in notices[0]
    assert not [n for n in LAUNCHER_NOISE if n in console], console
    records = metrics(run.output_dir)
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == steps and all(math.isfinite(x) for x in losses)
    assert records[-1]["placeholders_added"] == 8 and records[-1]["skipped_samples"] == 0
    resolved = json.loads(json.dumps(__import__("yaml").safe_load(
        (run.output_dir / "run_config.yaml").read_text())))
    _, fixed, per_device, _ = SCRIPTS[name]
    assert resolved["per_device_train_batch_size"] == per_device and resolved["gradient_accumulation_steps"] == 2
    assert resolved["sharding_parallel_degree"] == 2 and resolved["data_parallel_degree"] == 1
    assert resolved["bf16"] and resolved["amp_master_grad"] and resolved["lora"] == ("LORA_RANK" in fixed)
    if "LORA_RANK" in fixed:
        adapter = json.loads((run.output_dir / "lora_config.json").read_text())
        assert adapter["r"] == int(fixed["LORA_RANK"]) and adapter["lora_alpha"] == 256
    assert (tmp_path / output_dir / "paddle_distributed_logs" / "workerlog.0").is_file()  # the script's --log_dir


def test_auto_2b_script_on_the_simulated_gpu_trains_like_the_cpu(tmp_path):
    """PaddleMIX's auto_2b layout (sharding stage 1, bf16, amp_master_grad) on the simulated GPU
    (network/simulated_gpu.py): the bf16 gates, O2 branches and flash kernels are taken, and the losses equal the
    plain CPU run's. (fp32 arithmetic on both sides: what amp_master_grad changes in bf16 needs a GPU, review N2.)"""
    from launch.launcher import SIMULATE_GPU_ENV

    meta = write_paddlemix_dataset(tmp_path)
    losses, consoles = {}, {}
    for label, env in (("plain", {}), ("simulated", {SIMULATE_GPU_ENV: "1"})):
        output_dir = f"work_dirs/{label}"
        argv = script_argv("auto_2b_bs32_1e8.sh", gpus=2, batch_size=4, meta_path=meta, output_dir=output_dir,
                           master=f"127.0.0.1:{free_port()}")
        run = Run(argv + ["--model_name_or_path", "tiny", "--max_steps", "2"], tmp_path / output_dir, env=env,
                  cwd=tmp_path).start().wait()
        run.assert_ok()
        losses[label] = [r["loss"] for r in metrics(run.output_dir) if "loss" in r]
        consoles[label] = run.stderr
    assert len(losses["plain"]) == 2
    np.testing.assert_allclose(losses["simulated"], losses["plain"], rtol=1e-5)
    kernels = console_kernels(consoles["simulated"])
    assert kernels["flash_attention"] > 0 and kernels["flash_attn_unpadded"] > 0, kernels
    assert "simulated GPU kernels" not in consoles["plain"]
