"""The shared sequence encoder: any torch.nn.RNNBase-style cell plus pooling over time.

The cell is the experiment's variable; everything else (dropout, pooling, masking)
is identical for GRU, LSTM and RNN so that comparisons are fair.
"""

from __future__ import annotations

import difflib
import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from hydra.utils import get_class
from torch import nn

from rnnlab.errors import ConfigError

POOLINGS = ("last", "mean", "max", "attention")
# h_n of GRU/RNN, (h_n, c_n) of LSTM: [num_layers * directions, B, hidden] each.
RecurrentState = torch.Tensor | tuple[torch.Tensor, ...]
SHIPPED_CELLS = (
    *(f"torch.nn.{name}" for name in ("GRU", "LSTM", "RNN")),
    *(f"rnnlab.models.cells.{name}" for name in ("GRU", "LSTM", "RNN")),
)
SCRATCH_MODELS = "gru_scratch, lstm_scratch or rnn_scratch"
# model.encoder.match_params: a reference cell by its model name.
REFERENCE_CELLS = {"gru": "torch.nn.GRU", "lstm": "torch.nn.LSTM", "rnn": "torch.nn.RNN"}
MATCH_TOLERANCE = 0.02  # relative difference in parameter count a matched width may leave


def check_encoder_settings(encoder: Mapping[str, Any]) -> None:
    """Refuse a setting the encoder does not have (model.encoder): a typo added with `+` (as Hydra suggests) would
    otherwise be a TypeError from the constructor, and the setting meant would silently keep its default."""
    # input_size comes from the data; match_params is resolved into hidden_size before the encoder is built.
    settings = sorted(set(inspect.signature(RecurrentEncoder).parameters) - {"input_size"} | {"match_params"})
    for key in encoder:
        if key not in settings:
            close = difflib.get_close_matches(str(key), settings, n=1)
            hint = f" (did you mean model.encoder.{close[0]}?)" if close else ""
            raise ConfigError(f"model.encoder.{key} is not an encoder setting{hint}; the settings are {', '.join(settings)}.")


def resolve_cell(cell: str | type[nn.Module]) -> type[nn.Module]:
    """The cell class at a dotted path (model.encoder.cell), or a ConfigError listing the cells rnnlab ships."""
    if not isinstance(cell, str):
        return cell
    try:
        return get_class(cell)
    except (ImportError, ValueError) as err:  # no such module or attribute / not a class
        raise ConfigError(
            f"model.encoder.cell={cell!r} is not a class that can be imported ({str(err).splitlines()[0]}); "
            f"rnnlab ships {', '.join(SHIPPED_CELLS)} (model=gru, lstm, rnn, {SCRATCH_MODELS})."
        ) from err


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def match_parameters(encoder: Mapping[str, Any], build: Callable[[dict[str, Any]], nn.Module]) -> dict[str, Any]:
    """The encoder settings with `match_params` resolved: the width at which `build(settings)` has the
    parameter count (within 2%) that the reference cell has at `hidden_size`, on the same task.

    `build` makes the whole network from encoder settings, so front end and head count too.
    Candidate networks are built inside a fork of torch's generator: the search leaves the
    weights stream where it was, and the real network draws what it would have unmatched.
    """
    settings = {key: value for key, value in encoder.items() if key != "match_params"}
    reference = encoder.get("match_params")
    if not reference:
        return settings
    if reference not in REFERENCE_CELLS:
        raise ConfigError(
            f"model.encoder.match_params={reference!r} is not a cell to match; choose one of {list(REFERENCE_CELLS)} or null."
        )

    def parameters(candidate: dict[str, Any]) -> int:
        with torch.random.fork_rng(devices=[]):
            return count_parameters(build(candidate))

    @functools.cache  # the bisection and the checks after it ask for the same widths again
    def at_width(width: int) -> int:
        return parameters({**settings, "hidden_size": width})

    plain = {key: value for key, value in settings.items() if key not in ("cell_options", "forget_bias")}
    target = parameters({**plain, "cell": REFERENCE_CELLS[reference]})
    # The count grows with the width: double to bracket the target, then bisect.
    low, high = 1, max(int(settings["hidden_size"]), 1)
    while at_width(high) < target:
        low, high = high, 2 * high
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if at_width(middle) < target else (low, middle)
    width = min((low, high), key=lambda w: abs(at_width(w) - target))
    if abs(at_width(width) - target) > MATCH_TOLERANCE * target:
        raise ConfigError(
            f"model.encoder.match_params={reference}: no width of {settings['cell']} comes within {MATCH_TOLERANCE:.0%} of "
            f"the {target:,} parameters of {reference} at hidden_size={settings['hidden_size']} (closest: width {width}, "
            f"{at_width(width):,}); raise model.encoder.hidden_size or set match_params=null."
        )
    return {**settings, "hidden_size": width}


