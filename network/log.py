"""The project's single logger. Every module logs through `logger`; `launch` configures handlers once."""
import logging
import os

logger = logging.getLogger("qwen2vl_ap")


def setup_logging(level: str = "INFO") -> None:
    """Install one stream handler that prefixes the distributed rank (idempotent)."""
    if logger.handlers:
        return
    rank = os.environ.get("PADDLE_TRAINER_ID", "0")
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(f"[%(asctime)s rank{rank} %(levelname)s] %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
