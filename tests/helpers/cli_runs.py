"""Run `qwen2vl-ap` training commands from tests and make sure none of their processes outlive the test.

Every command gets a unique `QWEN2VL_AP_TEST_TAG` in its environment. The launcher and the workers start their own
sessions (so process-group kills miss them) and are re-parented when their parent dies, but they all inherit the
environment: `tagged_pids(tag)` finds them by that variable, `kill_tagged(tag)` ends them by PID.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]
TAG_ENV = "QWEN2VL_AP_TEST_TAG"
FAST = ["--per_device_train_batch_size", "2", "--max_seq_length", "128", "--evaluation_strategy", "no",
        "--learning_rate", "1e-3", "--warmup_steps", "0", "--logging_steps", "1", "--save_total_limit", "0",
        "--dataloader_num_workers", "0"]


STARTED_TAGS: list[str] = []  # every tag handed out in this pytest process


def tagged_pids(tag: str) -> list[int]:
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.environ().get(TAG_ENV) == tag:
                found.append(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def kill_tagged(tag: str) -> list[int]:
    """SIGKILL every process carrying `tag`; returns the PIDs that were still alive."""
    pids = tagged_pids(tag)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


@dataclass
class Run:
    """One CLI invocation, started in the background (`start`) or run to completion (`run`)."""

    args: list[str]
    output_dir: Path
    env: Optional[dict[str, str]] = None
    command: str = "sft"  # or "lora"
    cwd: Path = REPO  # relative paths in args resolve here (the repository is on PYTHONPATH wherever it runs)
    tag: str = ""
    proc: Optional[subprocess.Popen] = None
    started: float = 0.0
    elapsed: float = 0.0
    stdout: str = ""
    stderr: str = ""

    @property
    def log_root(self) -> Path:
        """`--log_dir` when given, else the CLI's default `output_dir/logs`."""
        given = [self.args[i + 1] for i, a in enumerate(self.args[:-1]) if a == "--log_dir"]
        return self.cwd / given[-1] if given else self.output_dir / "logs"

    def start(self) -> "Run":
        self.tag = self.tag or uuid.uuid4().hex
        STARTED_TAGS.append(self.tag)
        env = dict(os.environ, **(self.env or {}), **{TAG_ENV: self.tag})
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        self.started = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "launch.cli", self.command, *self.args], cwd=self.cwd,
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        return self

    def wait(self, timeout: float = 600) -> "Run":
        try:
            self.stdout, self.stderr = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tagged(self.tag)
            self.stdout, self.stderr = self.proc.communicate()
            raise AssertionError(f"{self.command} did not finish within {timeout} s\n{self.logs()}") from None
        self.elapsed = time.monotonic() - self.started
        return self

    @property
    def returncode(self) -> int:
        return self.proc.returncode

    def logs(self, chars: int = 3000) -> str:
        text = f"stderr:\n{self.stderr[-chars:]}\n"
        for path in sorted(self.log_root.glob("**/workerlog.*")):
            text += f"--- {path}\n{path.read_text(errors='replace')[-chars:]}\n"
        return text

    def worker_logs(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.log_root.glob("**/workerlog.*")))

    def assert_ok(self) -> "Run":
        assert self.returncode == 0, f"exit {self.returncode}\n{self.logs()}"
        return self


def assert_no_processes_left(tags: list[str], grace: float = 15.0) -> None:
    """Wait up to `grace` s for the processes of `tags` to end; kill survivors by PID and fail."""
    deadline = time.monotonic() + grace
    while any(tagged_pids(t) for t in tags) and time.monotonic() < deadline:
        time.sleep(0.5)
    survivors = {t: kill_tagged(t) for t in tags}
    survivors = {t: pids for t, pids in survivors.items() if pids}
    assert not survivors, f"processes left behind (killed now): {survivors}"


@pytest.fixture(autouse=False)
def no_leftover_processes():
    """Use with `pytestmark = pytest.mark.usefixtures(...)`: after each test, none of its CLI processes remain."""
    first = len(STARTED_TAGS)
    yield
    assert_no_processes_left(STARTED_TAGS[first:])


def sft(output_dir: Path, args: list[str], env: Optional[dict[str, str]] = None, timeout: float = 600,
        command: str = "sft", cwd: Path = REPO) -> Run:
    """Run to completion; no process of the run may outlive the command."""
    run = Run(["--output_dir", str(output_dir), *args], output_dir, env, command, cwd).start().wait(timeout)
    assert_no_processes_left([run.tag])
    return run


def metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def losses(output_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(output_dir) if "loss" in r}


def merged_state(checkpoint: Path) -> dict:
    """Merged model and optimizer tensors of `checkpoint/dist_ckpt` (safetensors rank files) as numpy."""
    import paddle.distributed as dist

    state = dist.load_merged_state_dict(str(checkpoint / "dist_ckpt"), safetensors=True)
    return {k: v.numpy() for k, v in state.items()}
