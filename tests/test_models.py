"""The shared encoder: shapes for every cell and option, masked pooling, and learning."""

from __future__ import annotations

import re
from collections.abc import Callable

import lightning as L
import pytest
import torch
from helpers import config_encoder, fit_one_batch
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


def test_attention_pooling_weights_the_real_steps_only() -> None:
    torch.manual_seed(0)
    encoder = RecurrentEncoder(1, "torch.nn.GRU", hidden_size=3, pooling="attention")
    assert encoder.output_size == 3
    outputs = torch.randn(2, 5, 3, requires_grad=True)
    mask = torch.tensor([[False, False, True, True, True], [True, True, True, True, True]])
    pooled = encoder._pool(outputs, mask, "attention")
    scores = encoder.attention(outputs).squeeze(-1).detach()
    weights = torch.softmax(scores[0, 2:], dim=0)  # row 0: a softmax over its three real steps
    assert torch.allclose(pooled[0], weights @ outputs[0, 2:].detach(), atol=1e-6)
    changed = outputs.detach().clone()
    changed[0, :2] = 100.0  # padding: no effect on row 0
    assert torch.allclose(encoder._pool(changed, mask, "attention"), pooled.detach())
    pooled.sum().backward()  # the scorer and the outputs learn
    assert encoder.attention[0].weight.grad is not None and outputs.grad[0, :2].abs().sum() == 0
    empty = encoder._pool(outputs.detach(), torch.zeros(2, 5, dtype=torch.bool), "attention")
    assert torch.equal(empty, torch.zeros(2, 3))  # no real step: zeros, as masked mean and max give


def test_attention_draws_its_weights_after_the_cells() -> None:
    torch.manual_seed(3)
    plain = RecurrentEncoder(2, "torch.nn.LSTM", hidden_size=4, pooling=["mean", "last"])
    torch.manual_seed(3)
    attentive = RecurrentEncoder(2, "torch.nn.LSTM", hidden_size=4, pooling=["attention", "last"])
    assert all(torch.equal(a, b) for a, b in zip(plain.rnn.state_dict().values(), attentive.rnn.state_dict().values(), strict=True))
    assert attentive.output_size == 8 and not hasattr(plain, "attention")


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
        config_encoder(3, cfg)
    with pytest.raises(ConfigError, match=r"cell=rnnlab.models.cells.LSTM does not take cell_options.peepholes .*remove the option"):
        RecurrentEncoder(3, "rnnlab.models.cells.LSTM", hidden_size=4, cell_options={"peepholes": True})


@pytest.mark.parametrize("cell", ["torch.nn.GRUU", "nosuch.module.GRU", "torch.nn.functional.relu"])
def test_unknown_cell_is_refused_with_the_cells_rnnlab_ships(cell: str) -> None:
    shipped = re.escape("rnnlab ships torch.nn.GRU, torch.nn.LSTM, torch.nn.RNN, rnnlab.models.cells.GRU, rnnlab.models.cells.LSTM, ")
    with pytest.raises(ConfigError, match=rf"model.encoder.cell='{re.escape(cell)}' is not a class that can be imported .*{shipped}"):
        RecurrentEncoder(3, cell, hidden_size=4)


