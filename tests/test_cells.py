"""rnnlab's GRU, LSTM and RNN against torch.nn's: same function, same gradients, same parameter layout."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
import pytest
import torch
import torch.nn.functional as F
from helpers import config_encoder, isolated_outputs
from hydra import compose, initialize_config_dir
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from rnnlab import bench
from rnnlab.config import config_dir
from rnnlab.errors import ConfigError, DataError
from rnnlab.models import cells
from rnnlab.models.encoder import RecurrentEncoder
from rnnlab.training import train

KINDS = ["GRU", "LSTM", "RNN"]
# Each cell, and the LSTM with projections (proj_size=2) besides: (cell, constructor options).
VARIANTS = {"GRU": ("GRU", {}), "LSTM": ("LSTM", {}), "LSTM-proj": ("LSTM", {"proj_size": 2}), "RNN": ("RNN", {})}
# Largest absolute difference allowed between torch's results and rnnlab's (issue #4's bounds).
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Any:
    """Tiny tensors gain nothing from threads, and on a busy machine every parallel region waits for a time slice."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_pair(kind: str, dtype: torch.dtype = torch.float64, **kwargs: Any) -> tuple[nn.Module, nn.Module]:
    """torch's cell and rnnlab's, with torch's weights loaded into rnnlab's."""
    reference = getattr(nn, kind)(**kwargs).to(dtype)
    ours = getattr(cells, kind)(**kwargs).to(dtype)
    ours.load_state_dict(reference.state_dict())
    return reference, ours


def as_tuple(state: Any) -> tuple[torch.Tensor, ...]:
    return state if isinstance(state, tuple) else (state,)


def weighted_loss(output: torch.Tensor, state: Any) -> torch.Tensor:
    """A loss that gives every output element and final state a different gradient."""
    weights = torch.arange(output.numel(), dtype=output.dtype).view_as(output).sin()
    return (output * weights).sum() + sum(s.cos().sum() for s in as_tuple(state))


def max_difference(first: Any, second: Any) -> float:
    """The largest difference between paired tensors, relative to the first one's scale where that exceeds one."""
    pairs = zip(first, second, strict=True)
    return max(((a - b).abs().max() / a.abs().max().clamp_min(1)).item() for a, b in pairs if a.numel())


@st.composite
def shapes(draw: st.DrawFn) -> dict[str, Any]:
    case = {
        "batch": draw(st.integers(1, 8)),
        "length": draw(st.integers(1, 40)),
        "input_size": draw(st.integers(1, 9)),
        "hidden_size": draw(st.integers(1, 9)),
        "num_layers": draw(st.integers(1, 3)),
        "bidirectional": draw(st.booleans()),
        "batch_first": draw(st.booleans()),
        "bias": draw(st.booleans()),
        "initial_state": draw(st.booleans()),
        # padded: every sequence runs all steps; lengths: rnnlab's `lengths` argument; packed: a PackedSequence.
        "lengths": draw(st.sampled_from(["padded", "lengths", "packed"])),
        "seed": draw(st.integers(0, 2**16)),
    }
    # Read by the LSTM with projections only: below hidden_size, so none (a plain LSTM) when hidden_size is 1.
    case["proj_size"] = draw(st.integers(1, case["hidden_size"] - 1)) if case["hidden_size"] > 1 else 0
    return case


