"""The one way this project starts workers: `python -m paddle.distributed.launch` with this repository on
PYTHONPATH, in its own session so a stop reaches exactly its processes. Used by `sft`/`lora` (launch/train.py),
`infer --tensor_parallel_degree` (launch/infer.py), the demo and the tests."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

REPO = Path(__file__).resolve().parents[1]
# Options consumed by paddle.distributed.launch rather than by the run config.
LAUNCH_OPTIONS = ("nproc_per_node", "nnodes", "master", "rank", "log_dir", "job_id")


def split_launch_options(argv: list[str]) -> tuple[dict[str, str], str | None, list[str]]:
    """Separate launcher options and `--config` from config overrides."""
    launch: dict[str, str] = {}
    config = None
    rest: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        key, _, inline = token[2:].partition("=") if token.startswith("--") else ("", "", "")
        key = key.replace("-", "_")
        if key in LAUNCH_OPTIONS or key == "config":
            if inline:
                value = inline
            elif i + 1 < len(argv):
                value = argv[i + 1]
                i += 1
            else:
                raise SystemExit(f"qwen2vl-ap: --{key} needs a value")
            if key == "config":
                config = value
            else:
                launch[key] = value
        else:
            rest.append(token)
        i += 1
    return launch, config, rest


@dataclass
class WorkerLaunch:
    """`script *args` on every worker of a `paddle.distributed.launch` job writing its logs to `log_dir`."""

    script: Path
    args: list[str]
    nproc: int
    log_dir: Path
    options: dict[str, str] = field(default_factory=dict)  # further launcher options (nnodes, master, rank, ...)
    env: dict[str, str] = field(default_factory=dict)  # added to this process's environment

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "paddle.distributed.launch", "--log_dir", str(self.log_dir),
               "--nproc_per_node", str(self.nproc)]
        for key, value in self.options.items():
            if key not in ("nproc_per_node", "log_dir"):
                cmd += [f"--{key}", value]
        return cmd + [str(self.script), *self.args]

    def start(self, cwd: Path | None = None, stdout: int | IO | None = None,
              stderr: int | IO | None = None) -> subprocess.Popen:
        """Start the launcher in its own session (its process group holds the launcher and the workers)."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.env}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        return subprocess.Popen(self.command(), cwd=cwd, env=env, stdout=stdout, stderr=stderr,
                                start_new_session=True)

    def run(self, stdout: int | IO | None = None, poll: Callable[[], None] | None = None) -> int:
        """Start and wait; `poll` runs every 0.1 s while the job runs (and once after). SIGTERM to this process
        and Ctrl-C stop the whole job; nothing of it outlives this call."""
        proc = self.start(stdout=stdout, stderr=subprocess.STDOUT if stdout is not None else None)
        # A scheduler stopping this command (SIGTERM) must stop the workers too: they live in the launcher's session.
        previous = signal.signal(signal.SIGTERM, lambda signum, _: os.killpg(proc.pid, signum))
        try:
            while True:
                try:
                    code = proc.wait(timeout=0.1 if poll is not None else None)
                    break
                except subprocess.TimeoutExpired:
                    poll()
            if poll is not None:
                poll()
            return code
        except KeyboardInterrupt:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
            return 130
        finally:
            signal.signal(signal.SIGTERM, previous)
            stop(proc)


def stop(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """End what is left of a launched job (its whole process group)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        proc.wait()
