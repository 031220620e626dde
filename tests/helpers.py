"""Helpers shared by the test modules (plain functions; fixtures live in conftest.py)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch import nn


def isolated_outputs(out: Path) -> list[str]:
    """Overrides that send a training run's outputs and MLflow store under `out`, away from the project's."""
    return [
        f"paths.model_dir={out}/models",
        f"paths.metrics_file={out}/metrics.json",
        f"paths.history_file={out}/history.csv",
        f"paths.plots_dir={out}/plots",
        f"paths.run_dir={out}/run",
        f"tracking.uri=sqlite:///{out}/mlflow.db",
        f"tracking.artifact_location={out}/artifacts",
    ]


def quiet_trainer(tmp_path: Path | None = None, **kwargs: object) -> L.Trainer:
    """A Lightning Trainer with no logger, checkpoints, progress bar or model summary."""
    return L.Trainer(
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, **kwargs
    )


def fit_one_batch(model: L.LightningModule, inputs: torch.Tensor, labels: torch.Tensor, steps: int) -> float:
    """Train a classifier on one batch for `steps` steps with its own optimiser; the last loss."""
    optimizer = model.configure_optimizers()
    for _ in range(steps):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(inputs), labels)
        loss.backward()
        optimizer.step()
    return loss.item()
