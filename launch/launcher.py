"""The one way this project starts workers: `python -m paddle.distributed.launch` with this repository on
PYTHONPATH, in its own session so a stop reaches exactly its processes. Used by `sft`/`lora` (launch/train.py),
`infer --tensor_parallel_degree` (launch/infer.py), the demo and the tests."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, NoReturn

REPO = Path(__file__).resolve().parents[1]
# Workers write the one-line reason of a failure to `$QWEN2VL_AP_ERROR_DIR/error.rank{N}` (launch/worker.py);
# the parent relays it (`describe_failure`), so a bad record reaches the console as one line, not a traceback.
ERROR_DIR_ENV = "QWEN2VL_AP_ERROR_DIR"
# Paddle's launcher names the failed worker: "Container rank 1 status failed cmd [...] code -9 log log/workerlog.1".
_FAILED_CONTAINER = re.compile(r"Container rank (\d+) status \S+ cmd .*? code (-?\d+) log (\S+)")
# This project's log lines ("[12:00:00 rank0 INFO] ...", network/log.py) and the progress bar reach the console;
# the rest of a worker's output (Paddle's launcher dump, tcp-store and FLAGS lines, library warnings) stays in
# the logs unless --verbose.
_CONSOLE_LINE = re.compile(r"^(\[\d\d:\d\d:\d\d rank0 [A-Z]+\] |train:)")
# A tqdm update: "train:  50%|#####     | 1/2 [00:01<00:01,  1.82s/it, loss=11.8]" (its postfix may hold "[...]"
# only inside the last bracket pair); tqdm leaves its last update unterminated, so other output may follow it.
_BAR = re.compile(r"^(train:.*?\d+/\d+ \[[^\]]*\])(.*)$")
# Options consumed by paddle.distributed.launch rather than by the run config (PaddleMIX's scripts pass
# --ips, --run_mode and --gpus/--devices too).
LAUNCH_OPTIONS = ("nproc_per_node", "nnodes", "master", "rank", "log_dir", "job_id", "ips", "run_mode", "devices",
                  "start_port")
LAUNCH_ALIASES = {"gpus": "devices"}


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
        key = LAUNCH_ALIASES.get(key, key)
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
            # A CPU build has no device ids: Paddle's launcher would fail looking them up; the count already
            # set nproc_per_node (launch/prepare.py).
            if key not in ("nproc_per_node", "log_dir") and not (key == "devices" and not _has_devices()):
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


SIMULATE_GPU_ENV = "QWEN2VL_AP_SIMULATE_GPU"


def simulate_gpu_if_requested() -> None:
    """`QWEN2VL_AP_SIMULATE_GPU=1`: every CUDA-only branch runs on the simulated GPU (network/simulated_gpu.py)
    from process start; processes a command launches inherit the variable."""
    if os.environ.get(SIMULATE_GPU_ENV) == "1":
        from network.simulated_gpu import start

        start()


def exit_launched(code: int) -> NoReturn:
    """End a process that `paddle.distributed.launch` started, once its work (and its final barrier) is done,
    without interpreter teardown: Paddle's CPU build sometimes aborts (SIGABRT) while destroying its communication
    context at exit, and the launcher would then report a failed job after every result was written."""
    if os.environ.get(SIMULATE_GPU_ENV) == "1":  # os._exit skips atexit: hand the kernel counts over now
        from network.simulated_gpu import write_counts

        write_counts()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_launched(main: Callable[[list[str]], int]) -> NoReturn:
    """`__main__` of a command's launched ranks (infer, serve): this project's logging, then `main(argv)`'s code."""
    from network.log import setup_logging

    setup_logging()
    simulate_gpu_if_requested()
    exit_launched(main(sys.argv[1:]))


def error_file(error_dir: str | os.PathLike, rank: int) -> Path:
    return Path(error_dir) / f"error.rank{rank}"


def last_line(path: str | os.PathLike) -> str:
    """The last non-empty line of a log file (progress-bar updates count as lines), "" if unreadable."""
    try:
        lines = [line.strip() for line in Path(path).read_text(errors="replace").replace("\r", "\n").splitlines()]
    except OSError:
        return ""
    return next((line for line in reversed(lines) if line), "")


