"""Time rnnlab's recurrent cells against torch.nn's: `python -m rnnlab.bench` (also `make bench`).

For each case, torch's cell and rnnlab's, with the same weights, run the same batch: forward
(inference, under `torch.no_grad`) and forward+backward (what a training step spends in the
cell: the gradients of the input and of every parameter). A time is the median of `repeats`
runs after `warmup` runs, with the implementations interleaved so that a change in machine
load hits both. GFLOP/s counts the matmuls of the steps actually computed: a step of a cell
with G gate blocks costs 2·G·B·H·(I+H) FLOPs forward (6·B·H·(I+H) for the GRU) and about
three times that forward+backward. The machine's fp32 GEMM rate is the ceiling.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from mlflow.entities import Metric, Param
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from rnnlab import io
from rnnlab.config import hydra_entry
from rnnlab.console import console
from rnnlab.errors import ConfigError
from rnnlab.models import cells
from rnnlab.tracking import ensure_experiment, git_commit, open_store
from rnnlab.validation import is_int

GATES = {"gru": 3, "lstm": 4, "rnn": 1}
GEMM_SIZE = 1024


@dataclass(frozen=True)
class Case:
    batch: int
    steps: int
    input_size: int
    hidden_size: int
    min_length: int | None = None

    def __post_init__(self) -> None:
        if min(self.batch, self.steps, self.input_size, self.hidden_size) <= 0:
            raise ConfigError(f"Benchmark case {self}: batch, steps, input_size and hidden_size must be positive.")
        if self.min_length is not None and not 1 <= self.min_length <= self.steps:
            raise ConfigError(f"Benchmark case {self}: min_length must be in [1, steps={self.steps}], got {self.min_length}.")

    @property
    def name(self) -> str:
        lengths = f", lengths {self.min_length}..{self.steps} packed" if self.min_length else ""
        return f"B={self.batch} T={self.steps} I={self.input_size} H={self.hidden_size}{lengths}"

    @property
    def key(self) -> str:
        """The case's prefix for MLflow metric names."""
        lengths = f"_L{self.min_length}" if self.min_length else ""
        return f"B{self.batch}_T{self.steps}_I{self.input_size}_H{self.hidden_size}{lengths}"

    def make_input(self, generator: torch.Generator) -> tuple[torch.Tensor | PackedSequence, int]:
        """A time-major batch (packed if the lengths vary) that requires grad, and the number of steps it holds."""
        inputs = torch.randn(self.steps, self.batch, self.input_size, generator=generator)
        if self.min_length is None:
            return inputs.requires_grad_(), self.batch * self.steps
        lengths = torch.randint(self.min_length, self.steps + 1, (self.batch,), generator=generator)
        packed = pack_padded_sequence(inputs, lengths, enforce_sorted=False)
        data = packed.data.requires_grad_()
        return PackedSequence(data, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices), int(lengths.sum())


def interleaved_medians(runs: dict[str, Callable[[], object]], warmup: int, repeats: int) -> dict[str, float]:
    """Median wall time in ms of each run, the runs taking turns."""
    for _ in range(warmup):
        for run in runs.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) * 1000 for name, values in times.items()}


def gemm_gflops(warmup: int, repeats: int) -> float:
    """The machine's fp32 matmul rate on square matrices: the ceiling for any cell."""
    a, b = torch.randn(GEMM_SIZE, GEMM_SIZE), torch.randn(GEMM_SIZE, GEMM_SIZE)
    ms = interleaved_medians({"gemm": lambda: a @ b}, warmup, repeats)["gemm"]
    return 2 * GEMM_SIZE**3 / ms / 1e6


def _forward(module: nn.Module, inputs: torch.Tensor | PackedSequence) -> Callable[[], object]:
    def run() -> object:
        with torch.no_grad():
            return module(inputs)

    return run


