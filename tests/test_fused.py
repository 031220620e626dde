"""The cells' C++ loops (rnnlab.models.fused) against their Python loops and torch's cells.

With the C++ loops and with the Python loops, outputs, final states and the gradients of the input, the initial states
and every parameter are equal to 1e-10 in float64 (padded and packed input, 2 layers, both directions, without biases,
inference) and to torch's; what the C++ loops do not cover runs the Python loops; RNNLAB_FUSED=0 and a missing build
fall back to the Python loops. The checks use this venv's build (`make install` makes it), else build one afresh.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import warnings
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from rnnlab.models import cells, fused

# (cell, constructor options): each C++ loop, and the RNN's two nonlinearities.
CELLS = {"GRU": ("GRU", {}), "LSTM": ("LSTM", {}), "RNN-tanh": ("RNN", {}), "RNN-relu": ("RNN", {"nonlinearity": "relu"})}
# Hidden sizes 5 and 17 end in a partial vector (AVX2 holds 4 doubles or 8 floats, AVX-512 8 or 16), 16 does not.
SHAPES = {
    "padded": {"batch": 3, "steps": 5, "input_size": 4, "hidden_size": 5},
    "packed": {"batch": 4, "steps": 7, "input_size": 3, "hidden_size": 17, "lengths": [7, 2, 5, 1]},
    "2 layers, both directions, packed": {
        "batch": 5,
        "steps": 6,
        "input_size": 3,
        "hidden_size": 16,
        "num_layers": 2,
        "bidirectional": True,
        "lengths": [3, 6, 1, 6, 2],
    },
    "no bias": {"batch": 2, "steps": 4, "input_size": 3, "hidden_size": 4, "bias": False},
}
# What the C++ loops leave to the Python loops: (cell, constructor options, dtype).
UNCOVERED = {
    "layer norm": ("GRU", {"layer_norm": True}, torch.float64),
    "recurrent dropout in training": ("LSTM", {"recurrent_dropout": 0.3}, torch.float64),
    "LSTM projection": ("LSTM", {"proj_size": 3}, torch.float64),
    "bfloat16": ("GRU", {}, torch.bfloat16),
}


class Counted:
    """A kernels module that records each call's arguments: which path the cells took, and with what."""

    def __init__(self, module: ModuleType) -> None:
        self.module = module
        self.arguments: defaultdict[str, list[tuple[Any, ...]]] = defaultdict(list)

    @property
    def calls(self) -> dict[str, int]:
        return {name: len(calls) for name, calls in self.arguments.items()}

    def __getattr__(self, name: str) -> Callable[..., Any]:
        function = getattr(self.module, name)

        def counted(*args: Any) -> Any:
            self.arguments[name].append(args)
            return function(*args)

        return counted


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    """This venv's build (`make install` makes it), else a fresh one in a temporary folder: the checks always run."""
    return fused.installed() or fused.build(tmp_path_factory.mktemp("kernels"))


@pytest.fixture
def loops(built: ModuleType, monkeypatch: pytest.MonkeyPatch) -> Callable[[bool], Counted]:
    """loops(True) makes the cells call the C++ loops, loops(False) their Python loops; the C++ calls are recorded."""

    def select(in_cpp: bool) -> Counted:
        counted = Counted(built)
        monkeypatch.setattr(fused, "kernels", lambda: counted if in_cpp else None)
        return counted

    return select


def modules(variant: str, shape: dict[str, Any], dtype: torch.dtype = torch.float64) -> tuple[nn.Module, nn.Module]:
    """torch's cell and rnnlab's for a shape, with the same weights."""
    cell, options = CELLS[variant]
    sizes = {key: shape[key] for key in ("input_size", "hidden_size", "num_layers", "bidirectional", "bias") if key in shape}
    options = {**options, **sizes}
    torch.manual_seed(0)
    reference = getattr(nn, cell)(**options).to(dtype)
    ours = getattr(cells, cell)(**options).to(dtype)
    ours.load_state_dict(reference.state_dict())
    return reference, ours


def run(module: nn.Module, shape: dict[str, Any], gradients: bool = True) -> list[torch.Tensor]:
    """The output and final states for one batch (the same at every call, initial states given), then, with `gradients`,
    the gradients of the input, the initial states and every parameter for a loss that weighs each element differently."""
    generator = torch.Generator().manual_seed(0)
    dtype = module.weight_ih_l0.dtype
    inputs = torch.randn(shape["steps"], shape["batch"], module.input_size, generator=generator).to(dtype)
    layers = module.num_layers * (2 if module.bidirectional else 1)
    widths = (module.proj_size or module.hidden_size, module.hidden_size)[: 2 if module.mode == "LSTM" else 1]  # h's, then c's
    initial = [torch.randn(layers, shape["batch"], width, generator=generator).to(dtype) for width in widths]
    for leaf in (inputs, *initial):
        leaf.requires_grad_(gradients)
    lengths = shape.get("lengths")
    hx = tuple(initial) if module.mode == "LSTM" else initial[0]
    output, state = module(inputs if lengths is None else pack_padded_sequence(inputs, lengths, enforce_sorted=False), hx)
    if isinstance(output, PackedSequence):
        output = pad_packed_sequence(output, total_length=shape["steps"])[0]
    states = state if isinstance(state, tuple) else (state,)
    if not gradients:
        return [output, *states]
    loss = (output * torch.arange(output.numel()).view_as(output).sin().to(dtype)).sum() + sum(s.cos().sum() for s in states)
    return [output, *states, *torch.autograd.grad(loss, [inputs, *initial, *module.parameters()])]