def make_classifier(cell: str, encoder: dict | None = None) -> SequenceClassifier:
    return SequenceClassifier(
        front_end={"_target_": "rnnlab.models.front_ends.TokenEmbedding", "vocab_size": 30, "embedding_dim": 16},
        encoder=encoder or {"cell": cell, "hidden_size": 32},
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


@pytest.mark.parametrize("cell", ["torch.nn.LSTM", "rnnlab.models.cells.LSTM"])
def test_forget_bias_shifts_only_the_forget_gates_of_every_layer_and_direction(cell: str) -> None:
    def biases(forget_bias: float) -> dict[str, torch.Tensor]:
        torch.manual_seed(5)
        encoder = RecurrentEncoder(3, cell, hidden_size=4, num_layers=2, bidirectional=True, forget_bias=forget_bias)
        return {name: p.detach().view(4, 4) for name, p in encoder.rnn.named_parameters() if name.startswith("bias")}

    torch_init, shifted = biases(0.0), biases(1.0)
    assert len(shifted) == 8  # b_ih and b_hh, 2 layers x 2 directions
    for name, bias in shifted.items():
        added = 1.0 if name.startswith("bias_ih") else 0.0  # i, f, g, o: only f moves, by 1 in total
        assert torch.equal(bias - torch_init[name], torch.tensor([0.0, added, 0.0, 0.0]).expand(4, 4).T)


def test_forget_bias_with_layer_norm_shifts_the_normalised_forget_gates() -> None:
    def parameters(forget_bias: float) -> dict[str, torch.Tensor]:
        torch.manual_seed(5)
        encoder = RecurrentEncoder(
            3, "rnnlab.models.cells.LSTM", hidden_size=4, num_layers=2, forget_bias=forget_bias, cell_options={"layer_norm": True}
        )
        return {name: p.detach().view(4, 4) for name, p in encoder.rnn.named_parameters() if "bias" in name}

    torch_init, shifted = parameters(0.0), parameters(1.0)
    # Layer norm removes b_ih's offset from the gates: the forget bias goes to the input path's layer-norm bias.
    for name, bias in shifted.items():
        added = 1.0 if name.startswith("ln_bias_ih") else 0.0
        assert torch.equal(bias - torch_init[name], torch.tensor([0.0, added, 0.0, 0.0]).expand(4, 4).T), name


def test_the_lstm_models_start_with_forget_bias_one_and_zero_gives_torchs_initialisation(compose_cfg: Callable[..., DictConfig]) -> None:
    for model in ("lstm", "lstm_scratch"):
        assert compose_cfg(f"model={model}").model.encoder.forget_bias == 1.0
    torch.manual_seed(0)
    plain = torch.nn.LSTM(3, 4)
    torch.manual_seed(0)
    encoder = RecurrentEncoder(3, "torch.nn.LSTM", hidden_size=4, forget_bias=0.0)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), encoder.rnn.state_dict().values(), strict=True))


@pytest.mark.parametrize("cell", ["torch.nn.GRU", "rnnlab.models.cells.RNN"])
def test_forget_bias_on_a_cell_without_forget_gate_is_refused(cell: str) -> None:
    with pytest.raises(ConfigError, match=rf"forget_bias=1.0 needs an LSTM cell, not {re.escape(cell)}: remove it"):
        RecurrentEncoder(3, cell, hidden_size=4, forget_bias=1.0)


@pytest.mark.parametrize(("model", "reference"), [("lstm", "gru"), ("rnn", "gru"), ("gru", "lstm"), ("lstm_scratch", "rnn")])
def test_match_params_sizes_the_width_to_the_reference_cells_count(
    model: str, reference: str, compose_cfg: Callable[..., DictConfig]
) -> None:
    def classifier(model_name: str, *overrides: str) -> SequenceClassifier:
        cfg = compose_cfg(f"model={model_name}", *overrides)
        return SequenceClassifier(
            front_end={"_target_": "rnnlab.models.front_ends.TokenEmbedding", "vocab_size": 300, "embedding_dim": 32},
            encoder=OmegaConf.to_container(cfg.model.encoder),
            optimizer={"_target_": "torch.optim.Adam", "lr": 0.01},
            scheduler=None,
            num_classes=2,
        )

    target = count_parameters(classifier(reference).net)
    matched = classifier(model, f"model.encoder.match_params={reference}").net
    assert matched.encoder.hidden_size != 128
    assert abs(count_parameters(matched) - target) <= 0.02 * target
    # The closest width: one unit more or less is further from the reference count.
    width = matched.encoder.hidden_size
    for other in (width - 1, width + 1):
        neighbour = classifier(model, f"model.encoder.hidden_size={other}").net
        assert abs(count_parameters(neighbour) - target) >= abs(count_parameters(matched) - target)


def test_match_params_leaves_the_weights_stream_where_it_was() -> None:
    encoder = {"cell": "torch.nn.LSTM", "hidden_size": 32, "match_params": "gru"}
    torch.manual_seed(1)
    matched = make_classifier("torch.nn.LSTM", encoder).net
    torch.manual_seed(1)
    direct = make_classifier("torch.nn.LSTM", {"cell": "torch.nn.LSTM", "hidden_size": matched.encoder.hidden_size}).net
    assert all(torch.equal(a, b) for a, b in zip(matched.state_dict().values(), direct.state_dict().values(), strict=True))


@pytest.mark.parametrize(
    ("encoder", "message"),
    [
        ({"hidden_size": 32, "match_params": "transformer"}, r"match_params='transformer' is not a cell to match; choose one of \['gru'"),
        ({"hidden_size": 1, "match_params": "rnn"}, r"no width of torch.nn.LSTM comes within 2% .*raise model.encoder.hidden_size"),
    ],
)
def test_bad_match_params_is_refused(encoder: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make_classifier("torch.nn.LSTM", {"cell": "torch.nn.LSTM", **encoder})