def run_both(variant: str, dtype: torch.dtype, case: dict[str, Any]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Outputs, final states and the gradients of every input, initial state and parameter, torch's then rnnlab's."""
    kind, projected = VARIANTS[variant][0], "proj_size" in VARIANTS[variant][1]
    generator = torch.Generator().manual_seed(case["seed"])
    torch.manual_seed(case["seed"])
    options = {k: case[k] for k in ("input_size", "hidden_size", "num_layers", "bidirectional", "batch_first", "bias")}
    if projected:
        options["proj_size"] = case["proj_size"]
    reference, ours = make_pair(kind, dtype, **options)
    batch, length = case["batch"], case["length"]
    shape = (batch, length, case["input_size"]) if case["batch_first"] else (length, batch, case["input_size"])
    inputs = torch.randn(shape, dtype=dtype, generator=generator, requires_grad=True)
    layers = case["num_layers"] * (2 if case["bidirectional"] else 1)
    widths = [options.get("proj_size") or case["hidden_size"]] + ([case["hidden_size"]] if kind == "LSTM" else [])  # h's, then c's
    initial = tuple(torch.randn(layers, batch, width, dtype=dtype, generator=generator, requires_grad=True) for width in widths)
    hx = (initial if kind == "LSTM" else initial[0]) if case["initial_state"] else None
    lengths = torch.randint(1, length + 1, (batch,), generator=generator)
    results = []
    for module in (reference, ours):
        if case["lengths"] == "padded":
            output, state = module(inputs, hx)
        elif case["lengths"] == "lengths" and module is ours:
            output, state = module(inputs, hx, lengths=lengths)
        else:
            packed = pack_padded_sequence(inputs, lengths, batch_first=case["batch_first"], enforce_sorted=False)
            output, state = module(packed, hx)
            assert isinstance(output, PackedSequence)
            output = pad_packed_sequence(output, batch_first=case["batch_first"], total_length=length)[0]
        leaves = [inputs, *(initial if case["initial_state"] else ()), *module.parameters()]
        gradients = torch.autograd.grad(weighted_loss(output, state), leaves)
        results.append([output, *as_tuple(state), *gradients])
    return results[0], results[1]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("variant", VARIANTS)
# Derandomized: the same 30 cases on every machine and run, so a failure reproduces and CI is not a lottery.
@settings(max_examples=30, deadline=None, derandomize=True)
@given(case=shapes())
def test_outputs_states_and_gradients_equal_torch(variant: str, dtype: torch.dtype, case: dict[str, Any]) -> None:
    expected, actual = run_both(variant, dtype, case)
    assert len(expected) == len(actual)
    # Relative to each tensor's scale where that exceeds one: gradients summed over 40 steps and 3 layers reach
    # tens, and float32 keeps 7 digits of them whichever order the two implementations add in.
    assert max_difference(expected, actual) <= TOLERANCE[dtype]


def test_relu_rnn_equals_torch() -> None:
    torch.manual_seed(0)
    reference, ours = make_pair("RNN", input_size=3, hidden_size=5, num_layers=2, nonlinearity="relu")
    inputs = torch.randn(9, 4, 3, dtype=torch.float64, requires_grad=True)
    results = []
    for module in (reference, ours):
        output, state = module(inputs)
        results.append([output, state, *torch.autograd.grad(weighted_loss(output, state), [inputs, *module.parameters()])])
    assert max_difference(*results) <= 1e-10


def test_unbatched_input_equals_torch() -> None:
    torch.manual_seed(0)
    reference, ours = make_pair("LSTM", input_size=3, hidden_size=4, bidirectional=True)
    inputs = torch.randn(6, 3, dtype=torch.float64)
    initial = (torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64))
    (expected, (h, c)), (actual, (our_h, our_c)) = reference(inputs, initial), ours(inputs, initial)
    assert actual.shape == (6, 8) and our_h.shape == (2, 4)
    assert max_difference([expected, h, c], [actual, our_h, our_c]) <= 1e-10


@pytest.mark.parametrize("variant", ["GRU", "LSTM-proj"])
def test_dropout_between_layers_draws_the_same_masks_as_torch(variant: str) -> None:
    torch.manual_seed(0)
    kind, options = VARIANTS[variant]
    reference, ours = make_pair(kind, input_size=3, hidden_size=4, num_layers=3, dropout=0.5, **options)
    inputs = torch.randn(5, 2, 3, dtype=torch.float64)
    outputs = []
    for module in (reference, ours):
        torch.manual_seed(1)
        outputs.append(module(inputs)[0])
    assert max_difference([outputs[0]], [outputs[1]]) <= 1e-10
    assert max_difference([outputs[1]], [ours.eval()(inputs)[0]]) > 1e-3  # dropout did act


def test_the_other_update_convention_is_the_same_gru_with_the_z_rows_negated() -> None:
    """h = z ⊙ n + (1 - z) ⊙ h_prev (Cho et al., Keras' docs) against PyTorch's h = (1 - z) ⊙ n + z ⊙ h_prev."""
    torch.manual_seed(0)
    gru = cells.GRU(3, 5).double()
    z_rows = slice(5, 10)  # gate order r, z, n
    w_ih, w_hh, b_ih, b_hh = (p.detach().clone() for p in (gru.weight_ih_l0, gru.weight_hh_l0, gru.bias_ih_l0, gru.bias_hh_l0))
    for parameter in (w_ih, w_hh, b_ih, b_hh):
        parameter[z_rows] *= -1
    inputs = torch.randn(7, 2, 3, dtype=torch.float64)
    h = torch.zeros(2, 5, dtype=torch.float64)
    outputs = []
    for x in inputs:
        (gi_r, gi_z, gi_n), (gh_r, gh_z, gh_n) = (x @ w_ih.T + b_ih).chunk(3, 1), (h @ w_hh.T + b_hh).chunk(3, 1)
        r, z = torch.sigmoid(gi_r + gh_r), torch.sigmoid(gi_z + gh_z)
        n = torch.tanh(gi_n + r * gh_n)
        h = z * n + (1 - z) * h
        outputs.append(h)
    assert max_difference([torch.stack(outputs)], [gru(inputs)[0]]) <= 1e-12


# --- the hand-derived backward and the differentiable one, checked numerically --------------------------

SCANS = {"GRU": cells._GRUScan, "LSTM": cells._LSTMScan, "RNN": cells._RNNScan}
OPTIONS = {
    "plain": {},
    "no bias": {"bias": False},
    "recurrent dropout": {"mask": True},
    "layer norm": {"layer_norm": True},
    "all options": {"mask": True, "layer_norm": True},
}
# The LSTM's projection (W_hr) besides, alone and with every option.
SCAN_CASES = [(kind, name, options) for kind in KINDS for name, options in OPTIONS.items()] + [
    ("LSTM", "projection", {"projection": True}),
    ("LSTM", "projection, all options", {"projection": True, "mask": True, "layer_norm": True}),
]


@pytest.mark.parametrize(("kind", "name", "options"), SCAN_CASES, ids=[f"{kind}-{name}" for kind, name, _ in SCAN_CASES])
def test_custom_backward_passes_gradcheck_and_gradgradcheck(kind: str, name: str, options: dict[str, bool]) -> None:
    scan = SCANS[kind]
    batch_sizes, size = (3, 3, 2, 1), 3  # variable lengths 4, 3, 2
    width = 2 if options.get("projection") else size  # h's: proj_size with a projection
    layout = cells._Layout(batch_sizes, torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)

    def tensor(*shape: int, grad: bool = True) -> torch.Tensor:
        return torch.randn(*shape, dtype=torch.float64, generator=generator).requires_grad_(grad)

    gi, w_hh = tensor(layout.rows, scan.gates * size), tensor(scan.gates * size, width)
    b_hh = tensor(scan.gates * size) if options.get("bias", True) else None
    ln_weight, ln_bias = (tensor(scan.gates * size), tensor(scan.gates * size)) if options.get("layer_norm") else (None, None)
    mask = torch.bernoulli(torch.full((3, width), 0.6, dtype=torch.float64), generator=generator) / 0.6 if options.get("mask") else None
    initial = [tensor(3, width), tensor(3, size)][: 2 if kind == "LSTM" else 1]
    # What follows the initial states: the LSTM's W_hr (None without a projection), the RNN's nonlinearity.
    trailing = {"GRU": [], "LSTM": [tensor(width, size) if options.get("projection") else None], "RNN": ["tanh"]}[kind]
    arguments = (gi, w_hh, b_hh, ln_weight, ln_bias, *initial, *trailing)

    def scan_with_mask(*args: Any) -> Any:
        return scan.apply(layout, *args[:5], mask, *args[5:])

    # The first-order check runs the hand-derived backward (and, for its batched part, the recomputed one).
    assert torch.autograd.gradcheck(scan_with_mask, arguments, check_batched_grad=True)
    assert torch.autograd.gradgradcheck(scan_with_mask, arguments, fast_mode=True)


# Double backward: 2 layers, both directions, each cell and nonlinearity, with and without biases, padded and packed.
DOUBLE_BACKWARD_VARIANTS = {**VARIANTS, "RNN-relu": ("RNN", {"nonlinearity": "relu"})}
DOUBLE_BACKWARD_CASES = [
    (variant, bias, packed) for variant in DOUBLE_BACKWARD_VARIANTS for bias in (True, False) for packed in (False, True)
]
DOUBLE_BACKWARD_IDS = [f"{v}-{'bias' if b else 'no bias'}-{'packed' if p else 'padded'}" for v, b, p in DOUBLE_BACKWARD_CASES]
# gradgradcheck takes seconds a case: with bias on packed input per cell in `make test`, every case in the slow suite.
GRADGRADCHECK_CASES = [
    pytest.param(*case, id=name, marks=() if case[1:] == (True, True) else pytest.mark.slow)
    for case, name in zip(DOUBLE_BACKWARD_CASES, DOUBLE_BACKWARD_IDS, strict=True)
]


def double_backward_case(variant: str, bias: bool, packed: bool) -> tuple[nn.Module, nn.Module, Any, torch.Tensor]:
    """torch's cell and rnnlab's (the same weights), a function running one on the inputs to (output, state), and inputs."""
    kind, options = DOUBLE_BACKWARD_VARIANTS[variant]
    torch.manual_seed(0)
    reference, ours = make_pair(kind, input_size=2, hidden_size=3, num_layers=2, bidirectional=True, bias=bias, **options)
    inputs = torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True)

    def run(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        output, state = module(pack_padded_sequence(x, [4, 2, 3], enforce_sorted=False) if packed else x)
        return (output.data if packed else output), state

    return reference, ours, run, inputs


@pytest.mark.parametrize(("variant", "bias", "packed"), DOUBLE_BACKWARD_CASES, ids=DOUBLE_BACKWARD_IDS)
def test_second_derivatives_equal_torchs(variant: str, bias: bool, packed: bool) -> None:
    reference, ours, run, inputs = double_backward_case(variant, bias, packed)
    results = []
    for module in (reference, ours):
        leaves = [inputs, *module.parameters()]
        gradients = torch.autograd.grad(weighted_loss(*run(module, inputs)), leaves, create_graph=True)
        penalty = sum((gradient * gradient.sin()).sum() for gradient in gradients)  # a gradient penalty, as in WGAN-GP
        results.append([*gradients, *torch.autograd.grad(penalty, leaves)])
    assert max_difference(*results) <= 1e-10


@pytest.mark.parametrize(("variant", "bias", "packed"), GRADGRADCHECK_CASES)
def test_double_backward_passes_gradgradcheck(variant: str, bias: bool, packed: bool) -> None:
    _, ours, run, inputs = double_backward_case(variant, bias, packed)

    def tensors(x: torch.Tensor, *parameters: torch.Tensor) -> tuple[torch.Tensor, ...]:
        output, state = run(ours, x)  # the parameters are the module's own, which gradgradcheck perturbs in place
        return (output, *as_tuple(state))

    assert torch.autograd.gradgradcheck(tensors, (inputs, *ours.parameters()), fast_mode=True)


def test_an_ordinary_backward_takes_the_hand_derived_path(monkeypatch: pytest.MonkeyPatch) -> None:
    def recomputed(*args: Any) -> None:
        raise AssertionError("an ordinary backward recomputed the scan")

    monkeypatch.setattr(cells, "_recomputed_gradients", recomputed)
    for kind, options in VARIANTS.values():
        output, state = getattr(cells, kind)(3, 4, **options)(torch.randn(5, 2, 3, requires_grad=True))
        weighted_loss(output, state).backward()


def test_batched_gradients_give_torchs_jacobian() -> None:
    """vmap over the backward (jacobian's vectorize=True, is_grads_batched) takes the recomputed path."""
    reference, ours = make_pair("LSTM", input_size=2, hidden_size=3, proj_size=2)
    inputs = torch.randn(4, 2, dtype=torch.float64)
    jacobians = [torch.autograd.functional.jacobian(lambda x, m=module: m(x)[0], inputs, vectorize=True) for module in (reference, ours)]
    assert max_difference(*[[jacobian] for jacobian in jacobians]) <= 1e-10


# --- parameter layout ------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_state_dicts_load_both_ways(variant: str) -> None:
    kind, projection = VARIANTS[variant]
    options = {"input_size": 5, "hidden_size": 4, "num_layers": 2, "bidirectional": True, **projection}
    reference, ours = getattr(nn, kind)(**options), getattr(cells, kind)(**options)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}
    ours.load_state_dict(reference.state_dict())
    fresh = getattr(nn, kind)(**options)
    fresh.load_state_dict(ours.state_dict())
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in reference.state_dict().items())


@pytest.mark.parametrize("variant", VARIANTS)
def test_same_seed_draws_the_same_initial_weights_as_torch(variant: str) -> None:
    kind, projection = VARIANTS[variant]
    torch.manual_seed(3)
    reference = getattr(nn, kind)(4, 6, num_layers=2, **projection)
    torch.manual_seed(3)
    ours = getattr(cells, kind)(4, 6, num_layers=2, **projection)
    assert list(ours.state_dict()) == list(reference.state_dict())
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in reference.state_dict().items())