def _forward_backward(module: nn.Module, inputs: torch.Tensor | PackedSequence, grad: torch.Tensor) -> Callable[[], None]:
    leaf = inputs.data if isinstance(inputs, PackedSequence) else inputs

    def run() -> None:
        module.zero_grad(set_to_none=True)
        leaf.grad = None
        output, _ = module(inputs)
        (output.data if isinstance(output, PackedSequence) else output).backward(grad)

    return run


def _setup(cell: str, case: Case, seed: int) -> tuple[nn.Module, nn.Module, torch.Tensor | PackedSequence, torch.Tensor, int]:
    """torch's cell and rnnlab's with the same weights, a batch, a gradient for the output, and the steps it holds."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    reference = getattr(nn, cell.upper())(case.input_size, case.hidden_size)
    ours = getattr(cells, cell.upper())(case.input_size, case.hidden_size)
    ours.load_state_dict(reference.state_dict())
    inputs, computed_steps = case.make_input(generator)
    grad = torch.randn(computed_steps, case.hidden_size, generator=generator)
    grad = grad if isinstance(inputs, PackedSequence) else grad.view(case.steps, case.batch, -1)
    return reference, ours, inputs, grad, computed_steps


def measure_case(cell: str, case: Case, warmup: int, repeats: int, seed: int) -> dict[str, Any]:
    """Forward and forward+backward of torch's cell and rnnlab's on one batch, as a report row."""
    reference, ours, inputs, grad, computed_steps = _setup(cell, case, seed)
    runs = {}
    for name, module in (("torch", reference), ("rnnlab", ours)):
        runs[f"{name}/forward"] = _forward(module, inputs)
        runs[f"{name}/train"] = _forward_backward(module, inputs, grad)
    ms = interleaved_medians(runs, warmup, repeats)
    gflop = 2 * GATES[cell] * computed_steps * case.hidden_size * (case.input_size + case.hidden_size) / 1e9
    row: dict[str, Any] = {"case": case.name, "key": case.key, **case.__dict__, "computed_steps": computed_steps, "forward_gflop": gflop}
    for name in ("torch", "rnnlab"):
        row[name] = {
            "forward_ms": ms[f"{name}/forward"],
            "forward_gflops": gflop / ms[f"{name}/forward"] * 1000,
            "train_ms": ms[f"{name}/train"],
            "train_gflops": 3 * gflop / ms[f"{name}/train"] * 1000,
        }
    row["forward_speedup"] = ms["torch/forward"] / ms["rnnlab/forward"]
    row["train_speedup"] = ms["torch/train"] / ms["rnnlab/train"]
    return row


def profile_table(cell: str, case: Case, seed: int) -> str:
    """Where rnnlab's forward+backward spends its time, per ATen op (torch.profiler)."""
    _, ours, inputs, grad, _ = _setup(cell, case, seed)
    run = _forward_backward(ours, inputs, grad)
    run()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], acc_events=True) as profiler:
        for _ in range(3):
            run()
    return profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)


def configured_cases(cfg: DictConfig) -> list[Case]:
    cases = []
    for case in OmegaConf.to_container(cfg.quick_cases if cfg.quick else cfg.cases, resolve=True):
        try:
            cases.append(Case(**case))
        except TypeError as err:
            raise ConfigError(f"Benchmark case {case}: {err}; its keys are batch, steps, input_size, hidden_size[, min_length].") from err
    return cases


def run_benchmark(cfg: DictConfig) -> dict[str, Any]:
    """Measure every configured case; return the report (also written to `cfg.output`)."""
    cell = str(cfg.cell).lower()
    if cell not in GATES:
        raise ConfigError(f"cell must be one of {sorted(GATES)}, got {cfg.cell!r}.")
    if cfg.repeats < 1 or cfg.warmup < 0:
        raise ConfigError(f"repeats must be >= 1 and warmup >= 0, got repeats={cfg.repeats}, warmup={cfg.warmup}.")
    threads = cfg.threads
    if threads is not None and not (is_int(threads) and threads >= 1):
        raise ConfigError(f"threads must be a positive integer or null (torch's default, one per core), got {threads!r}.")
    if threads is not None:
        torch.set_num_threads(threads)
    warmup, repeats = (1, 2) if cfg.quick else (cfg.warmup, cfg.repeats)
    cases = configured_cases(cfg)
    report = {
        "cell": cell,
        "quick": bool(cfg.quick),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "warmup": warmup,
        "repeats": repeats,
        "gemm_gflops": gemm_gflops(warmup, repeats),
        "rows": [measure_case(cell, case, warmup, repeats, cfg.seed) for case in cases],
    }
    io.write_json(cfg.output, report)
    return report


