"""rnnlab's cells against torch's own test cases: the ModuleInfo entries of torch.testing._internal.common_modules
for nn.RNN, nn.GRU and nn.LSTM, their sample inputs (no batch dimension, initial states, packed sequences, every
bias / batch_first / bidirectional / nonlinearity / proj_size combination) and their error inputs, and the gradient
checks torch's test_modules.py runs on those samples (test_grad, test_gradgrad).

Each case runs against torch's cell first, which proves the port (torch must pass it), then against rnnlab's
with the same weights. rnnlab passes every case; docs/cells.md would list any it did not, with the reason.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence
from torch.utils._pytree import tree_flatten, tree_unflatten

from rnnlab.errors import RnnlabError
from rnnlab.models import cells


def torch_module_db() -> tuple[Any, Any, Any]:
    """torch's ModuleInfo database, its error enum and its test utilities. Importing them runs
    torch.testing._internal.common_utils, which freezes torch.backends' global flags for torch's own suite; unfrozen
    again here, or every later Trainer with deterministic=True in this test session fails to set them."""
    frozen = torch.backends.flags_frozen()
    from torch.testing._internal import common_utils
    from torch.testing._internal.common_modules import ModuleErrorEnum, module_db

    if not frozen:
        torch.backends.flags_frozen.__globals__["__allow_nonbracketed_mutation_flag"] = True  # the flag flags_frozen() reads
    return module_db, ModuleErrorEnum, common_utils


MODULE_DB, ModuleErrorEnum, COMMON_UTILS = torch_module_db()
INFOS = {info.module_cls.__name__: info for info in MODULE_DB if info.module_cls in (nn.RNN, nn.GRU, nn.LSTM)}
KINDS = ["RNN", "GRU", "LSTM"]
# rnnlab's message where it words a torch error differently (the class is torch's all the same).
OWN_MESSAGES = {
    r"RNN input dtype": r"input dtype \(torch.float64\) does not match weight dtype \(torch.float32\); convert the input with input.to",
}


def samples(kind: str, training: bool) -> list[Any]:
    info = INFOS[kind]
    options = {"device": "cpu", "dtype": torch.float64, "requires_grad": True, "training": training}
    return info.module_inputs_func(info, **options, with_packed_sequence=True)


def gradient_samples(kind: str, training: bool) -> list[Any]:
    """The samples torch's test_grad and test_gradgrad check: float64, without the packed-sequence ones."""
    info = INFOS[kind]
    return info.module_inputs_func(info, device="cpu", dtype=torch.float64, requires_grad=True, training=training)


def error_samples(kind: str) -> list[Any]:
    info = INFOS[kind]
    return info.module_error_inputs_func(info, device="cpu", dtype=torch.float32, requires_grad=False, training=True)


SAMPLE_CASES = [(kind, training, i) for kind in KINDS for training in (True, False) for i in range(len(samples(kind, training)))]
SAMPLE_IDS = [f"{kind}-{'train' if training else 'eval'}-{i}" for kind, training, i in SAMPLE_CASES]
ERROR_CASES = [(kind, i) for kind in KINDS for i in range(len(error_samples(kind)))]
GRADIENT_CASES = [(kind, training, i) for kind in KINDS for training in (True, False) for i in range(len(gradient_samples(kind, training)))]
GRADIENT_IDS = [f"{kind}-{'train' if training else 'eval'}-{i}" for kind, training, i in GRADIENT_CASES]
# torch's testing wrappers of the two checks, as test_modules.py calls them: fast mode, batched gradients checked too.
CHECKS = {"gradcheck": COMMON_UTILS.gradcheck, "gradgradcheck": COMMON_UTILS.gradgradcheck}


def fresh(value: Any) -> Any:
    """A copy of a forward argument that is its own autograd leaf (a PackedSequence's data likewise)."""
    if isinstance(value, PackedSequence):
        return value._replace(data=fresh(value.data))
    if isinstance(value, tuple):
        return tuple(fresh(item) for item in value)
    return value.detach().clone().requires_grad_(value.requires_grad)


def flat(output: Any) -> list[torch.Tensor]:
    """The tensors of a cell's (output, state), a PackedSequence as its data."""
    if isinstance(output, PackedSequence):
        return [output.data]
    if isinstance(output, tuple | list):
        return [tensor for item in output for tensor in flat(item)]
    return [output]


