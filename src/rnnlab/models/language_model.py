"""Character-level language model: next-character prediction with truncated back-propagation through time."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from lightning.pytorch.loggers import MLFlowLogger
from torch import nn
from torchmetrics import MeanMetric

from rnnlab.errors import ConfigError
from rnnlab.models.encoder import RecurrentEncoder, RecurrentState, match_parameters
from rnnlab.models.lit import RecurrentModule
from rnnlab.validation import is_int, is_number
from rnnlab.vocab import PAD, UNK

LN2 = math.log(2)


class CharLanguageNet(nn.Module):
    """front end -> unidirectional recurrent encoder -> next-character logits at every step.

    Carries its vocabulary, so the network MLflow stores can turn text into ids and back.
    """

    def __init__(self, front_end: nn.Module, encoder: RecurrentEncoder, vocabulary: list[str]) -> None:
        super().__init__()
        self.front_end = front_end
        self.encoder = encoder
        self.head = nn.Linear(encoder.hidden_size, len(vocabulary))
        self.vocabulary = list(vocabulary)

    def forward(self, tokens: torch.Tensor, state: RecurrentState | None = None) -> tuple[torch.Tensor, RecurrentState]:
        """Logits [B, T, vocabulary] for the character after each of `tokens` [B, T], and the final state."""
        features, _ = self.front_end(tokens)
        outputs, state = self.encoder.unroll(features, state)
        return self.head(outputs), state


def detach_state(state: RecurrentState) -> RecurrentState:
    """Cut the graph at a chunk boundary: the state flows on, the gradient stops (truncated BPTT)."""
    return tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()


def language_model_metrics(nats_per_char: torch.Tensor, stage: str) -> dict[str, torch.Tensor]:
    """Mean cross-entropy in nats per character, in bits per character, and as perplexity."""
    return {f"{stage}_loss": nats_per_char, f"{stage}_bpc": nats_per_char / LN2, f"{stage}_ppl": nats_per_char.exp()}


def check_prompt(prompt: object) -> None:
    """Refuse a prompt that is not text or is empty, before any model is loaded."""
    if not isinstance(prompt, str):
        # Hydra reads an unquoted prompt=1600 as an int (and 1600.0 as a float), so only quoting keeps the text as typed.
        example = prompt if isinstance(prompt, int | float) and not isinstance(prompt, bool) else "ROMEO."
        raise ConfigError(
            f"prompt must be text, got {prompt!r} ({type(prompt).__name__}): Hydra reads unquoted numbers, true/false and null "
            f"as values, not text. Quote it, e.g. prompt=\"'{example}'\"."
        )
    if not prompt:
        raise ConfigError("prompt is empty; give at least one character to start from, e.g. prompt='ROMEO.'.")


def encode_prompt(prompt: str, vocabulary: list[str]) -> torch.Tensor:
    """Ids of the prompt's characters; characters the model never saw in training are refused by name."""
    check_prompt(prompt)
    index = {char: i for i, char in enumerate(vocabulary) if char not in (PAD, UNK)}
    unknown = sorted({char for char in prompt if char not in index})
    if unknown:
        raise ConfigError(
            f"prompt has character(s) outside the model's vocabulary: {', '.join(map(repr, unknown))}; "
            f"use only: {''.join(sorted(index))!r}."
        )
    return torch.tensor([index[char] for char in prompt])


def check_sampling(length: int, temperature: float, top_k: int | None) -> None:
    """Refuse sampling settings of the wrong type or out of range, naming the value."""
    if not is_int(length):
        raise ConfigError(f"length must be a whole number of characters, got {length!r} ({type(length).__name__}), e.g. length=500.")
    if not is_number(temperature):
        raise ConfigError(f"temperature must be a number > 0, got {temperature!r} ({type(temperature).__name__}), e.g. temperature=0.8.")
    if top_k is not None and not is_int(top_k):
        raise ConfigError(f"top_k must be a positive integer or null (no top-k filtering), got {top_k!r} ({type(top_k).__name__}).")
    if length <= 0:
        raise ConfigError(f"length must be a positive number of characters, got {length}.")
    if not temperature > 0:
        raise ConfigError(f"temperature must be > 0 (1 samples the model's distribution, lower is more conservative), got {temperature}.")
    if top_k is not None and top_k <= 0:
        raise ConfigError(f"top_k must be a positive integer or null (no top-k filtering), got {top_k}.")