def log_to_mlflow(cfg: DictConfig, report: dict[str, Any]) -> str:
    """One MLflow run: the settings as parameters, every time and rate as a metric, the report as JSON."""
    client = open_store(cfg.tracking.uri)
    experiment_id = ensure_experiment(cfg.tracking)
    tags = {"cell": report["cell"], "quick": str(report["quick"]), "git_commit": git_commit(cfg.paths.root)}
    run_id = client.create_run(experiment_id, run_name=cfg.tracking.run_name, tags=tags).info.run_id
    now = int(time.time() * 1000)
    metrics = [Metric("gemm_gflops", report["gemm_gflops"], now, 0)]
    for row in report["rows"]:
        for name in ("torch", "rnnlab"):
            metrics += [Metric(f"{row['key']}.{name}.{measure}", value, now, 0) for measure, value in row[name].items()]
        metrics += [Metric(f"{row['key']}.{speedup}", row[speedup], now, 0) for speedup in ("forward_speedup", "train_speedup")]
    params = [Param(key, str(report[key])) for key in ("cell", "quick", "torch", "threads", "machine", "warmup", "repeats")]
    client.log_batch(run_id, metrics=metrics, params=params)
    client.log_text(run_id, json.dumps(report, indent=2), "bench.json")
    client.set_terminated(run_id)
    return run_id


def print_table(report: dict[str, Any]) -> None:
    threads = report["threads"]
    title = (
        f"torch.nn.{report['cell'].upper()} vs rnnlab's: median ms of {report['repeats']} runs, {threads} thread{'s' * (threads != 1)}, "
        f"fp32 GEMM ceiling {report['gemm_gflops']:.0f} GFLOP/s; speed-up = torch's time / rnnlab's"
    )
    table = Table(title=title, title_justify="left")
    for column in ("case", "cell", "forward ms", "GFLOP/s", "fwd+bwd ms", "GFLOP/s", "speed-up fwd", "speed-up fwd+bwd"):
        table.add_column(column, justify="left" if column in ("case", "cell") else "right")
    for row in report["rows"]:
        for name in ("torch", "rnnlab"):
            timing = row[name]
            speedups = [f"{row['forward_speedup']:.2f}x", f"{row['train_speedup']:.2f}x"] if name == "rnnlab" else ["", ""]
            table.add_row(
                row["case"] if name == "torch" else "",
                name,
                f"{timing['forward_ms']:.1f}",
                f"{timing['forward_gflops']:.1f}",
                f"{timing['train_ms']:.1f}",
                f"{timing['train_gflops']:.1f}",
                *speedups,
            )
    # On stdout, so `python -m rnnlab.bench > file` keeps it; off a terminal rich assumes 80 columns, which would fold every row.
    stdout = Console(file=sys.stdout)
    (stdout if stdout.is_terminal else Console(file=sys.stdout, width=130)).print(table)


@hydra_entry(config_name="bench")
def main(cfg: DictConfig) -> None:
    report = run_benchmark(cfg)
    print_table(report)
    if cfg.op_profile:
        console.print(f"rnnlab {report['cell'].upper()}, forward+backward, {report['rows'][0]['case']}, 3 runs:")
        console.print(profile_table(report["cell"], configured_cases(cfg)[0], cfg.seed), markup=False, soft_wrap=True)
    run_id = log_to_mlflow(cfg, report)
    console.print(f"Report: {cfg.output}; MLflow: {cfg.tracking.experiment} / {cfg.tracking.run_name} ({run_id})")


if __name__ == "__main__":
    main()