class RecurrentEncoder(nn.Module):
    """Runs a recurrent cell over [B, T, F] features and pools the outputs over time.

    `cell_options` are passed to the cell's constructor as they are: the options a cell
    has beyond torch.nn.RNNBase's (e.g. rnnlab's `recurrent_dropout` and `layer_norm`).
    `forget_bias` (LSTM cells only) is added to every forget gate's bias after the cell's own
    initialisation, which draws the same numbers whatever its value: 0 keeps torch's
    initialisation, 1 is Jozefowicz et al.'s (2015) advice.

    Pooling: `last`, `mean`, `max`, or `attention`, additive attention over time (Bahdanau et al., 2015):
    a score v . tanh(W h_t + b) per step, softmax over the real steps, and the weighted mean of the
    outputs; its parameters are drawn after the cell's, so other poolings draw the same weights.
    With a padding mask, pooling ignores padded steps and "last" takes the forward
    direction at the last real step and the backward direction at the first one, so
    left and right padding both work.
    """

    def __init__(
        self,
        input_size: int,
        cell: str | type[nn.Module],
        hidden_size: int,
        num_layers: int = 1,
        bidirectional: bool = False,
        dropout: float = 0.0,
        pooling: Sequence[str] = ("mean", "last"),
        cell_options: Mapping[str, Any] | None = None,
        forget_bias: float = 0.0,
    ) -> None:
        super().__init__()
        if hidden_size <= 0 or num_layers <= 0:
            raise ConfigError(f"model.encoder.hidden_size ({hidden_size}) and num_layers ({num_layers}) must be positive.")
        if not 0 <= dropout < 1:
            raise ConfigError(f"model.encoder.dropout must be in [0, 1), got {dropout}.")
        pooling = [pooling] if isinstance(pooling, str) else list(pooling)
        unknown = [p for p in pooling if p not in POOLINGS]
        if unknown or not pooling:
            raise ConfigError(f"model.encoder.pooling {pooling} is invalid; choose one or more of {list(POOLINGS)}.")
        cell_class = resolve_cell(cell)
        cell_options = dict(cell_options or {})
        try:
            self.rnn = cell_class(
                input_size,
                hidden_size,
                num_layers=num_layers,
                batch_first=True,
                dropout=dropout if num_layers > 1 else 0.0,
                bidirectional=bidirectional,
                **cell_options,
            )
        except TypeError as err:
            # A constructor refuses an unknown keyword with a TypeError naming it; any other TypeError is not the user's option.
            refused = [option for option in cell_options if f"'{option}'" in str(err)]
            if not refused:
                raise
            name = cell if isinstance(cell, str) else f"{cell.__module__}.{cell.__qualname__}"
            fix = "remove the option"
            if cell_class.__module__.startswith("torch.nn") and cell_class.__name__ in ("GRU", "LSTM", "RNN"):
                fix = f"use rnnlab's own cell, model={cell_class.__name__.lower()}_scratch, or {fix}"
            raise ConfigError(
                f"model.encoder.cell={name} does not take cell_options.{refused[0]} ({err}); only rnnlab's own cells "
                f"(model={SCRATCH_MODELS}) take options, recurrent_dropout and layer_norm: {fix}."
            ) from err
        if forget_bias:
            _add_forget_bias(self.rnn, forget_bias, cell)
        self.dropout = nn.Dropout(dropout)
        self.pooling = pooling
        self.hidden_size = hidden_size
        self.directions = 2 if bidirectional else 1
        self.output_size = hidden_size * self.directions * len(pooling)
        if "attention" in pooling:
            width = hidden_size * self.directions
            self.attention = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1, bias=False))

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (pooled [B, output_size], per-step outputs [B, T, directions * hidden])."""
        outputs, _ = self.unroll(features)
        pooled = torch.cat([self._pool(outputs, mask, kind) for kind in self.pooling], dim=-1)
        return pooled, outputs

    def unroll(self, features: torch.Tensor, state: RecurrentState | None = None) -> tuple[torch.Tensor, RecurrentState]:
        """Per-step outputs [B, T, directions * hidden] (after dropout) and the cell's final state.

        Starts from `state` (zeros when None), so a language model can carry the state
        from one chunk of a long sequence to the next.
        """
        outputs, final_state = self.rnn(features) if state is None else self.rnn(features, state)
        return self.dropout(outputs), final_state

    def _pool(self, outputs: torch.Tensor, mask: torch.Tensor | None, kind: str) -> torch.Tensor:
        if kind == "last":
            return self._last(outputs, mask)
        if kind == "attention":
            scores = self.attention(outputs).squeeze(-1)  # [B, T]
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            # An all-padding row gets uniform weights over nothing: zeros, as the masked mean and max give.
            weights = torch.softmax(scores, dim=1).nan_to_num(0.0)
            return torch.einsum("bt,btd->bd", weights, outputs)
        if mask is None:
            return outputs.mean(dim=1) if kind == "mean" else outputs.amax(dim=1)
        weights = mask.unsqueeze(-1).to(outputs.dtype)
        if kind == "mean":
            return (outputs * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
        return outputs.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(dim=1).nan_to_num(neginf=0.0)

    def _last(self, outputs: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        batch, steps, _ = outputs.shape
        if mask is None:
            last = torch.full((batch,), steps - 1, device=outputs.device)
            first = torch.zeros(batch, dtype=torch.long, device=outputs.device)
        else:
            positions = torch.arange(steps, device=outputs.device).expand(batch, steps)
            last = positions.masked_fill(~mask, -1).amax(dim=1).clamp_min(0)
            first = positions.masked_fill(~mask, steps).amin(dim=1).clamp_max(steps - 1)
        rows = torch.arange(batch, device=outputs.device)
        forward = outputs[rows, last, : self.hidden_size]
        if self.directions == 1:
            return forward
        return torch.cat([forward, outputs[rows, first, self.hidden_size :]], dim=-1)


def _add_forget_bias(rnn: nn.Module, forget_bias: float, cell: str | type[nn.Module]) -> None:
    """Add `forget_bias` to the forget gate's slice (the second of the four, torch's i, f, g, o order) of every b_ih;
    with rnnlab's layer_norm, of every input-path layer-norm bias instead (normalisation removes b_ih's offset)."""
    if getattr(rnn, "mode", None) != "LSTM":
        raise ConfigError(f"model.encoder.forget_bias={forget_bias} needs an LSTM cell, not {cell}: remove it or use model=lstm.")
    prefix = "ln_bias_ih" if getattr(rnn, "layer_norm", False) else "bias_ih"
    biases = [parameter for name, parameter in rnn.named_parameters() if name.startswith(prefix)]
    if not biases:
        raise ConfigError(f"model.encoder.forget_bias={forget_bias} needs the cell's biases: remove it or drop bias=false.")
    with torch.no_grad():
        for bias in biases:
            bias.view(4, -1)[1] += forget_bias


class SequenceNet(nn.Module):
    """front end -> recurrent encoder -> head. This is the network MLflow stores."""

    def __init__(self, front_end: nn.Module, encoder: RecurrentEncoder, head: nn.Module) -> None:
        super().__init__()
        self.front_end = front_end
        self.encoder = encoder
        self.head = head

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        features, mask = self.front_end(inputs)
        pooled, _ = self.encoder(features, mask)
        return self.head(pooled)