def killed_by(signum: int) -> str:
    """"was killed by SIGKILL (out of memory?)": the kernel's OOM killer is the usual sender of SIGKILL."""
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    return f"was killed by {name}" + (" (out of memory?)" if signum == signal.SIGKILL else "")


def describe_failure(log_dir: Path, launcher_output: str, code: int) -> str:
    """One line saying why a job failed: the first error line a worker wrote (the others are usually its
    consequences: peers losing their connection), else what the launcher says about the failed rank."""
    reported = []
    for path in sorted(log_dir.glob("error.rank*"), key=lambda p: (p.stat().st_mtime_ns, p.name)):
        text = path.read_text(errors="replace").strip()
        if text:
            reported.append((path.name.rpartition("rank")[2], text))
    # A rank killed by a signal is a cause, whatever its peers wrote a moment before its supervisor could (they
    # lose the connection to it): it comes first.
    for rank, text in sorted(reported, key=lambda r: not r[1].startswith("was killed by")):
        return f"rank {rank} {text}" if text.startswith("was killed by") else f"rank {rank}: {text}"
    match = _FAILED_CONTAINER.search(launcher_output)
    rank, worker_code = (int(match.group(1)), int(match.group(2))) if match else (None, code)
    if worker_code > 128 and match is None:  # the launcher exits with the worker's status, e.g. 247 = -9
        worker_code -= 256
    if worker_code < 0:
        text = f"{f'rank {rank}' if rank is not None else 'a worker'} {killed_by(-worker_code)}"
        if match is not None:
            log = Path(match.group(3))
            log = log if log.is_absolute() or log.exists() else log_dir / log.name
            last = last_line(log)
            text += f"; its last log line: {last}" if last else ""
        return text
    return f"exit code {code}" + (f" (rank {rank} exited with {worker_code})" if rank is not None else "")


class ConsoleRelay:
    """Forwards what a file gains to `out` while a job runs: everything with `verbose`, else only this project's
    log lines and the progress bar (carriage-return updates are kept as such)."""

    def __init__(self, path: Path, verbose: bool, out: IO | None = None):
        self.path, self.verbose, self.out = path, verbose, out
        self._offset, self._pending, self._bar_open = 0, "", False
        self._printed: set[str] = set()

    def __call__(self) -> None:
        try:
            with open(self.path, errors="replace", newline="") as handle:  # keep tqdm's \r
                handle.seek(self._offset)
                text = handle.read()
                self._offset = handle.tell()
        except OSError:
            return
        out = self.out or sys.stderr
        parts = re.split(r"(\r|\n)", self._pending + text)
        self._pending = parts.pop()  # an unfinished line waits for its end
        segments = []
        for segment, end in zip(parts[::2], parts[1::2]):
            bar = _BAR.match(segment)
            # What follows an unterminated bar update on the same line is judged on its own.
            segments += [(bar.group(1), "\r"), (bar.group(2), end)] if bar and bar.group(2) else [(segment, end)]
        for segment, end in segments:
            if not (self.verbose or _CONSOLE_LINE.match(segment)):
                continue
            if segment.startswith("train:"):  # a progress-bar update overwrites the previous one
                out.write("\r" + segment + ("\n" if end == "\n" else ""))
                self._bar_open = end == "\r"
                continue
            if segment in self._printed:  # Paddle's launcher repeats a failed rank's log tail
                continue
            self._printed.add(segment)
            out.write(("\n" if self._bar_open else "") + segment + "\n")
            self._bar_open = False
        out.flush()

    def close(self) -> None:
        """End a progress bar left open, so what is printed next starts on its own line."""
        if self._bar_open:
            (self.out or sys.stderr).write("\n")
            self._bar_open = False


def _has_devices() -> bool:
    import paddle

    return paddle.is_compiled_with_cuda() or paddle.is_compiled_with_xpu() or bool(
        paddle.device.get_all_custom_device_type())


def stop(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """End what is left of a launched job (its whole process group)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        proc.wait()
