"""Faults end to end (docs/RELIABILITY.md): killed/hung ranks, resume to identical weights, two "nodes" on one
machine, NaN steps, a full disk, config errors before any worker. Measured numbers are printed (`pytest -s`)."""
from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from cli_runs import (FAST, Run, assert_no_processes_left, losses, merged_state, metrics,  # noqa: F401
                      no_leftover_processes, sft)

pytestmark = pytest.mark.usefixtures("no_leftover_processes")
STEPS = ["--max_steps", "4", "--save_steps", "2"]
DP2 = ["--data_parallel_degree", "2"]
COLLECTIVE_BOUND_S = 60  # gloo's fixed 30 s collective timeout + launcher shutdown, with room for a loaded machine


@pytest.fixture(scope="module")
def meta(tmp_path_factory) -> str:
    from autoparallel.data.synthetic import make_synthetic_dataset

    return str(make_synthetic_dataset(tmp_path_factory.mktemp("data"), n_train=32, n_eval=4, seed=1))


@pytest.fixture(scope="module")
def straight(meta, tmp_path_factory) -> Path:
    """The uninterrupted reference: dp2, 4 steps, checkpoints 2 and 4."""
    out = tmp_path_factory.mktemp("straight") / "run"
    sft(out, ["--meta_path", meta, *DP2, *STEPS, *FAST]).assert_ok()
    return out


def model_keys(state: dict) -> list[str]:
    keys = [k for k in state if k.startswith(("model.", "visual.", "lm_head"))]
    assert keys
    return keys


def max_weight_delta(a: Path, b: Path) -> float:
    wa, wb = merged_state(a), merged_state(b)
    return max(float(np.abs(wa[k] - wb[k]).max()) for k in model_keys(wa))


def run_until_fault(out: Path, args: list[str], fault: str, marker: str) -> tuple[Run, float]:
    """Start a run with `fault`, note when `marker` appears in a worker log; returns (run, s from marker to exit)."""
    run = Run(["--output_dir", str(out), *args], out, {"QWEN2VL_AP_FAULT": fault}).start()
    seen = None
    while run.proc.poll() is None:
        if seen is None and marker in run.worker_logs():
            seen = time.monotonic()
        time.sleep(0.2)
    run.wait()
    assert seen is not None or marker in run.worker_logs(), run.logs()
    exited_after = time.monotonic() - (seen or time.monotonic())
    assert_no_processes_left([run.tag])
    return run, exited_after


@pytest.mark.parametrize("at, step, kept", [("train", 3, 2), ("save", 4, 2)])
def test_killed_rank_stops_the_job_and_resume_gives_identical_weights(meta, straight, tmp_path, at, step, kept):
    out = tmp_path / "run"
    args = ["--meta_path", meta, *DP2, *STEPS, *FAST]
    run, exit_s = run_until_fault(out, args, f"rank=1,step={step},at={at}", "fault injection: rank 1 dies")
    print(f"\n[measure] kill rank 1 at {at} of step {step}: job exited {exit_s:.1f} s later (code {run.returncode})")
    assert run.returncode != 0 and exit_s < COLLECTIVE_BOUND_S
    assert not (out / "checkpoint-4").exists()
    if at == "save":
        assert (out / ".tmp-checkpoint-4").is_dir()  # the half-written save was never published
    from autoparallel.engine.checkpoint import resolve_resume_path

    assert resolve_resume_path("auto", str(out)) == out / f"checkpoint-{kept}"

    sft(out, ["--meta_path", meta, *DP2, *STEPS, "--resume_from_checkpoint", "auto", *FAST]).assert_ok()
    reference = losses(straight)
    for s, loss in losses(out).items():
        assert abs(loss - reference[s]) <= 1e-6 * max(1.0, abs(reference[s])), (s, loss, reference[s])
    delta = max_weight_delta(straight / "checkpoint-4", out / "checkpoint-4")
    print(f"[measure] resume after kill at {at}: max |w_resumed - w_straight| = {delta:.3g}")
    assert delta <= 1e-6


