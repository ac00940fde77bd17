"""Training metrics: a console progress line, a JSONL file and wandb (offline by default)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Optional


class MetricsLogger:
    """Used on the logging rank only."""

    def __init__(self, out_dir: Path, total_steps: int, start_step: int, wandb_mode: str,
                 run_name: str, config: dict):
        self.path = out_dir / "metrics.jsonl"
        out_dir.mkdir(parents=True, exist_ok=True)
        self.total_steps = total_steps
        self.start_step = start_step
        self.start_time = time.time()
        self._wandb = None
        self._wandb_step = 0
        if wandb_mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self._wandb = wandb.init(
                project="difftron", name=run_name, mode=wandb_mode, dir=str(out_dir),
                config=config, resume="allow", id=run_name.replace("/", "-"),
            )

    def log(self, step: int, values: dict) -> None:
        elapsed = time.time() - self.start_time
        done = step + 1 - self.start_step
        record = {"step": step, **values}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            # wandb drops a step lower than one it has seen (after a rollback): log at the
            # highest step so far, the record keeps the real one.
            self._wandb_step = max(self._wandb_step, step)
            self._wandb.log(record, step=self._wandb_step)
        eta = elapsed / max(done, 1) * (self.total_steps - step - 1)
        shown = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items())
        print(f"[{step + 1}/{self.total_steps}] {shown}  eta {eta:.0f}s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(metrics_files: dict[str, Path], out_png: Path) -> Optional[Path]:
    """One loss-curve PNG for the stages of a run (train and validation loss per stage)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics_files), figsize=(6 * len(metrics_files), 4), squeeze=False)
    for axis, (stage, path) in zip(axes[0], metrics_files.items()):
        rows = read_metrics(path)
        train = [(r["step"] + 1, r["loss"]) for r in rows if r.get("loss") is not None]
        # The first validation point is the starting model's, before any update.
        valid = [(0, r["val_loss_before"]) for r in rows if "val_loss_before" in r]
        valid += [(r["step"] + 1, r["val_loss"]) for r in rows if r.get("val_loss") is not None]
        for points, style, label in ((train, "-", "train loss"), (valid, "o-", "validation loss")):
            if points:
                axis.plot(*zip(*points), style, label=label)
        axis.set_title(stage)
        axis.set_xlabel("step")
        axis.set_ylabel("loss")
        axis.legend()
    return save_figure(fig, out_png)


def save_figure(fig, out_png: Path) -> Path:
    """Write a matplotlib figure as PNG atomically, and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = out_png.with_name(out_png.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out_png)
    return out_png