def max_difference(first: list[torch.Tensor], second: list[torch.Tensor]) -> float:
    """The largest difference between paired tensors, relative to the first one's scale where that exceeds one."""
    return max(((a - b).abs().max() / a.abs().max().clamp_min(1)).item() for a, b in zip(first, second, strict=True))


def test_make_install_built_the_cpp_loops_for_this_torch_and_source() -> None:
    # The fixture above would build its own copy: this is what says that the venv's cells really run the C++ loops.
    assert fused.installed() is not None, (
        f"no loadable build in {fused.build_directory()}: `make install`, or python -m rnnlab.models.fused build --strict to see why"
    )


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("variant", CELLS)
def test_the_cpp_loops_give_the_python_loops_and_torchs_results(variant: str, shape: str, loops: Callable[[bool], Counted]) -> None:
    reference, ours = modules(variant, SHAPES[shape])
    expected = run(reference, SHAPES[shape])
    loops(False)
    in_python = run(ours, SHAPES[shape])
    counted = loops(True)
    in_cpp = run(ours, SHAPES[shape])
    scans, kernel = ours.num_layers * (2 if ours.bidirectional else 1), CELLS[variant][0].lower()
    assert counted.calls == {f"{kernel}_forward": scans, f"{kernel}_backward": scans}
    assert max_difference(in_python, in_cpp) <= 1e-10
    assert max_difference(expected, in_cpp) <= 1e-10


@pytest.mark.parametrize("variant", CELLS)
def test_the_cpp_loops_in_float32_give_torchs_results(variant: str, loops: Callable[[bool], Counted]) -> None:
    shape = SHAPES["2 layers, both directions, packed"]
    reference, ours = modules(variant, shape, torch.float32)
    expected = run(reference, shape)
    counted = loops(True)
    assert max_difference(expected, run(ours, shape)) <= 1e-5
    assert sum(counted.calls.values()) == 8  # 4 scans, forward and backward


@pytest.mark.parametrize("inference", ["frozen parameters", "torch.no_grad", "torch.inference_mode"])
@pytest.mark.parametrize("variant", CELLS)
def test_inference_keeps_one_steps_intermediates_and_gives_the_same_outputs(
    variant: str, inference: str, loops: Callable[[bool], Counted]
) -> None:
    """No graph is recorded, so the scans reuse one step's intermediates: with parameters that need no gradient, and under
    torch.no_grad() with parameters that do (ctx.needs_input_grad alone would say they are needed)."""
    shape = SHAPES["2 layers, both directions, packed"]
    _, ours = modules(variant, shape)
    if inference == "frozen parameters":
        ours.requires_grad_(False)
    contexts = {"torch.no_grad": torch.no_grad, "torch.inference_mode": torch.inference_mode}
    with contexts.get(inference, contextlib.nullcontext)():
        loops(False)
        in_python = run(ours, shape, gradients=False)
        counted = loops(True)
        in_cpp = run(ours, shape, gradients=False)
    kernel = CELLS[variant][0].lower()
    assert counted.calls == {f"{kernel}_forward": 4}
    if kernel != "rnn":  # the RNN keeps no intermediates; the others' last argument says whether every step's are kept
        assert all(arguments[-1] is False for arguments in counted.arguments[f"{kernel}_forward"])
    assert max_difference(in_python, in_cpp) <= 1e-10


@pytest.mark.parametrize("variant", CELLS)
def test_gradients_of_a_loss_of_the_output_alone_match_for_frozen_parameters(variant: str, loops: Callable[[bool], Counted]) -> None:
    """Only the input needs a gradient, and only the output enters the loss: autograd hands the backward loops an expanded
    gradient of the output (sum's) and none of the final states (zeros; the LSTM's c_n too)."""
    shape = SHAPES["2 layers, both directions, packed"]
    _, ours = modules(variant, shape)
    ours.requires_grad_(False)

    def input_gradient() -> torch.Tensor:
        inputs = torch.randn(shape["steps"], shape["batch"], shape["input_size"], generator=torch.Generator().manual_seed(1))
        inputs = inputs.double().requires_grad_()
        output, _ = ours(pack_padded_sequence(inputs, shape["lengths"], enforce_sorted=False))
        (gradient,) = torch.autograd.grad(output.data.sum(), [inputs])
        return gradient

    loops(False)
    in_python = input_gradient()
    counted = loops(True)
    in_cpp = input_gradient()
    kernel = CELLS[variant][0].lower()
    assert counted.calls == {f"{kernel}_forward": 4, f"{kernel}_backward": 4}
    assert in_cpp.abs().sum() > 0 and max_difference([in_python], [in_cpp]) <= 1e-10


