"""Per-device entry point started by `paddle.distributed.launch` (see launch/train.py).

Each worker is two processes: a small supervisor (no paddle) and the training process it starts. A failure in
training is written by the trainer as one line to the error file the parent relays; a training process killed by
a signal (the out-of-memory killer's SIGKILL) cannot write anything, so its supervisor does, with the last line of
the rank's log. Signals sent to the supervisor (the launcher stopping the job) are passed on and not reported.
"""
import os
import signal
import subprocess
import sys
import traceback

from network.log import setup_logging


def _report(exc: BaseException) -> None:
    """The traceback to this worker's log; one line (file, record and reason for data errors) for the parent."""
    traceback.print_exc()
    from launch.launcher import ERROR_DIR_ENV, error_file

    error_dir = os.environ.get(ERROR_DIR_ENV)
    if not error_dir:
        return
    text = " ".join(str(exc).split())
    known = ("DataError", "ConfigError", "CheckpointError", "FormatError", "NonFiniteError", "DegreeError")
    line = text if type(exc).__name__ in known and text else f"{type(exc).__name__}: {text}"
    error_file(error_dir, int(os.environ.get("PADDLE_TRAINER_ID", "0"))).write_text(line + "\n")


TRAINING_ENV = "QWEN2VL_AP_TRAINING_PROCESS"


def _die_with_parent() -> None:
    """Linux: the training process gets SIGKILL when its supervisor dies, so a launcher that kills the supervisor
    (its forced stop) leaves nothing behind."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _supervise() -> int:
    from launch.launcher import ERROR_DIR_ENV, error_file, killed_by, last_line

    child = subprocess.Popen([sys.executable, os.path.abspath(__file__), *sys.argv[1:]],
                             env={**os.environ, TRAINING_ENV: "1"}, preexec_fn=_die_with_parent)
    stopping: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        stopping.append(signum)
        child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    code = child.wait()
    error_dir = os.environ.get(ERROR_DIR_ENV)
    if code < 0 and not stopping and error_dir:
        text = killed_by(-code)
        last = last_line(os.path.join(error_dir, f"workerlog.{os.environ.get('PADDLE_LOCAL_RANK', '0')}"))
        text += f"; its last log line: {last}" if last else ""
        error_file(error_dir, int(os.environ.get("PADDLE_TRAINER_ID", "0"))).write_text(text + "\n")
    return code if code >= 0 else 128 - code


def main() -> None:
    if TRAINING_ENV not in os.environ:
        sys.exit(_supervise())
    command, run_config_path = sys.argv[1], sys.argv[2]
    setup_logging()
    from launch.launcher import simulate_gpu_if_requested

    simulate_gpu_if_requested()
    try:
        from autoparallel.engine.lora_trainer import LoraTrainer
        from autoparallel.engine.trainer import Trainer
        from launch.config import load_resolved

        cfg = load_resolved(command, run_config_path)
        # `lora`, or `sft --lora true` as PaddleMIX's LoRA scripts pass it, trains adapters.
        trainer_cls = LoraTrainer if cfg.uses_lora else Trainer
        trainer_cls(cfg).train()
        code = 0
    except Exception as exc:  # noqa: BLE001 - every failure is reported as one line, then the worker exits 1
        _report(exc)
        code = 1
    from launch.launcher import exit_launched

    exit_launched(code)  # every rank has passed the final barrier (or failed)


if __name__ == "__main__":
    main()
