"""Rank-0 observability: progress bar, `metrics.jsonl`, VisualDL scalars (when installed), `loss.png`."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

from network.log import logger


class MetricsLogger:
    """Collects one record per optimizer step; only rank 0 writes or draws anything."""

    def __init__(self, output_dir: str, total_steps: int, start_step: int = 0, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.total_steps = total_steps
        self.start_step = start_step
        self.started = time.time()
        self.bar = None
        self.visualdl = None
        if not enabled:
            return
        from tqdm import tqdm

        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)
        try:  # optional dependency: scalars for VisualDL users, as PaddleMIX's --report_to visualdl
            from visualdl import LogWriter

            self.visualdl = LogWriter(logdir=str(Path(output_dir) / "visualdl"))
        except Exception:  # noqa: BLE001 - any import/initialisation failure just disables VisualDL
            self.visualdl = None

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.visualdl is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.visualdl.add_scalar(tag=f"train/{key}", value=value, step=record["step"])
        if self.bar is not None and "loss" in record:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record.get('lr', 0):.2e}",
                                 tok_s=f"{record.get('tokens_per_s', 0):.0f}")
            self.bar.update(record["step"] - self.bar.n)
        elif self.bar is not None:
            self.bar.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))

    def close(self) -> Optional[Path]:
        if not self.enabled:
            return None
        if self.bar is not None:
            self.bar.close()
        if self.visualdl is not None:
            self.visualdl.close()
        return plot_loss(self.path)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss(metrics_path: Path) -> Optional[Path]:
    """Draw train (and eval) loss against step next to metrics.jsonl."""
    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    out = metrics_path.with_name("loss.png")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    logger.info("loss curve: %s", out)
    return out
