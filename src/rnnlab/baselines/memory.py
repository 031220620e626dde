"""The memory tasks' baseline `train_prior`: the best guess that ignores the inputs, from the training targets (the
mean sum; each recalled position's most frequent symbol): where a network stays at this bar it remembered nothing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from rnnlab.baselines.common import Outputs
from rnnlab.data.base import SplitTensorDataModule


def training_prior(raw_dir: Path, data: SplitTensorDataModule) -> Outputs:
    """The best guess that ignores the inputs, learnt from the training targets: the memory tasks' bar (a network
    that does not beat it remembered nothing). Adding problem: the mean training sum for every sequence (squared
    error per sequence). Copy task: at each recalled position its most frequent training symbol, scored with the
    training frequencies as probabilities (cross-entropy per symbol), one row per sequence and position."""
    data.setup()
    train, test = (data.datasets[split].tensors[1].numpy() for split in ("train", "test"))
    units = data.test_units()
    if train.ndim == 1:  # sums
        prediction = np.full(len(test), float(train.mean()))
        squared = (prediction - test) ** 2
        outputs = units.assign(target=test, prediction=prediction, loss=squared)
        return {"train_prior": (outputs, {"test_mse": float(squared.mean()), "test_loss": float(squared.mean())})}
    alphabet, length = data.head_dims["alphabet"], test.shape[1]
    frequencies = np.stack([np.bincount(train[:, step], minlength=alphabet) for step in range(length)]) / len(train)  # [length, alphabet]
    guess = frequencies.argmax(axis=1)
    steps = np.tile(np.arange(length), len(test))
    target = test.reshape(-1)
    outputs = pd.DataFrame(
        {
            "unit": units["unit"].repeat(length).to_numpy(),
            "group": units["group"].repeat(length).to_numpy(),
            "horizon": steps + 1,  # the recalled position, from 1 as in a network's outputs
            "target": target,
            "prediction": guess[steps],
            "loss": -np.log(frequencies[steps, target].clip(1e-12)),
        }
    )
    correct = guess[None, :] == test
    metrics = {"test_acc": float(correct.mean()), "test_seq_acc": float(correct.all(axis=1).mean())}
    return {"train_prior": (outputs, metrics | {"test_loss": float(outputs["loss"].mean())})}
