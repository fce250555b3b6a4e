"""Per-device entry point started by `paddle.distributed.launch` (see launch/cli.py)."""
import sys

from network.log import setup_logging


def main() -> None:
    command, run_config_path = sys.argv[1], sys.argv[2]
    setup_logging()
    from autoparallel.engine import run_worker

    run_worker(command, run_config_path)


if __name__ == "__main__":
    main()