def test_hung_rank_is_ended_by_the_step_timeout(meta, tmp_path):
    out = tmp_path / "run"
    args = ["--meta_path", meta, *DP2, "--max_steps", "4", "--step_timeout", "15", *FAST]
    run, exit_s = run_until_fault(out, args, "rank=1,step=2,at=hang", "fault injection: rank 1 hangs")
    print(f"\n[measure] rank 1 hangs after step 2 (step_timeout 15 s): job exited {exit_s:.1f} s later")
    assert run.returncode != 0 and exit_s < COLLECTIVE_BOUND_S
    # Whichever fires first ends the job: the watchdog on the hung rank, or gloo's 30 s timeout on the waiting one.
    logs = run.worker_logs()
    assert "Timeout (0:00:15)!" in logs or "TIMEOUT" in logs, run.logs()


def test_sigterm_to_the_command_stops_every_worker(meta, tmp_path):
    out = tmp_path / "run"
    run = Run(["--output_dir", str(out), "--meta_path", meta, *DP2, "--max_steps", "50", *FAST], out).start()
    deadline = time.monotonic() + 300
    while not (out / "metrics.jsonl").is_file() and run.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert run.proc.poll() is None, run.wait().logs()
    sent = time.monotonic()
    run.proc.terminate()
    run.wait(timeout=60)
    assert_no_processes_left([run.tag])
    print(f"\n[measure] SIGTERM to qwen2vl-ap sft: all processes gone {time.monotonic() - sent:.1f} s later")
    assert run.returncode != 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_nodes_on_one_machine_match_two_local_processes(meta, straight, tmp_path):
    out = tmp_path / "run"
    master = f"127.0.0.1:{free_port()}"
    nodes = [Run(["--output_dir", str(out), "--meta_path", meta, *DP2, *STEPS, *FAST, "--nnodes", "2",
                  "--master", master, "--rank", str(rank), "--nproc_per_node", "1"], out).start() for rank in (0, 1)]
    for node in nodes:
        node.wait().assert_ok()
    assert_no_processes_left([node.tag for node in nodes])
    for rank in (0, 1):  # each node keeps its own launcher and worker logs
        assert (out / "logs" / f"node{rank}" / "workerlog.0").is_file()
    reference, got = losses(straight), losses(out)
    assert sorted(got) == [1, 2, 3, 4]
    worst = max(abs(got[s] - reference[s]) for s in got)
    delta = max_weight_delta(straight / "checkpoint-4", out / "checkpoint-4")
    print(f"\n[measure] 2 nodes x 1 process vs 1 node x 2: max loss diff {worst:.3g}, max weight diff {delta:.3g}")
    assert worst <= 1e-6 and delta <= 1e-6


def test_nonfinite_loss_stops_with_the_step_named(meta, tmp_path):
    out = tmp_path / "run"
    run = sft(out, ["--meta_path", meta, *DP2, "--max_steps", "4", *FAST],
              env={"QWEN2VL_AP_FAULT": "rank=1,step=2,at=nan"})
    assert run.returncode != 0
    assert "NonFiniteError: step 2: loss=nan" in run.worker_logs(), run.logs()
    assert sorted(losses(out)) == [1]