def test_same_seed_gives_an_encoder_identical_to_torchs() -> None:
    features = torch.randn(3, 7, 6)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[0, :2] = False
    pooled = []
    for cell in ("torch.nn.GRU", "rnnlab.models.cells.GRU"):
        torch.manual_seed(0)
        encoder = RecurrentEncoder(6, cell, hidden_size=5, num_layers=2, bidirectional=True).eval()
        pooled.append(encoder(features, mask)[0])
    assert max_difference([pooled[0]], [pooled[1]]) <= 1e-5


def test_options_are_off_by_default_and_add_named_parameters_when_on() -> None:
    plain = cells.GRU(3, 4)
    assert plain.recurrent_dropout == 0.0 and plain.layer_norm is False
    assert set(plain.state_dict()) == set(nn.GRU(3, 4).state_dict())
    normed = cells.GRU(3, 4, layer_norm=True, bidirectional=True)
    extra = set(normed.state_dict()) - set(nn.GRU(3, 4, bidirectional=True).state_dict())
    assert extra == {f"ln_{kind}_{path}_l0{suffix}" for kind in ("weight", "bias") for path in ("ih", "hh") for suffix in ("", "_reverse")}
    assert "layer_norm=True" in repr(normed)


# --- the two options -------------------------------------------------------------------------------


