"""Per-device entry point started by `paddle.distributed.launch` (see launch/train.py)."""
import os
import sys

from network.log import setup_logging


def main() -> None:
    command, run_config_path = sys.argv[1], sys.argv[2]
    setup_logging()
    from autoparallel.engine.lora_trainer import LoraTrainer
    from autoparallel.engine.trainer import Trainer
    from launch.config import load_resolved

    trainer_cls = LoraTrainer if command == "lora" else Trainer
    trainer_cls(load_resolved(command, run_config_path)).train()
    # Every rank has passed the final barrier. Skip interpreter teardown: Paddle's CPU build sometimes aborts
    # (SIGABRT, exit code 250) while destroying its communication context at exit, after all work is done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