@torch.no_grad()
def generate(net: CharLanguageNet, prompt: str, length: int, temperature: float = 1.0, top_k: int | None = None, seed: int = 0) -> str:
    """`length` characters sampled after `prompt`; the same seed gives the same text.

    Each character is drawn from softmax(logits / temperature), restricted to the `top_k`
    most likely ones if set; <pad> and <unk> are never drawn. Only a generator of its own
    is used, so sampling during training leaves the global random state alone.
    """
    check_sampling(length, temperature, top_k)
    device = next(net.parameters()).device
    tokens = encode_prompt(prompt, net.vocabulary).to(device)
    banned = [i for i, char in enumerate(net.vocabulary) if char in (PAD, UNK)]
    generator = torch.Generator().manual_seed(seed)
    was_training = net.training
    net.eval()
    logits, state = net(tokens.unsqueeze(0))
    drawn = []
    for _ in range(length):
        scores = logits[0, -1].float().cpu() / temperature
        scores[banned] = -math.inf
        if top_k is not None and top_k < len(scores):
            scores[scores < scores.topk(top_k).values[-1]] = -math.inf
        next_id = int(torch.multinomial(scores.softmax(dim=-1), 1, generator=generator))
        drawn.append(next_id)
        logits, state = net(torch.tensor([[next_id]], device=device), state)
    net.train(was_training)
    return "".join(net.vocabulary[i] for i in drawn)


class LanguageModel(RecurrentModule):
    """Next-character cross-entropy over consecutive chunks, carrying the recurrent state between them.

    Batches are [B, L + 1] chunks of B parallel streams (TextStreamDataModule): the state
    at the end of one chunk, detached, starts the next, and is reset at the start of each
    epoch. Logs loss (nats per character), bpc and perplexity; the encoder's pooling is
    not used, and a bidirectional encoder is refused. At the end of each validation epoch
    a sample is written to MLflow as samples/epochNN.txt.
    """

    def __init__(
        self,
        front_end: dict,
        encoder: dict,
        optimizer: dict,
        scheduler: dict | None,
        vocabulary: list[str],
        sample_prompt: str = "\n",
        sample_length: int = 300,
        sample_temperature: float = 0.8,
    ) -> None:
        super().__init__(front_end, encoder, optimizer, scheduler)
        if encoder.get("bidirectional"):
            raise ConfigError(
                "model.encoder.bidirectional=true cannot be used for task=textgen: a bidirectional language model would read "
                "the characters it has to predict. Set model.encoder.bidirectional=false."
            )
        encode_prompt(sample_prompt, vocabulary)  # refuse a bad prompt now, not after the first epoch
        check_sampling(sample_length, sample_temperature, None)

        def make(settings: dict[str, Any]) -> CharLanguageNet:
            front = instantiate(front_end)
            unpooled = {key: value for key, value in settings.items() if key != "pooling"}
            return CharLanguageNet(front, RecurrentEncoder(input_size=front.output_size, **unpooled), vocabulary)

        self.net = make(match_parameters(encoder, make))
        self.nats = nn.ModuleDict({stage: MeanMetric() for stage in ("val", "test")})
        self.states: dict[str, RecurrentState | None] = {}

    def forward(self, tokens: torch.Tensor, state: RecurrentState | None = None) -> tuple[torch.Tensor, RecurrentState]:
        return self.net(tokens, state)

    def _nats_per_char(self, chunk: torch.Tensor, stage: str) -> torch.Tensor:
        """Cross-entropy [B, L] of each next character in the chunk, continuing from the stage's carried state."""
        inputs, targets = chunk[:, :-1], chunk[:, 1:]
        logits, state = self(inputs, self.states.get(stage))
        self.states[stage] = detach_state(state)
        return F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")

    def on_train_epoch_start(self) -> None:
        self.states["train"] = None

    def on_validation_epoch_start(self) -> None:
        self.states["val"] = None

    def on_test_epoch_start(self) -> None:
        super().on_test_epoch_start()
        self.states["test"] = None

    def training_step(self, chunk: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self._nats_per_char(chunk, "train").mean()
        # Weighted by characters, so the epoch value is the mean over all of them (bpc is linear in the
        # loss and averages the same way; perplexity is not, so it is left to val and test).
        metrics = {"train_loss": loss, "train_bpc": loss / LN2}
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=True, batch_size=chunk[:, 1:].numel())
        return loss

    def validation_step(self, chunk: torch.Tensor, batch_idx: int) -> None:
        self.nats["val"].update(self._nats_per_char(chunk, "val"))

    def test_step(self, chunk: torch.Tensor, batch_idx: int) -> None:
        nats = self._nats_per_char(chunk, "test")
        self.nats["test"].update(nats)
        # Per row of the chunk: its mean loss and its length, so that compare can weight chunks by characters.
        self.record_test(loss=nats.mean(dim=1), characters=torch.full((len(nats),), nats.shape[1]))

    def _log_epoch(self, stage: str) -> None:
        nats = self.nats[stage].compute()
        self.nats[stage].reset()
        self.log_dict(language_model_metrics(nats, stage), prog_bar=stage == "val")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")
        if isinstance(self.logger, MLFlowLogger) and not self.trainer.sanity_checking:
            self._log_sample()

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def _log_sample(self) -> None:
        prompt = self.hparams.sample_prompt
        text = prompt + generate(self.net, prompt, self.hparams.sample_length, self.hparams.sample_temperature)
        self.logger.experiment.log_text(self.logger.run_id, text, f"samples/epoch{self.current_epoch:02d}.txt")