def test_nonfinite_step_is_skipped_without_any_update(meta, tmp_path):
    out = tmp_path / "run"
    sft(out, ["--meta_path", meta, *DP2, "--max_steps", "4", "--save_steps", "1", "--skip_nonfinite_steps", "true",
              *FAST], env={"QWEN2VL_AP_FAULT": "rank=1,step=3,at=nan"}).assert_ok()
    records = {r["step"]: r for r in metrics(out) if "tokens" in r}
    assert records[3].get("skipped") and "loss" not in records[3]
    assert [records[s]["skipped_nonfinite"] for s in (1, 2, 3, 4)] == [0, 0, 1, 1]
    assert records[4]["lr"] == records[3]["lr"]  # the LR schedule did not advance on the skipped step
    assert metrics(out)[-1]["skipped_nonfinite"] == 1
    before, after = merged_state(out / "checkpoint-2"), merged_state(out / "checkpoint-3")
    assert before.keys() == after.keys()
    for key in before:  # weights, AdamW moments and beta powers: untouched by the skipped step
        np.testing.assert_array_equal(after[key], before[key], err_msg=key)
    assert max_weight_delta(out / "checkpoint-3", out / "checkpoint-4") > 0
    assert json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["skipped_nonfinite"] == 1


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 400 MiB tmpfs: one tiny-model checkpoint (~245 MB) fits, a second does not."""
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to simulate a full disk: {proc.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_at_save_fails_clearly_and_keeps_the_previous_checkpoint(meta, straight, small_tmpfs, tmp_path):
    out = small_tmpfs / "run"
    # Logs on the full disk would lose the error message itself: they go elsewhere, as users should do too.
    run = sft(out, ["--meta_path", meta, *DP2, *STEPS, *FAST, "--log_dir", str(tmp_path / "logs")])
    assert run.returncode != 0
    logs = run.worker_logs()
    assert f"CheckpointError: writing checkpoint-4 into {out / '.tmp-checkpoint-4'} failed" in logs, run.logs()
    assert "No space left on device" in logs and "previous checkpoints are untouched" in logs
    from autoparallel.engine.checkpoint import resolve_resume_path

    assert resolve_resume_path("auto", str(out)) == out / "checkpoint-2"
    assert max_weight_delta(straight / "checkpoint-2", out / "checkpoint-2") == 0.0


def test_unwritable_output_dir_fails_before_workers(meta, tmp_path):
    target = tmp_path / "not_a_dir"
    target.write_text("a file where output_dir should be")
    run = sft(target / "run", ["--meta_path", meta, *DP2, *FAST], timeout=120)
    assert run.returncode == 2 and f"output_dir '{target / 'run'}' is not writable" in run.stderr, run.stderr


def _bad_meta(tmp_path: Path) -> str:
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"d": {"annotation": str(tmp_path / "gone.json")}}))
    return str(meta)


@pytest.mark.parametrize("args, message", [
    (["--skip_nonfinite_steps", "maybe"], "skip_nonfinite_steps='maybe' (command line): expected true/false"),
    (["--adam_beta2", "1.5"], "adam_beta2=1.5 is out of range"),
    (["--max_steps", "0"], "max_steps=0 is out of range"),
    (["--step_timeout", "-1"], "step_timeout=-1 is out of range"),
    (["--global_batch_size", "6"], "global batch 6 != per_device_batch_size 2 x dp 2 x gradient_accumulation_steps 1"),
    (["--sharding", "stage4"], "sharding='stage4' must be one of stage1"),
    (["--pipeline_parallel_degree", "3", "--data_parallel_degree", "1", "--nproc_per_node", "3"],
     "pipeline_parallel_degree=3 > num_hidden_layers=2"),
    (["--pipeline_parallel_degree", "2", "--data_parallel_degree", "1", "--evaluation_strategy", "steps",
      "--eval_steps", "2"], "evaluation with pipeline_parallel_degree > 1 is not supported yet"),
    (["--sequence_parallel", "true"], "sequence_parallel=true needs tensor_parallel_degree > 1"),
    (["--model_name_or_path", "/nonexistent/model"], "model directory not found: /nonexistent/model (nor is it a Hub id"),
    (["--resume_from_checkpoint", "/nonexistent/ckpt"], "no such directory"),
    (["--nnodes", "2", "--rank", "2", "--master", "127.0.0.1:29500"], "--rank 2 must be < --nnodes 2"),
    (["--nnodes", "2", "--rank", "0"], "--nnodes 2 needs --master HOST:PORT"),
    (["--nnodes", "2", "--rank", "0", "--master", "localhost"], "--master 'localhost' must be HOST:PORT"),
    ("bad_meta", "annotation file"),
], ids=lambda v: v if isinstance(v, str) else " ".join(v)[:40])
def test_bad_config_is_rejected_before_any_worker(meta, tmp_path, monkeypatch, capsys, args, message):
    from launch import cli, launcher

    def no_workers(*_args, **_kwargs):
        raise AssertionError("workers were started")

    monkeypatch.setattr(launcher.WorkerLaunch, "start", no_workers)
    if args == "bad_meta":
        args = ["--meta_path", _bad_meta(tmp_path)]
    else:
        args = ["--meta_path", meta, *args]
    out = tmp_path / "run"
    code = cli.main(["sft", "--output_dir", str(out), *DP2, *FAST, *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert not (out / "logs").exists()