def test_a_scan_s_backward_follows_its_forward_s_choice(built: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """RNNLAB_FUSED or a build appearing between a forward and its backward changes nothing for that pass."""
    counted = Counted(built)
    for forward_in_cpp in (True, False):
        _, gru = modules("GRU", SHAPES["packed"])
        monkeypatch.setattr(fused, "kernels", lambda in_cpp=forward_in_cpp: counted if in_cpp else None)
        inputs = torch.randn(7, 4, 3, dtype=torch.float64, requires_grad=True)
        output, _ = gru(inputs)
        monkeypatch.setattr(fused, "kernels", lambda in_cpp=forward_in_cpp: None if in_cpp else counted)  # switched over
        counted.arguments.clear()
        output.sum().backward()
        assert counted.calls == ({"gru_backward": 1} if forward_in_cpp else {})


def test_a_tensor_subclass_runs_the_python_loops(loops: Callable[[bool], Counted]) -> None:
    """The C++ loops read tensor memory directly: a subclass (a fake or wrapper tensor in real use) keeps the Python loops."""

    class Tagged(torch.Tensor):
        pass

    _, gru = modules("GRU", SHAPES["padded"])
    counted = loops(True)
    output, _ = gru(torch.randn(5, 3, 4, dtype=torch.float64).as_subclass(Tagged))
    assert counted.calls == {} and output.isfinite().all()


def test_a_step_split_across_threads_gives_the_same_results(loops: Callable[[bool], Counted]) -> None:
    """B * H = 8,192 units a step: with two threads, at::parallel_for splits the gate arithmetic (4,096 units a thread)."""
    shape = {"batch": 64, "steps": 3, "input_size": 8, "hidden_size": 128}
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for variant in CELLS:
            _, ours = modules(variant, shape)
            loops(False)
            in_python = run(ours, shape)
            counted = loops(True)
            assert max_difference(in_python, run(ours, shape)) <= 1e-10 and counted.calls
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("case", UNCOVERED)
def test_what_the_cpp_loops_do_not_cover_runs_the_python_loops(case: str, loops: Callable[[bool], Counted]) -> None:
    cell, options, dtype = UNCOVERED[case]
    shape = SHAPES["packed"]
    torch.manual_seed(0)
    module = getattr(cells, cell)(shape["input_size"], shape["hidden_size"], **options).to(dtype).train()
    counted = loops(True)
    assert all(result.isfinite().all() for result in run(module, shape))
    assert counted.calls == {}


def test_recurrent_dropout_outside_training_takes_the_cpp_loops(loops: Callable[[bool], Counted]) -> None:
    module = cells.GRU(3, 9, recurrent_dropout=0.3).double().eval()  # no mask outside training
    counted = loops(True)
    run(module, SHAPES["packed"])
    assert counted.calls == {"gru_forward": 1, "gru_backward": 1}


def test_rnnlab_fused_0_selects_the_python_loops(built: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    counted = Counted(built)
    monkeypatch.setattr(fused, "installed", lambda: counted)
    monkeypatch.delenv(fused.SWITCH, raising=False)
    _, gru = modules("GRU", SHAPES["padded"])
    run(gru, SHAPES["padded"])
    assert counted.calls == {"gru_forward": 1, "gru_backward": 1}
    monkeypatch.setenv(fused.SWITCH, "0")
    assert fused.kernels() is None
    run(gru, SHAPES["padded"])
    assert counted.calls == {"gru_forward": 1, "gru_backward": 1}  # no further call


def test_a_missing_build_falls_back_to_the_python_loops_silently(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(fused, "ROOT", tmp_path / "never built")
    monkeypatch.delenv(fused.SWITCH, raising=False)
    shape = SHAPES["packed"]
    reference, ours = modules("GRU", shape)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert fused.installed() is None and fused.kernels() is None
        actual = run(ours, shape)
    assert not [warning for warning in caught if "fused" in str(warning.message)]
    assert max_difference(run(reference, shape), actual) <= 1e-10


def test_a_build_that_does_not_load_warns_once_and_falls_back(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(fused, "ROOT", tmp_path)
    fused.build_directory().mkdir(parents=True)
    (fused.build_directory() / f"{fused.NAME}.so").write_bytes(b"not a shared library")
    with pytest.warns(RuntimeWarning, match="do not load.*python -m rnnlab.models.fused build"):
        assert fused.installed() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # remembered: no second warning
        assert fused.installed() is None


def test_the_build_lives_in_the_venv_keyed_by_torch_and_source(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    directory = fused.build_directory()
    assert directory.parent == Path(sys.prefix) / "rnnlab-kernels"
    assert directory.name.startswith(f"torch-{torch.__version__}-")
    changed = tmp_path / "fused_scan.cpp"
    changed.write_bytes(fused.SOURCE.read_bytes() + b"// changed\n")
    monkeypatch.setattr(fused, "SOURCE", changed)
    assert fused.build_directory().parent == directory.parent and fused.build_directory() != directory


def test_the_build_command_reports_a_failure_in_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def fail(build_dir: Path | None = None) -> ModuleType:
        assert build_dir is not None
        build_dir.mkdir(parents=True, exist_ok=True)
        raise RuntimeError(
            "Error building extension 'rnnlab_fused_scan': [1/2] c++ -c fused_scan.cpp -o fused_scan.o\n"
            "fused_scan.cpp:3:1: error: expected ';' before '}' token\nninja: build stopped: subcommand failed."
        )

    monkeypatch.setattr(fused, "build", fail)
    assert fused.main(["build", "--root", str(tmp_path)]) == 0  # the Python loops still work
    lines = capsys.readouterr().out.splitlines()
    log = fused.build_directory(tmp_path) / "build.log"
    reason = f"fused_scan.cpp:3:1: error: expected ';' before '}}' token; full message in {log}"
    assert lines == [f"rnnlab.models.fused: not built ({reason}); the cells run their Python loops"]
    assert "ninja: build stopped" in log.read_text()
    assert fused.main(["build", "--strict", "--root", str(tmp_path)]) == 2


def test_the_build_command_says_where_it_built(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(fused, "build", lambda build_dir=None: fused)
    assert fused.main(["build", "--strict", "--root", str(tmp_path)]) == 0
    assert capsys.readouterr().out == f"rnnlab.models.fused: built {fused.build_directory(tmp_path)}\n"


@pytest.mark.slow  # compiles the extension: a minute or two on two cores
def test_a_fresh_build_from_the_command_loads_and_gives_torchs_results(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    command = [sys.executable, "-m", "rnnlab.models.fused", "build", "--strict", "--root", str(tmp_path)]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=1200)
    directory = fused.build_directory(tmp_path)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert finished.stdout.splitlines() == [f"rnnlab.models.fused: built {directory}"]
    monkeypatch.setattr(fused, "ROOT", tmp_path)
    monkeypatch.delenv(fused.SWITCH, raising=False)
    module = fused.installed()
    # __spec__.origin: a second build of one extension name in a process may keep the first one's __file__
    assert module is not None and Path(module.__spec__.origin).parent == directory
    counted = Counted(module)
    monkeypatch.setattr(fused, "kernels", lambda: counted)
    shape = SHAPES["2 layers, both directions, packed"]
    reference, ours = modules("GRU", shape)
    assert max_difference(run(reference, shape), run(ours, shape)) <= 1e-10
    assert counted.calls == {"gru_forward": 4, "gru_backward": 4}


@pytest.mark.parametrize(("capability", "instruction_set"), [("AVX512", "-mavx512f"), ("AVX2", "-mavx2"), ("DEFAULT", None)], ids=str)
def test_the_loops_are_built_at_the_vector_width_aten_runs_at_and_each_width_has_its_own_build(
    monkeypatch: pytest.MonkeyPatch, capability: str, instruction_set: str | None
) -> None:
    def flags_and_directory(width: str) -> tuple[tuple[str, ...], Path]:
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: width)
        fused._flags.cache_clear()
        fused._digest.cache_clear()
        return fused._flags()[0], fused.build_directory(Path("/kernels"))

    try:
        flags, directory = flags_and_directory(capability)
        others = {flags_and_directory(width)[1] for width in ("AVX512", "AVX2", "DEFAULT") if width != capability}
    finally:
        fused._flags.cache_clear()
        fused._digest.cache_clear()
    vector_flags = [flag for flag in flags if flag.startswith(("-mavx", "-DCPU_CAPABILITY"))]
    if instruction_set is None:
        assert vector_flags == []  # ATen's portable vector type
    else:
        assert instruction_set in flags and f"-DCPU_CAPABILITY={capability}" in flags and f"-DCPU_CAPABILITY_{capability}" in flags
        assert not any(flag.startswith("-DCPU_CAPABILITY_") and flag != f"-DCPU_CAPABILITY_{capability}" for flag in flags)
        assert capability == "AVX512" or "-mavx512f" not in flags
    assert directory not in others  # a build for another width is never loaded
