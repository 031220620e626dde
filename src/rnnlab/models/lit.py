"""Lightning modules: the training logic per kind of task, around a shared SequenceNet."""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    AUROC,
    Accuracy,
    BinaryAccuracy,
    BinaryAUROC,
    BinaryF1Score,
    ConfusionMatrix,
    F1Score,
)

from rnnlab import tracking
from rnnlab.errors import ConfigError
from rnnlab.models.encoder import RecurrentEncoder, SequenceNet, match_parameters


class RecurrentModule(L.LightningModule):
    """Builds front end -> encoder -> head from plain config dicts and owns the optimiser.

    Plain dicts (not instantiated objects) keep the checkpoint's hyper-parameters
    loadable with `weights_only=True` and the network rebuildable from its config.
    """

    def __init__(
        self, front_end: dict[str, Any], encoder: dict[str, Any], optimizer: dict[str, Any], scheduler: dict[str, Any] | None
    ) -> None:
        super().__init__()
        # The run's full config is logged once by train.py; don't log these a second time.
        self.save_hyperparameters(logger=False)
        self._test_records: list[dict[str, torch.Tensor]] = []

    def on_test_epoch_start(self) -> None:
        self._test_records.clear()

    def record_test(self, **columns: torch.Tensor) -> None:
        """Keep per-example outputs of a test batch: tensors [B] (one value per example) or [B, H] (one per step ahead)."""
        self._test_records.append({name: value.detach().cpu() for name, value in columns.items()})

    def test_predictions(self) -> pd.DataFrame:
        """The recorded test outputs, one row per example in test order (`example` counts from 0), or one row per
        example and step ahead (`horizon`, from 1) when some outputs are [B, H]."""
        if not self._test_records:
            raise RuntimeError("test_predictions() before a test epoch recorded anything")
        columns = {name: torch.cat([record[name] for record in self._test_records]).numpy() for name in self._test_records[0]}
        n_examples = len(next(iter(columns.values())))
        steps = max(value.shape[1] if value.ndim == 2 else 1 for value in columns.values())
        frame = {"example": np.repeat(np.arange(n_examples), steps)}
        if steps > 1:
            frame["horizon"] = np.tile(np.arange(1, steps + 1), n_examples)
        for name, value in columns.items():
            frame[name] = value.reshape(-1) if value.ndim == 2 else np.repeat(value, steps)
        return pd.DataFrame(frame)

    def build_net(self, output_size: int) -> SequenceNet:
        """front end -> encoder -> a linear head of `output_size`, at the width model.encoder.match_params asks for."""

        def make(settings: dict[str, Any]) -> SequenceNet:
            front_end = instantiate(self.hparams.front_end)
            encoder = RecurrentEncoder(input_size=front_end.output_size, **settings)
            return SequenceNet(front_end, encoder, nn.Linear(encoder.output_size, output_size))

        return make(match_parameters(self.hparams.encoder, make))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.net(inputs)

    def configure_optimizers(self) -> Any:
        optimizer = instantiate(self.hparams.optimizer, params=self.parameters())
        schedule = self.hparams.scheduler or {}
        if not schedule.get("scheduler"):
            return optimizer
        lr_scheduler = {"scheduler": instantiate(schedule["scheduler"], optimizer=optimizer), "interval": schedule.get("interval", "epoch")}
        if schedule.get("monitor"):
            lr_scheduler["monitor"] = schedule["monitor"]
        return {"optimizer": optimizer, "lr_scheduler": lr_scheduler}


class SequenceClassifier(RecurrentModule):
    """One label per sequence: cross-entropy, accuracy, F1 and ROC-AUC, and a test confusion matrix.

    Two classes use binary metrics on the positive class; more use macro averages.
    `class_names` label the confusion matrix's axes (class indices when not given).
    """

    def __init__(
        self,
        front_end: dict,
        encoder: dict,
        optimizer: dict,
        scheduler: dict | None,
        num_classes: int,
        class_names: list[str] | None = None,
    ) -> None:
        super().__init__(front_end, encoder, optimizer, scheduler)
        if class_names is not None and len(class_names) != num_classes:
            raise ConfigError(f"class_names {class_names} must name all {num_classes} classes.")
        self.net = self.build_net(num_classes)
        self.binary = num_classes == 2
        self.class_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
        if self.binary:
            metrics = MetricCollection({"acc": BinaryAccuracy(), "f1": BinaryF1Score(), "auroc": BinaryAUROC()})
        else:
            metrics = MetricCollection(
                {
                    "acc": Accuracy(task="multiclass", num_classes=num_classes),
                    "f1": F1Score(task="multiclass", num_classes=num_classes, average="macro"),
                    "auroc": AUROC(task="multiclass", num_classes=num_classes),
                }
            )
        self.train_metrics = MetricCollection({"acc": metrics["acc"].clone()}, prefix="train_")
        self.val_metrics = metrics.clone(prefix="val_")
        self.test_metrics = metrics.clone(prefix="test_")
        self.test_confusion = ConfusionMatrix(task="binary" if self.binary else "multiclass", num_classes=num_classes)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str, metrics: MetricCollection) -> torch.Tensor:
        inputs, labels = batch
        logits = self(inputs)
        losses = F.cross_entropy(logits, labels, reduction="none")
        loss = losses.mean()
        probs = logits.softmax(dim=-1)
        scores = probs[:, 1] if self.binary else probs
        metrics.update(scores, labels)
        if stage == "test":
            self.test_confusion.update(scores, labels)
            # score: the positive class's probability (two classes), else the predicted class's.
            confidence, predicted = probs.max(dim=-1)
            self.record_test(target=labels, prediction=predicted, score=scores if self.binary else confidence, loss=losses)
        self.log(f"{stage}_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(labels))
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=stage != "test", batch_size=len(labels))
        return loss

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train", self.train_metrics)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val", self.val_metrics)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "test", self.test_metrics)

    def on_test_epoch_end(self) -> None:
        """Draw the test confusion matrix (rows: true class, columns: predicted) and save it with the run."""
        figure, axes = self.test_confusion.plot(labels=self.class_names)
        size = 2.5 + 0.5 * len(self.class_names)
        figure.set_size_inches(size, size)
        axes.set_title("Test set confusion matrix")
        tracking.save_figure(self, figure, "confusion_matrix")
        self.test_confusion.reset()