@pytest.mark.parametrize(("kind", "training", "index"), SAMPLE_CASES, ids=SAMPLE_IDS)
def test_torchs_sample_inputs_give_torchs_outputs_and_gradients(kind: str, training: bool, index: int) -> None:
    sample = samples(kind, training)[index]
    args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
    torch.manual_seed(index)
    reference = getattr(nn, kind)(*args, **kwargs).double().train(training)
    ours = getattr(cells, kind)(*args, **kwargs).double().train(training)
    ours.load_state_dict(reference.state_dict())
    results = []
    for module in (reference, ours):
        inputs = [fresh(x) for x in sample.forward_input.args]  # each implementation differentiates its own leaves
        tensors = flat(module(*inputs, **sample.forward_input.kwargs))
        leaves = [x for x in flat(inputs) if x.requires_grad] + list(module.parameters())
        loss = sum((tensor * torch.linspace(-1, 1, tensor.numel(), dtype=tensor.dtype).view_as(tensor)).sum() for tensor in tensors)
        results.append((tensors, torch.autograd.grad(loss, leaves)))
    (expected, expected_grads), (actual, actual_grads) = results
    assert [t.shape for t in actual] == [t.shape for t in expected]
    for got, want in zip([*actual, *actual_grads], [*expected, *expected_grads], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def torchs_gradient_checks(module: nn.Module, sample: Any, check: Any) -> None:
    """torch's TestModule._test_gradients_helper on one sample: `check` of the outputs' derivatives with respect to
    the inputs and every parameter together, then to the inputs and each parameter alone."""
    parameters, inputs = tuple(module.parameters()), sample.forward_input.args
    assert not sample.forward_input.kwargs  # torch's helper checks tensor kwargs too; these samples pass none

    def outputs(*flat_inputs_and_parameters: torch.Tensor) -> list[torch.Tensor]:
        inputs_and_parameters = tree_unflatten(list(flat_inputs_and_parameters), spec)
        with COMMON_UTILS.freeze_rng_state():
            return tree_flatten(module(*inputs_and_parameters[: len(inputs)]))[0]

    for alone in (None, *parameters):  # None: every parameter together
        for parameter in parameters:
            parameter.requires_grad_(alone is None or parameter is alone)
        flat, spec = tree_flatten(inputs + parameters)
        assert check(outputs, flat)


@pytest.mark.slow  # 1 to 20 s a case, half an hour in all: a numerical check per parameter, torch's and rnnlab's
@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize(("kind", "training", "index"), GRADIENT_CASES, ids=GRADIENT_IDS)
def test_torchs_gradcheck_and_gradgradcheck_pass(check: str, kind: str, training: bool, index: int) -> None:
    sample = gradient_samples(kind, training)[index]
    args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
    reference = getattr(nn, kind)(*args, **kwargs).double().train(training)
    ours = getattr(cells, kind)(*args, **kwargs).double().train(training)
    ours.load_state_dict(reference.state_dict())
    for module in (reference, ours):  # torch's first, which proves the port
        torchs_gradient_checks(module, sample, CHECKS[check])


@pytest.mark.parametrize(("kind", "index"), ERROR_CASES, ids=[f"{k}-{i}" for k, i in ERROR_CASES])
def test_torchs_error_inputs_raise_torchs_exception_class(kind: str, index: int) -> None:
    case = error_samples(kind)[index]
    module_input = case.module_error_input

    def attempt(implementation: Any) -> None:
        module = getattr(implementation, kind)(*module_input.constructor_input.args, **module_input.constructor_input.kwargs)
        if case.error_on == ModuleErrorEnum.FORWARD_ERROR:
            module(*module_input.forward_input.args, **module_input.forward_input.kwargs)

    with pytest.raises(case.error_type, match=case.error_regex):
        attempt(nn)  # the case as torch's suite runs it
    message = next((own for theirs, own in OWN_MESSAGES.items() if re.search(theirs, case.error_regex)), case.error_regex)
    with pytest.raises(case.error_type, match=message) as raised:
        attempt(cells)
    assert isinstance(raised.value, RnnlabError)  # and one the command line prints as a one-line error


def test_the_suite_covers_what_torchs_does() -> None:
    # So that a torch upgrade that drops or renames the entries cannot empty this suite unnoticed.
    assert set(INFOS) == set(KINDS) and not torch.backends.flags_frozen()
    counts = {kind: len(samples(kind, True)) for kind in KINDS}
    assert counts == {"RNN": 64, "GRU": 32, "LSTM": 32} and len(ERROR_CASES) >= 3 * 10
    assert {kind: len(gradient_samples(kind, True)) for kind in KINDS} == {"RNN": 32, "GRU": 16, "LSTM": 32}
