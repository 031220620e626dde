"""Task modules of the memory tasks (rnnlab.data.memory): the adding problem's sum and the copy task's recall."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import nn

from rnnlab.errors import ConfigError
from rnnlab.models.encoder import RecurrentEncoder, match_parameters
from rnnlab.models.lit import RecurrentModule


class _StagedModule(RecurrentModule):
    """A task module whose training, validation and test steps are one `_step(batch, stage)`."""

    def _step(self, batch: list[torch.Tensor], stage: str) -> torch.Tensor:
        raise NotImplementedError

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "test")


class AddingRegressor(_StagedModule):
    """The adding problem: the sum of the two marked values, from the pooled encoder outputs, with a squared-error loss.

    Logs `<stage>_loss` and `<stage>_mse` (the same mean squared error; `mse` names the primary metric) and
    `<stage>_acc`, the share of sequences whose error is below `tolerance` (Hochreiter & Schmidhuber's 1997
    criterion, 0.04). The head's bias starts at 1, the mean sum: the best guess without the markers.
    """

    def __init__(self, front_end: dict, encoder: dict, optimizer: dict, scheduler: dict | None, tolerance: float = 0.04) -> None:
        super().__init__(front_end, encoder, optimizer, scheduler)
        if not (isinstance(tolerance, int | float) and not isinstance(tolerance, bool) and tolerance > 0):
            raise ConfigError(f"task.module.tolerance must be a number > 0 (the largest error counted as right), got {tolerance!r}.")
        self.tolerance = float(tolerance)
        self.net = self.build_net(1)
        with torch.no_grad():  # draws nothing: the weights stream is where build_net left it
            self.net.head.bias.fill_(1.0)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """The predicted sums [B] of inputs [B, T, 2]."""
        return self.net(inputs).squeeze(-1)

    def _step(self, batch: list[torch.Tensor], stage: str) -> torch.Tensor:
        inputs, targets = batch
        predictions = self(inputs)
        squared = (predictions - targets).pow(2)
        loss = squared.mean()
        metrics = {f"{stage}_loss": loss}
        if stage != "train":
            hits = (predictions - targets).abs() < self.tolerance
            metrics |= {f"{stage}_mse": loss, f"{stage}_acc": hits.float().mean()}
        # Weighted by the batch's sequences, so that each epoch's value is the mean over all of them.
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=stage != "test", batch_size=len(targets))
        if stage == "test":
            self.record_test(target=targets, prediction=predictions, loss=squared)
        return loss


class CopyNet(nn.Module):
    """front end -> recurrent encoder -> logits over the alphabet at each of the last `length` steps, where the
    copy task recalls the symbols. The encoder's outputs at every step, as the language model reads them
    (RecurrentEncoder.unroll); pooling is not used. This is the network MLflow stores."""

    def __init__(self, front_end: nn.Module, encoder: RecurrentEncoder, alphabet: int, length: int) -> None:
        super().__init__()
        self.front_end = front_end
        self.encoder = encoder
        self.head = nn.Linear(encoder.hidden_size * encoder.directions, alphabet)
        self.length = length

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits [B, length, alphabet] of the recalled symbols for token ids [B, steps]."""
        features, _ = self.front_end(tokens)
        outputs, _ = self.encoder.unroll(features)
        return self.head(outputs[:, -self.length :])


class SequenceCopier(_StagedModule):
    """The copy task: the `length` symbols, as classes 0..alphabet - 1, at the steps after the delimiter, with
    cross-entropy over those steps only (the blanks before them are not scored).

    Logs `<stage>_loss` (nats per recalled symbol), `<stage>_acc` (the share of recalled symbols that are right,
    over every copied position) and, for val and test, `<stage>_seq_acc` (the share of sequences copied whole).
    """

    def __init__(self, front_end: dict, encoder: dict, optimizer: dict, scheduler: dict | None, alphabet: int, length: int) -> None:
        super().__init__(front_end, encoder, optimizer, scheduler)

        def make(settings: dict[str, Any]) -> CopyNet:
            front = instantiate(front_end)
            unpooled = {key: value for key, value in settings.items() if key != "pooling"}
            return CopyNet(front, RecurrentEncoder(input_size=front.output_size, **unpooled), alphabet, length)

        self.net = make(match_parameters(encoder, make))

    def _step(self, batch: list[torch.Tensor], stage: str) -> torch.Tensor:
        tokens, targets = batch
        logits = self(tokens)
        losses = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # [B, length]
        loss = losses.mean()
        predicted = logits.argmax(dim=-1)
        correct = predicted == targets
        # Weighted by symbols (loss, acc) and by sequences (seq_acc): each epoch's value is the mean over all of them.
        self.log_dict(
            {f"{stage}_loss": loss, f"{stage}_acc": correct.float().mean()},
            on_step=False,
            on_epoch=True,
            prog_bar=stage != "test",
            batch_size=targets.numel(),
        )
        if stage != "train":
            self.log(f"{stage}_seq_acc", correct.all(dim=1).float().mean(), on_step=False, on_epoch=True, batch_size=len(targets))
        if stage == "test":
            self.record_test(target=targets, prediction=predicted, loss=losses)
        return loss
