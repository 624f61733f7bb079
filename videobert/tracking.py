"""Experiment tracking (`--report-to`): every metrics row a run logs to OUT/metrics.jsonl is also written to
TensorBoard (event files in OUT/tensorboard; the tensorboard extra) or to a Weights & Biases run (the wandb extra)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from videobert._optional import require

REPORTERS = ("none", "tensorboard", "wandb")


class _TensorBoard:
    """Rows as scalars of a SummaryWriter, at their step."""

    def __init__(self, folder: Path):
        require("tensorboard", "tensorboard", "--report-to tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(folder))

    def log(self, row: dict) -> None:
        """Write every number of `row` at row["step"]."""
        for key, value in row.items():
            if key != "step":
                self.writer.add_scalar(key, value, row["step"])
        self.writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        self.writer.close()


class _WandB:
    """Rows as the history of a wandb run (project "videobert", named after OUT, the run's settings as its config)."""

    def __init__(self, out: Path, config: dict):
        wandb = require("wandb", "wandb", "--report-to wandb")
        self.run = wandb.init(project="videobert", name=out.name, dir=str(out), config=config)

    def log(self, row: dict) -> None:
        """Log every number of `row` at row["step"]."""
        self.run.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def close(self) -> None:
        """Finish the wandb run."""
        self.run.finish()


def open_reporter(kind: str, out: Path, config: dict) -> Optional[object]:
    """The writer `--report-to kind` names (`log(row)`, `close()`), None for "none"; MissingDependency (one line
    naming the pip install) when its package is absent."""
    if kind == "tensorboard":
        return _TensorBoard(out / "tensorboard")
    if kind == "wandb":
        return _WandB(out, config)
    return None