def reference_layer(kind: str, module: nn.Module, inputs: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """A textbook one-layer loop with autograd: recurrent-dropout mask on h_{t-1}, per-gate layer norm, the LSTM's projection."""
    gates = {"GRU": 3, "LSTM": 4, "RNN": 1}[kind]
    hidden_size = module.hidden_size

    def norm(pre: torch.Tensor, path: str) -> torch.Tensor:
        if not module.layer_norm:
            return pre
        weight, bias = getattr(module, f"ln_weight_{path}_l0"), getattr(module, f"ln_bias_{path}_l0")
        normalised = F.layer_norm(pre.view(len(pre), gates, hidden_size), [hidden_size], eps=1e-5).view_as(pre)
        return normalised * weight + bias

    h, c = inputs.new_zeros(inputs.shape[1], module.proj_size or hidden_size), inputs.new_zeros(inputs.shape[1], hidden_size)
    outputs = []
    for x in inputs:
        gi = norm(x @ module.weight_ih_l0.T + module.bias_ih_l0, "ih")
        gh = norm((h if mask is None else h * mask) @ module.weight_hh_l0.T + module.bias_hh_l0, "hh")
        if kind == "GRU":
            r, z = torch.sigmoid(gi[:, : 2 * hidden_size] + gh[:, : 2 * hidden_size]).chunk(2, dim=1)
            n = torch.tanh(gi[:, 2 * hidden_size :] + r * gh[:, 2 * hidden_size :])
            h = (1 - z) * n + z * h
        elif kind == "LSTM":
            i, f, g, o = (gi + gh).chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            if module.proj_size:
                h = h @ module.weight_hr_l0.T
        else:
            h = torch.tanh(gi + gh)
        outputs.append(h)
    return torch.stack(outputs)


@pytest.mark.parametrize("layer_norm", [False, True], ids=["no layer norm", "layer norm"])
@pytest.mark.parametrize("recurrent_dropout", [0.0, 0.4], ids=["no recurrent dropout", "recurrent dropout"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_options_equal_a_textbook_implementation(
    variant: str, recurrent_dropout: float, layer_norm: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    kind, projection = VARIANTS[variant]
    module = getattr(cells, kind)(3, 5, recurrent_dropout=recurrent_dropout, layer_norm=layer_norm, **projection).double()
    if layer_norm:  # move the layer-norm gains and biases off their identity start
        with torch.no_grad():
            for name, parameter in module.named_parameters():
                if name.startswith("ln_"):
                    parameter.add_(torch.randn_like(parameter) * 0.3)
    mask = None
    if recurrent_dropout:
        width = projection.get("proj_size", 5)  # the mask is h_{t-1}'s, proj_size wide with a projection
        mask = torch.bernoulli(torch.full((4, width), 1 - recurrent_dropout, dtype=torch.float64)) / (1 - recurrent_dropout)
        monkeypatch.setattr(module, "_recurrent_mask", lambda layout, like: mask)
    inputs = torch.randn(8, 4, 3, dtype=torch.float64, requires_grad=True)
    results = []
    for output in (module(inputs)[0], reference_layer(kind, module, inputs, mask)):
        results.append([output, *torch.autograd.grad(weighted_loss(output, ()), [inputs, *module.parameters()])])
    assert max_difference(*results) <= 1e-10


def test_recurrent_dropout_acts_only_in_training_with_one_mask_per_sequence() -> None:
    torch.manual_seed(0)
    reference = nn.GRU(3, 4).double()
    dropped = cells.GRU(3, 4, recurrent_dropout=0.5).double()
    dropped.load_state_dict(reference.state_dict())
    inputs = torch.randn(6, 2, 3, dtype=torch.float64)
    assert max_difference([dropped.eval()(inputs)[0]], [reference(inputs)[0]]) <= 1e-10
    assert max_difference([dropped.train()(inputs)[0]], [reference(inputs)[0]]) > 1e-3
    mask = dropped._recurrent_mask(cells._Layout((2000,) * 3, torch.device("cpu")), inputs)
    assert mask.shape == (2000, 4)
    assert set(mask.unique().tolist()) == {0.0, 2.0}
    assert abs((mask == 0).double().mean().item() - 0.5) < 0.02


def test_layer_norm_makes_the_cell_invariant_to_the_scale_of_its_weights() -> None:
    torch.manual_seed(0)
    inputs = torch.randn(10, 3, 4, dtype=torch.float64)
    for layer_norm, changes in ((True, False), (False, True)):
        module = cells.LSTM(4, 6, layer_norm=layer_norm).double()
        before = module(inputs)[0]
        with torch.no_grad():
            for name in ("weight_ih_l0", "bias_ih_l0", "weight_hh_l0", "bias_hh_l0"):
                getattr(module, name).mul_(7.0)
        assert (max_difference([before], [module(inputs)[0]]) > 1e-2) == changes


# --- variable lengths and bad input ----------------------------------------------------------------


def test_lengths_output_is_zero_past_each_sequence_and_state_is_taken_at_its_end() -> None:
    torch.manual_seed(0)
    gru = cells.GRU(2, 3, batch_first=True)
    inputs = torch.randn(3, 6, 2)
    output, h_n = gru(inputs, lengths=[6, 2, 4])
    assert output.shape == (3, 6, 3)
    assert output[1, 2:].abs().sum() == 0 and output[2, 4:].abs().sum() == 0
    assert torch.equal(h_n[0], output[[0, 1, 2], [5, 1, 3]])
    alone, _ = gru(inputs[1:2, :2])
    assert max_difference([alone[0]], [output[1, :2]]) <= 1e-6


# --- drop-in for torch.nn: the same signature, attributes and exception classes ----------------------------

IMPLEMENTATIONS = {"torch": nn, "rnnlab": cells}
# (a call on torch.nn or rnnlab.models.cells, the exception class torch raises, rnnlab's message). Each case runs
# against torch too, which proves the case: rnnlab must raise an instance of the same class.
TORCH_ERRORS = [
    (lambda impl: impl.GRU(3, 4)(torch.randn(5, 2, 4)), RuntimeError, r"input_size\. Expected 3, got 4"),
    (lambda impl: impl.GRU(3, 4)(torch.randn(5, 2, 3), torch.zeros(1, 3, 4)), RuntimeError, r"\(1, 2, 4\), got \(1, 3, 4\)"),
    (lambda impl: impl.GRU(3, 4)(torch.randn(5, 2, 3, 1)), ValueError, r"got a 4-D tensor"),
    (lambda impl: impl.GRU(3, 4)(torch.randn(0, 2, 3)), RuntimeError, r"sequence length to be larger than 0.*\(0, 2, 3\)"),
    (lambda impl: impl.GRU(3, 4)(torch.randn(0, 3)), RuntimeError, r"sequence length to be larger than 0"),
    (lambda impl: impl.GRU(3, 4)(torch.randn(5, 2, 3).double()), ValueError, r"input dtype \(torch.float64\) does not match"),
    (lambda impl: impl.GRU(3, 4)(torch.randn(5, 2, 3), torch.zeros(1, 2, 4).double()), RuntimeError, "float64 on cpu but the input"),
    (lambda impl: impl.LSTM(3, 4)(torch.randn(5, 2, 3), (torch.zeros(1, 2, 4), torch.zeros(1, 3, 4))), RuntimeError, r"\(1, 3, 4\)"),
    (lambda impl: impl.GRU(3, 0), ValueError, "hidden_size must be greater than zero, got 0"),
    (lambda impl: impl.GRU(0, 4), ValueError, "input_size must be greater than zero"),
    (lambda impl: impl.GRU(3, 4, 0), ValueError, "num_layers must be greater than zero"),
    (lambda impl: impl.GRU(3, 2.5), TypeError, r"hidden_size should be of type int, got: float \(2.5\)"),
    (lambda impl: impl.GRU(3, 4, bias=0), TypeError, "bias should be of type bool, got: int; write bias=True or False"),
    (lambda impl: impl.LSTM(3, 4, bias="True"), TypeError, "bias should be of type bool, got: str"),
    (lambda impl: impl.RNN(3, 4, batch_first=1), TypeError, "batch_first should be of type bool"),
    (lambda impl: impl.GRU(3, 4, dropout=1.5), ValueError, r"dropout should be a number in range \[0, 1\].*got 1.5"),
    (lambda impl: impl.GRU(3, 4, dropout=True), ValueError, "dropout should be a number"),
    (lambda impl: impl.RNN(3, 4, nonlinearity="gelu"), ValueError, "unknown nonlinearity 'gelu'; select from 'tanh' or 'relu'"),
    (lambda impl: impl.RNN(3, 4, 1, "gelu"), ValueError, "unknown nonlinearity 'gelu'"),  # nonlinearity is 4th, as in torch
    (lambda impl: impl.LSTM(3, 4, proj_size=-1), ValueError, "proj_size should be a positive integer or zero"),
    (lambda impl: impl.LSTM(3, 4, proj_size=4), ValueError, r"proj_size has to be smaller than hidden_size \(4\), got 4"),
    (lambda impl: impl.LSTM(3, 4, proj_size=1.5), TypeError, r"proj_size should be of type int, got: float \(1.5\)"),
    # With projections h is proj_size wide and c hidden_size wide: each state's shape is checked against its own.
    (
        lambda impl: impl.LSTM(3, 4, proj_size=2)(torch.randn(5, 2, 3), (torch.zeros(1, 2, 4),) * 2),
        RuntimeError,
        r"h_0 of shape \(1, 2, 2\)",
    ),
    (
        lambda impl: impl.LSTM(3, 4, proj_size=2)(torch.randn(5, 2, 3), (torch.zeros(1, 2, 2),) * 2),
        RuntimeError,
        r"c_0 of shape \(1, 2, 4\)",
    ),
]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize(("call", "error", "message"), TORCH_ERRORS)
def test_each_mistake_raises_torchs_exception_class(implementation: str, call: Any, error: type[Exception], message: str) -> None:
    with pytest.raises(error) as raised:
        call(IMPLEMENTATIONS[implementation])
    if implementation == "rnnlab":
        # rnnlab's error too, so the command line prints the message as a one-line error.
        assert isinstance(raised.value, ConfigError | DataError)
        assert raised.match(message)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda gru: gru(pack_padded_sequence(torch.randn(5, 2, 3), [5, 3]), lengths=[5, 3]), DataError, "not both"),
        (lambda gru: cells.GRU(3, 4, recurrent_dropout=1.0), ConfigError, "recurrent_dropout"),
        (lambda gru: cells.GRU(3, 4, layer_norm=1), ConfigError, "layer_norm should be of type bool"),
        (lambda gru: cells.LSTM(3, 4)(torch.randn(5, 2, 3), torch.zeros(1, 2, 4)), DataError, "tuple"),
        (lambda gru: gru(torch.randn(5, 2, 3), lengths=[5]), DataError, r"one length per sequence \(2\), got lengths \[5\]"),
        (lambda gru: gru(torch.randn(5, 2, 3), lengths=[5, 0]), DataError, r"every length must be in \[1, 5\].*got \[0\]"),
        (lambda gru: gru(torch.randn(5, 2, 3), lengths=torch.tensor([6, 3])), DataError, r"in \[1, 5\].*got \[6\]"),
        (lambda gru: gru(torch.randn(0, 2, 3), lengths=[1, 1]), DataError, "sequence length to be larger than 0"),
        (lambda gru: gru(torch.randn(5, 2, 3), torch.zeros(1, 2, 4, device="meta")), DataError, "on meta but the input is torch.float32"),
        (lambda gru: gru(torch.randn(5, 3, 3), torch.zeros(1, 2, 4), lengths=[5, 3, 2]), DataError, r"\(1, 3, 4\), got \(1, 2, 4\)"),
        (
            lambda gru: cells.LSTM(3, 4)(torch.randn(5, 2, 3), (torch.zeros(1, 2, 4), torch.zeros(1, 2, 4).half()), lengths=[5, 3]),
            DataError,
            "torch.float16 on cpu but the input is torch.float32",
        ),
    ],
)
def test_rnnlabs_own_arguments_are_refused_with_the_value_and_the_fix(call: Any, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        call(cells.GRU(3, 4))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("batch_first", [False, True])
def test_an_empty_batch_gives_empty_outputs_and_states_like_torch(variant: str, batch_first: bool) -> None:
    kind, projection = VARIANTS[variant]
    theirs, ours = make_pair(kind, input_size=3, hidden_size=4, num_layers=2, bidirectional=True, batch_first=batch_first, **projection)
    inputs = torch.randn((0, 5, 3) if batch_first else (5, 0, 3), dtype=torch.float64)
    (output, state), (expected_output, expected_state) = ours(inputs), theirs(inputs)
    assert output.shape == expected_output.shape
    assert [s.shape for s in as_tuple(state)] == [s.shape for s in as_tuple(expected_state)]


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_attributes_torch_code_reads_are_torchs(variant: str) -> None:
    kind, projection = VARIANTS[variant]
    theirs, ours = make_pair(kind, input_size=3, hidden_size=4, num_layers=2, bidirectional=True, **projection)
    assert (ours.mode, ours.proj_size, repr(ours)) == (theirs.mode, theirs.proj_size, repr(theirs))
    assert ours._flat_weights_names == theirs._flat_weights_names and ours._all_weights == theirs._all_weights
    assert [[tuple(w.shape) for w in layer] for layer in ours.all_weights] == [
        [tuple(w.shape) for w in layer] for layer in theirs.all_weights
    ]
    assert all(weight is getattr(ours, name) for weight, name in zip(ours._flat_weights, ours._flat_weights_names, strict=True))
    lstm = cells.LSTM(3, 4, 1, True, False, 0.0, False, 2)  # torch's positional order, proj_size included
    assert lstm.proj_size == 2 and lstm.weight_hr_l0.shape == (2, 4) and lstm.mode == "LSTM"


def test_relu_is_the_rnns_fourth_positional_argument_as_in_torch() -> None:
    rnn = cells.RNN(3, 4, 1, "relu", False)
    assert (rnn.nonlinearity, rnn.mode, rnn.bias) == ("relu", "RNN_RELU", False)


def test_tracing_is_refused_with_what_to_trace_instead() -> None:
    with pytest.raises(RuntimeError, match=r"torch.jit.trace cannot record rnnlab's GRU.*torch.nn.GRU instead"):
        torch.jit.trace(cells.GRU(3, 4), torch.randn(5, 2, 3))


# --- the model configs -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_scratch_model_configs_build_rnnlab_cells_with_their_options(compose_cfg: Any, kind: str) -> None:
    model = f"model={kind.lower()}_scratch"
    cfg = compose_cfg(model, "model.encoder.cell_options.recurrent_dropout=0.25", "model.encoder.cell_options.layer_norm=true")
    encoder = config_encoder(8, cfg)
    assert type(encoder.rnn) is getattr(cells, kind)
    assert encoder.rnn.recurrent_dropout == 0.25 and encoder.rnn.layer_norm
    default = config_encoder(8, compose_cfg(model))
    assert default.rnn.recurrent_dropout == 0.0 and not default.rnn.layer_norm


@pytest.mark.slow
def test_gru_scratch_trains_like_torchs_gru_with_the_same_seed(compose_cfg: Any, tiny_overrides: list[str], tmp_path: Path) -> None:
    # Each run in its own folders: a run never clears another run's checkpoints.
    scratch = train(compose_cfg(*tiny_overrides, *isolated_outputs(tmp_path / "scratch"), "model=gru_scratch"))
    reference = train(compose_cfg(*tiny_overrides, *isolated_outputs(tmp_path / "torch"), "model=gru"))
    assert scratch["n_params"] == reference["n_params"]
    assert scratch["test_acc"] == reference["test_acc"]
    assert scratch["test_loss"] == pytest.approx(reference["test_loss"], abs=1e-5)


# --- the benchmark ---------------------------------------------------------------------------------


def test_bench_writes_its_table_as_json_and_to_mlflow(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    overrides = ["quick=true", f"output={tmp_path}/reports/bench.json", f"paths.root={tmp_path}"]
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="bench", overrides=overrides)
    assert cfg.tracking.uri == f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    report = bench.run_benchmark(cfg)
    run_id = bench.log_to_mlflow(cfg, report)
    bench.print_table(report)
    assert "speed-up fwd+bwd" in capsys.readouterr().out  # on stdout, so `python -m rnnlab.bench > file` keeps it
    saved = json.loads((tmp_path / "reports" / "bench.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert saved["cell"] == "gru" and saved["gemm_gflops"] > 0
    padded, packed = saved["rows"]
    assert padded["computed_steps"] == 4 * 6
    assert 4 * 2 <= packed["computed_steps"] <= 4 * 6 and "packed" in packed["case"]
    for row in saved["rows"]:
        for name in ("torch", "rnnlab"):
            assert row[name]["forward_ms"] > 0 and row[name]["train_ms"] > 0
        assert row["train_speedup"] == pytest.approx(row["torch"]["train_ms"] / row["rnnlab"]["train_ms"])
        # A GRU step's matmuls: 6·B·H·(I+H) FLOPs forward, here for every computed (sequence, step) with I=5, H=3.
        assert row["forward_gflop"] == pytest.approx(6 * row["computed_steps"] * 3 * (5 + 3) / 1e9)
        assert row["rnnlab"]["forward_gflops"] == pytest.approx(row["forward_gflop"] / row["rnnlab"]["forward_ms"] * 1000)
    run = mlflow.MlflowClient(cfg.tracking.uri).get_run(run_id)
    assert run.info.run_name == "bench-gru" and run.info.status == "FINISHED"
    assert run.data.metrics["B4_T6_I5_H3.rnnlab.train_ms"] == pytest.approx(padded["rnnlab"]["train_ms"])
    assert run.data.params["cell"] == "gru"
    # A per-op table; which ATen ops make its 15 rows depends on timing (the C++ loops call mm among many small ops).
    table = bench.profile_table("gru", bench.configured_cases(cfg)[0], seed=0)
    assert "Self CPU" in table and len([line for line in table.splitlines() if line.lstrip().startswith("aten::")]) >= 5


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("cell=transformer", "transformer"),
        ("cases=[{batch:4,steps:6,hiden_size:3}]", "hiden_size"),
        ("cases=[{batch:4,steps:6,input_size:5,hidden_size:3,min_length:9}]", "min_length"),
        ("threads=0", r"threads must be a positive integer or null.*got 0"),
        ("threads=two", r"threads must be a positive integer or null.*got 'two'"),
        ("threads=1.5", r"threads must be a positive integer or null.*got 1.5"),
        ("threads=true", r"threads must be a positive integer or null.*got True"),
    ],
)
def test_bench_refuses_bad_settings_with_the_fix(tmp_path: Path, override: str, message: str) -> None:
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="bench", overrides=[override, f"output={tmp_path}/bench.json"])
    with pytest.raises(ConfigError, match=message):
        bench.run_benchmark(cfg)
    assert not (tmp_path / "bench.json").exists()


@pytest.mark.parametrize("kind", ["GRU", "LSTM", "RNN"])
def test_under_cpu_autocast_a_cell_runs_at_its_weights_precision(kind: str) -> None:
    torch.manual_seed(0)
    cell = getattr(cells, kind)(3, 4, batch_first=True)
    inputs = torch.randn(2, 5, 3)
    expected, _ = cell(inputs.bfloat16().float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output, _state = cell(inputs.bfloat16())  # autocast hands lower-precision activations to the next layer
    assert output.dtype == torch.float32 and torch.equal(output, expected)
    output.sum().backward()
    assert cell.weight_ih_l0.grad is not None
    with pytest.raises(ValueError, match=r"input dtype \(torch.bfloat16\) does not match weight dtype"):  # outside autocast
        cell(inputs.bfloat16())
