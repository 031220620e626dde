"""Lightning callbacks of rnnlab's own."""

from __future__ import annotations

import time

import lightning as L


class EpochHistory(L.Callback):
    """Collects the epoch-level train/val metrics and wall time, for the DVC plot and the summary."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []
        self._started = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        row = {"epoch": trainer.current_epoch, "seconds": time.perf_counter() - self._started}
        for key, value in sorted(trainer.callback_metrics.items()):
            if key.startswith(("train_", "val_")):
                row[key] = float(value)
        self.rows.append(row)

    @property
    def seconds_per_epoch(self) -> float:
        return sum(r["seconds"] for r in self.rows) / max(len(self.rows), 1)
