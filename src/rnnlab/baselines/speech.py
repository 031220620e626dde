"""Speech's baseline `mel_logreg`: summary statistics of each clip's log-mel frames (mean, spread, extremes, mean change
per frame), standardised, and a logistic regression, C chosen on validation accuracy."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from rnnlab.baselines.common import Outputs, best_on_validation, classifier_outputs
from rnnlab.data.base import SPLITS, SplitTensorDataModule
from rnnlab.errors import ConfigError

# Per clip, over its frames [N, T, n_mels]: one value per mel bin each.
MEL_STATISTICS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "mean": lambda frames: frames.mean(axis=1),
    "std": lambda frames: frames.std(axis=1),
    "min": lambda frames: frames.min(axis=1),
    "max": lambda frames: frames.max(axis=1),
    "delta": lambda frames: np.abs(np.diff(frames, axis=1)).mean(axis=1),  # how fast each band changes
}


def mel_statistics_logistic_regression(raw_dir: Path, data: SplitTensorDataModule, c_grid: list[float], statistics: list[str]) -> Outputs:
    """Summary statistics of each clip's log-mel frames, standardised, and a multinomial logistic regression for
    each C of `c_grid`, the best on validation accuracy scoring the test clips."""
    unknown = [name for name in statistics if name not in MEL_STATISTICS]
    if unknown or not statistics:
        raise ConfigError(f"task.baselines.statistics {statistics} is invalid; choose one or more of {list(MEL_STATISTICS)}.")
    data.setup()
    features, labels = {}, {}
    for split in SPLITS:
        frames, split_labels = (tensor.numpy() for tensor in data.datasets[split].tensors)
        features[split] = np.concatenate([MEL_STATISTICS[name](frames.astype(np.float64)) for name in statistics], axis=1)
        labels[split] = split_labels.astype(int)

    def make(c: float) -> Any:
        return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=3000))

    best, val_acc, model = best_on_validation(c_grid, make, features, labels)
    units = data.test_units()
    num_classes = data.head_dims["num_classes"]
    outputs, test_acc, test_loss = classifier_outputs(
        model, features["test"], labels["test"], num_classes, units["unit"].tolist(), units["group"].tolist()
    )
    metrics = {"test_acc": test_acc, "test_loss": test_loss, "val_acc": val_acc, "C": best, "features": features["test"].shape[1]}
    return {"mel_logreg": (outputs, metrics)}
