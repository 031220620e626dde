"""The shared encoder: shapes for every cell and option, masked pooling, and learning."""

from __future__ import annotations

import re
from collections.abc import Callable

import lightning as L
import pytest
import torch
from helpers import fit_one_batch
from omegaconf import DictConfig, OmegaConf

from rnnlab.errors import ConfigError
from rnnlab.models.encoder import RecurrentEncoder, count_parameters
from rnnlab.models.lit import SequenceClassifier

CELLS = ["torch.nn.GRU", "torch.nn.LSTM", "torch.nn.RNN"]


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_encoder_output_shapes(cell: str, bidirectional: bool, num_layers: int) -> None:
    encoder = RecurrentEncoder(
        6, cell, hidden_size=5, num_layers=num_layers, bidirectional=bidirectional, dropout=0.1, pooling=["mean", "last", "max"]
    )
    pooled, outputs = encoder(torch.randn(4, 7, 6), torch.ones(4, 7, dtype=torch.bool))
    directions = 2 if bidirectional else 1
    assert outputs.shape == (4, 7, 5 * directions)
    assert pooled.shape == (4, encoder.output_size) == (4, 3 * 5 * directions)


@pytest.mark.parametrize(("cell", "gates"), [("torch.nn.GRU", 3), ("torch.nn.LSTM", 4), ("torch.nn.RNN", 1)])
def test_parameter_count_matches_the_formula(cell: str, gates: int) -> None:
    encoder = RecurrentEncoder(10, cell, hidden_size=7, num_layers=1)
    h, i = 7, 10
    assert count_parameters(encoder) == gates * (h * i + h * h + 2 * h)


def test_masked_pooling_ignores_padding_for_both_directions() -> None:
    encoder = RecurrentEncoder(1, "torch.nn.GRU", hidden_size=2, bidirectional=True, pooling="last")
    # Per step: forward half = step index, backward half = -step index.
    steps = torch.arange(5, dtype=torch.float32)
    outputs = torch.stack([steps, steps, -steps, -steps], dim=-1).expand(2, 5, 4)
    mask = torch.tensor([[False, False, True, True, True], [True, True, True, False, False]])
    last = encoder._pool(outputs, mask, "last")
    assert last.tolist() == [[4, 4, -2, -2], [2, 2, -0.0, -0.0]]
    assert encoder._pool(outputs, mask, "mean")[:, 0].tolist() == [3.0, 1.0]
    assert encoder._pool(outputs, mask, "max")[:, 0].tolist() == [4.0, 2.0]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"hidden_size": 0}, "hidden_size"), ({"dropout": -0.5}, "dropout"), ({"pooling": ["median"]}, "pooling")],
)
def test_bad_encoder_settings_are_refused(kwargs: dict, message: str) -> None:
    settings = {"hidden_size": 4, **kwargs}
    with pytest.raises(ConfigError, match=message):
        RecurrentEncoder(3, "torch.nn.GRU", **settings)


def test_an_option_torchs_cell_lacks_points_to_rnnlabs_own_cell(compose_cfg: Callable[..., DictConfig]) -> None:
    cfg = compose_cfg("model=gru", "+model.encoder.cell_options.recurrent_dropout=0.2")
    message = r"cell=torch.nn.GRU does not take cell_options.recurrent_dropout .*model=gru_scratch"
    with pytest.raises(ConfigError, match=message):
        RecurrentEncoder(input_size=3, **OmegaConf.to_container(cfg.model.encoder))
    with pytest.raises(ConfigError, match=r"cell=rnnlab.models.cells.LSTM does not take cell_options.peepholes .*remove the option"):
        RecurrentEncoder(3, "rnnlab.models.cells.LSTM", hidden_size=4, cell_options={"peepholes": True})


@pytest.mark.parametrize("cell", ["torch.nn.GRUU", "nosuch.module.GRU", "torch.nn.functional.relu"])
def test_unknown_cell_is_refused_with_the_cells_rnnlab_ships(cell: str) -> None:
    shipped = re.escape("rnnlab ships torch.nn.GRU, torch.nn.LSTM, torch.nn.RNN, rnnlab.models.cells.GRU, rnnlab.models.cells.LSTM, ")
    with pytest.raises(ConfigError, match=rf"model.encoder.cell='{re.escape(cell)}' is not a class that can be imported .*{shipped}"):
        RecurrentEncoder(3, cell, hidden_size=4)


def make_classifier(cell: str) -> SequenceClassifier:
    return SequenceClassifier(
        front_end={"_target_": "rnnlab.models.front_ends.TokenEmbedding", "vocab_size": 30, "embedding_dim": 16},
        encoder={"cell": cell, "hidden_size": 32},
        optimizer={"_target_": "torch.optim.Adam", "lr": 0.01},
        scheduler=None,
        num_classes=2,
    )


@pytest.mark.parametrize("cell", CELLS)
def test_classifier_overfits_one_batch(cell: str) -> None:
    L.seed_everything(0)
    model = make_classifier(cell)
    tokens = torch.randint(1, 30, (16, 12))
    tokens[:, :3] = 0  # left padding
    labels = torch.randint(0, 2, (16,))
    assert fit_one_batch(model, tokens, labels, steps=150) < 0.05
    assert (model(tokens).argmax(-1) == labels).all()
