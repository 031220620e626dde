"""Multi-step forecasting around the shared SequenceNet."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.regression import MeanAbsoluteError, MeanSquaredError

from rnnlab import tracking
from rnnlab.errors import ConfigError
from rnnlab.models.lit import RecurrentModule

LOSSES = {"mse": F.mse_loss, "l1": F.l1_loss, "huber": F.huber_loss}


class MeanAbsoluteScaledError(MeanAbsoluteError):
    """MASE as in the M4 competition: the MAE divided by the in-sample MAE of the seasonal
    naive forecast on the training series (`scale`), so values below 1 beat that error."""

    def __init__(self, scale: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not scale > 0:
            raise ConfigError(f"The MASE scale must be positive, got {scale}.")
        self.scale = scale

    def compute(self) -> torch.Tensor:
        return super().compute() / self.scale


def forecast_metrics(mase_scale: float) -> MetricCollection:
    """MAE, RMSE and MASE, all in the series' own units."""
    return MetricCollection(
        {"mae": MeanAbsoluteError(), "rmse": MeanSquaredError(squared=False), "mase": MeanAbsoluteScaledError(mase_scale)}
    )


class Forecaster(RecurrentModule):
    """Direct multi-step forecasts: the head emits all `horizon` steps at once.

    The network (what MLflow stores) works in normalised units; a forecast in the series' units
    is `offset + target_scale * output`, with the per-window offset the data module provides (the window's last
    value: the network forecasts changes, and starts as persistence) and `target_scale` from the processed metadata.json.
    The test step plots forecast against actual for the test period (the baselines are the baseline stage's:
    rnnlab.baselines).
    """

    def __init__(
        self,
        front_end: dict[str, Any],
        encoder: dict[str, Any],
        optimizer: dict[str, Any],
        scheduler: dict[str, Any] | None,
        horizon: int,
        target_scale: float,
        mase_scale: float,
        series: str = "series",
        loss: str = "mse",
    ) -> None:
        super().__init__(front_end, encoder, optimizer, scheduler)
        if loss not in LOSSES:
            raise ConfigError(f"task.module.loss must be one of {list(LOSSES)}, got {loss!r}.")
        self.net = self.build_net(horizon)
        # The targets are changes from the window's last value: a zero head starts the network as persistence, and
        # training moves it away only as far as the loss rewards.
        nn.init.zeros_(self.net.head.weight)
        nn.init.zeros_(self.net.head.bias)
        self.loss_fn = LOSSES[loss]
        self.val_metrics = forecast_metrics(mase_scale).clone(prefix="val_")
        self.test_metrics = forecast_metrics(mase_scale).clone(prefix="test_")
        self._test_outputs: list[dict[str, torch.Tensor]] = []

    def _step(self, batch: list[torch.Tensor], stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss on normalised targets and the forecasts in the series' units."""
        inputs, targets, offsets = batch[:3]
        outputs = self(inputs)
        scale = self.hparams.target_scale
        loss = self.loss_fn(outputs, (targets - offsets[:, None]) / scale)
        self.log(f"{stage}_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(targets))
        return loss, offsets[:, None] + scale * outputs

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")[0]

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        forecasts = self._step(batch, "val")[1]
        self.val_metrics.update(forecasts, batch[1])
        self.log_dict(self.val_metrics, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(forecasts))

    def test_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        _inputs, targets, _offsets, target_times = batch
        forecasts = self._step(batch, "test")[1]
        self.test_metrics.update(forecasts, targets)
        self.log_dict(self.test_metrics, on_step=False, on_epoch=True, batch_size=len(targets))
        self._test_outputs.append({"forecasts": forecasts, "targets": targets, "times": target_times})
        self.record_test(target=targets, prediction=forecasts)

    def on_test_epoch_start(self) -> None:
        super().on_test_epoch_start()
        self._test_outputs.clear()

    def on_test_epoch_end(self) -> None:
        outputs = {key: torch.cat([o[key] for o in self._test_outputs]).detach().cpu().numpy() for key in self._test_outputs[0]}
        self._test_outputs.clear()
        tracking.save_figure(self, self.forecast_figure(**outputs), "forecast")

    def forecast_figure(self, forecasts: np.ndarray, targets: np.ndarray, times: np.ndarray) -> Figure:
        """Top: actual against the forecasts from every horizon-th origin (so each test date is forecast
        once, from 1 to horizon steps ahead). Bottom: MAE by steps ahead."""
        horizon = targets.shape[1]
        figure = Figure(figsize=(11, 7), layout="tight")  # no pyplot: no global figure state, any backend
        series_axis, error_axis = figure.subplots(2, 1, height_ratios=[2, 1])
        every = slice(None, None, horizon)
        dates = pd.to_datetime(times[every].ravel())
        series_axis.plot(dates, targets[every].ravel(), color="black", linewidth=1.2, label="actual")
        series_axis.plot(dates, forecasts[every].ravel(), color="C0", linewidth=1.2, label="model")
        series_axis.set_title(f"{self.hparams.series}: test period, non-overlapping {horizon}-step forecasts")
        series_axis.legend(loc="upper left")
        steps = np.arange(1, horizon + 1)
        error_axis.plot(steps, np.abs(forecasts - targets).mean(axis=0), color="C0", marker="o", label="model")
        error_axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        error_axis.set_xlabel("steps ahead")
        error_axis.set_ylabel("test MAE")
        error_axis.legend(loc="upper left")
        return figure
