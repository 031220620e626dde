"""What the baselines share: the networks' split ids, and a classifier chosen on validation and scored as a network."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rnnlab.data.base import SPLITS, read_processed_json

# Per baseline: its per-example test outputs (the columns of a network's) and its metrics, as every baseline returns them.
Outputs = dict[str, tuple[pd.DataFrame, dict[str, Any]]]


def split_ids(processed_dir: Path, limits: dict[str, int | None], task: str) -> dict[str, list[Any]]:
    """The example ids of each split as the networks read them: splits.json's order, cut at task.data.limit_<split>."""
    splits = read_processed_json(processed_dir, "splits.json", task, SPLITS)
    return {split: splits[split][: limits.get(split)] for split in SPLITS}


def best_on_validation(
    c_grid: list[float], make: Callable[[float], Any], features: dict[str, Any], labels: dict[str, np.ndarray]
) -> tuple[float, float, Any]:
    """(C, validation accuracy, fitted model) of the C in `c_grid` whose model, fitted on train, is most accurate on
    validation; the strongest regularisation (smallest C) among equals."""
    fitted = {c: make(c).fit(features["train"], labels["train"]) for c in c_grid}
    val_acc = {c: float((model.predict(features["val"]) == labels["val"]).mean()) for c, model in fitted.items()}
    best = max(c_grid, key=lambda c: (val_acc[c], -c))
    return best, val_acc[best], fitted[best]


def classifier_outputs(
    model: Any, features: Any, target: np.ndarray, num_classes: int, units: list[Any], groups: list[Any]
) -> tuple[pd.DataFrame, float, float]:
    """A classifier's per-example test outputs as a network's (prediction; score = the positive class's probability
    with two classes, else the predicted class's; loss = cross-entropy in nats), its accuracy and its mean loss."""
    probabilities = np.zeros((len(target), num_classes))
    probabilities[:, model.classes_] = model.predict_proba(features)  # a class absent from train keeps probability 0
    prediction = probabilities.argmax(axis=1)
    loss = -np.log(probabilities[np.arange(len(target)), target].clip(1e-12))
    score = probabilities[:, 1] if num_classes == 2 else probabilities.max(axis=1)
    outputs = pd.DataFrame({"unit": units, "group": groups, "target": target, "prediction": prediction, "score": score, "loss": loss})
    return outputs, float((prediction == target).mean()), float(loss.mean())
