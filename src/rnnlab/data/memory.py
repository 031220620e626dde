"""Synthetic memory tasks with the time lag as a parameter: fetch, preprocess and the DataModules.

Nothing is downloaded: fetch writes a `source.json` that names the problem and its settings, and preprocess
draws train, val and test from a seed for every lag of `task.preprocess.lags` into `<processed>/lag<L>/`, so a
training picks its lag (`task.data.lag`) without preprocessing again.

- `adding`, the adding problem of Hochreiter & Schmidhuber (1997, experiment 4) in the form of Le, Jaitly &
  Hinton (2015) and Arjovsky, Shah & Bengio (2016): each step's input is (value, marker), the values uniform on [0, 1), the marker 1
  at exactly two steps, one drawn uniformly from the first half of the sequence and one from the second half,
  and the target is the sum of the two marked values. The lag is the sequence length T: the first marked value
  has to be held for between T/2 and T steps. Predicting the mean, 1, gives an MSE of 1/6.
- `copy`, the copying memory task of Arjovsky et al. (2016), after a setup of Hochreiter & Schmidhuber (1997):
  `length` symbols drawn uniformly from an alphabet of `alphabet`, then lag - 1 blanks, a
  delimiter and `length` blanks, during which the network has to output the symbols in order. The lag is
  Arjovsky et al.'s T: each symbol is recalled lag + length steps after it was seen. Guessing gives 1/alphabet.
"""

from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from rnnlab import io
from rnnlab.console import summary
from rnnlab.data.base import SPLITS, SplitTensorDataModule, read_processed_json, save_split
from rnnlab.errors import DataError

PROBLEMS = ("adding", "copy")
SOURCE = "source.json"
METADATA = "metadata.json"
# Token ids of the copy task: 0 is the blank (a zero embedding: TokenEmbedding's padding id), 1..alphabet the
# symbols, alphabet + 1 the delimiter.
BLANK = 0
MIN_LAG = {"adding": 2, "copy": 1}  # the adding problem needs a first and a second half


def is_int(value: object) -> bool:
    """A whole number (bool is an int subclass, but lags=[true] is a mistake); rnnlab.validation's own imports the models."""
    return isinstance(value, int) and not isinstance(value, bool)


def lag_dir(processed_dir: str | Path, lag: int) -> Path:
    return Path(processed_dir) / f"lag{lag}"


def adding_problem(n: int, lag: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """`n` sequences of the adding problem of length `lag`: `values` [n, lag], the two marked steps
    `positions` [n, 2] (one in each half) and `targets` [n], the sums of the marked values."""
    values = rng.random((n, lag), dtype=np.float32)
    half = lag // 2
    positions = np.stack([rng.integers(0, half, size=n), rng.integers(half, lag, size=n)], axis=1)
    targets = np.take_along_axis(values, positions, axis=1).sum(axis=1)
    return {"values": torch.from_numpy(values), "positions": torch.from_numpy(positions), "targets": torch.from_numpy(targets)}


def adding_inputs(values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The network's input [n, T, 2]: each step's value and its marker (1 at the two `positions`, else 0)."""
    markers = torch.zeros_like(values).scatter_(1, positions, 1.0)
    return torch.stack([values, markers], dim=-1)


def copy_tokens(symbols: torch.Tensor, lag: int, alphabet: int) -> torch.Tensor:
    """The copy task's token ids [n, lag + 2 * length] for `symbols` [n, length] (ids 1..alphabet): the symbols,
    lag - 1 blanks, the delimiter, then `length` blanks while the network recalls them."""
    n, length = symbols.shape
    tokens = torch.full((n, lag + 2 * length), BLANK, dtype=torch.int64)
    tokens[:, :length] = symbols
    tokens[:, length + lag - 1] = alphabet + 1
    return tokens


def copy_problem(n: int, lag: int, rng: np.random.Generator, length: int, alphabet: int) -> dict[str, torch.Tensor]:
    """`n` sequences of the copy task: `tokens` [n, lag + 2 * length] (int8 on disk) and `targets` [n, length],
    the symbols to recall as classes 0..alphabet - 1."""
    symbols = torch.from_numpy(rng.integers(1, alphabet + 1, size=(n, length)))
    return {"tokens": copy_tokens(symbols, lag, alphabet).to(torch.int8), "targets": symbols - 1}


def chance_level(problem: str, alphabet: int | None = None) -> dict[str, float]:
    """The primary metric of a guess that ignores the inputs: the adding problem's MSE when always predicting the
    mean sum 1 (the variance of a sum of two uniforms, 1/6); the copy task's accuracy of a uniform guess."""
    return {"test_mse": 1 / 6} if problem == "adding" else {"test_acc": 1 / alphabet}


def _positive_int(value: Any, name: str, minimum: int = 1) -> int:
    if not is_int(value) or value < minimum:
        raise DataError(f"{name} must be a whole number >= {minimum}, got {value!r}.")
    return value


def fetch(out_dir: str, problem: str, length: int | None = None, alphabet: int | None = None) -> None:
    """Write data/raw/<task>/source.json: the problem and its settings (nothing is downloaded, preprocess generates)."""
    if problem not in PROBLEMS:
        raise DataError(f"task.fetch.problem={problem!r} is not a memory problem; choose one of {list(PROBLEMS)}.")
    settings: dict[str, Any] = {}
    if problem == "copy":
        settings = {
            "length": _positive_int(length, "task.fetch.length (symbols to copy)"),
            "alphabet": _positive_int(alphabet, "task.fetch.alphabet (distinct symbols)", minimum=2),
        }
        if alphabet + 1 > np.iinfo(np.int8).max:  # the tokens are stored as int8
            raise DataError(f"task.fetch.alphabet={alphabet} is too large: at most {np.iinfo(np.int8).max - 1} symbols.")
    elif length is not None or alphabet is not None:
        raise DataError("task.fetch.length and task.fetch.alphabet are settings of the copy task; the adding problem has neither.")
    source = {"source": "synthetic", "problem": problem, **settings, "generator": f"rnnlab.data.memory, numpy=={version('numpy')}"}
    with io.atomic_dir(out_dir) as tmp:
        io.write_json(tmp / SOURCE, source)
    summary(f"fetch memory ({problem})", {**settings, "written": Path(out_dir) / SOURCE})


def read_source(raw_dir: str | Path) -> dict[str, Any]:
    path = Path(raw_dir) / SOURCE
    if not path.is_file():
        raise DataError(f"{path} is missing: run the fetch stage first (`python -m rnnlab.fetch task=memory_adding`, or task=memory_copy).")
    source = json.loads(path.read_text())
    if source.get("problem") not in PROBLEMS:
        raise DataError(f"{path} names no memory problem ({source.get('problem')!r}); fetch it again.")
    return source


def preprocess(
    raw_dir: str,
    out_dir: str,
    lags: list[int],
    train_size: int = 4000,
    val_size: int = 500,
    test_size: int = 1000,
    seed: int = 1234,
) -> None:
    """Generate train, val and test for every lag into <out_dir>/lag<L>/, each split from its own stream of
    (seed, lag, split), so that a lag or a size added later leaves the other lags' data as it was."""
    source = read_source(raw_dir)
    problem = source["problem"]
    if isinstance(lags, int | str) or not lags or not all(is_int(lag) and lag >= MIN_LAG[problem] for lag in lags):
        raise DataError(f"task.preprocess.lags must be a non-empty list of whole numbers >= {MIN_LAG[problem]}, got {lags!r}.")
    if len(set(lags)) != len(lags):
        raise DataError(f"task.preprocess.lags lists a lag twice: {list(lags)}.")
    sizes = {
        split: _positive_int(size, f"task.preprocess.{split}_size")
        for split, size in zip(SPLITS, (train_size, val_size, test_size), strict=True)
    }
    if not is_int(seed) or seed < 0:
        raise DataError(f"task.preprocess.seed must be a whole number >= 0, got {seed!r}.")
    settings = {key: source[key] for key in ("length", "alphabet") if key in source}
    with io.atomic_dir(out_dir) as tmp:
        for lag in sorted(lags):
            folder = lag_dir(tmp, lag)
            folder.mkdir()
            for index, split in enumerate(SPLITS):
                rng = np.random.default_rng([seed, lag, index])
                generated = (
                    adding_problem(sizes[split], lag, rng) if problem == "adding" else copy_problem(sizes[split], lag, rng, **settings)
                )
                save_split(folder, split, generated)
            steps = lag if problem == "adding" else lag + 2 * settings["length"]
            io.write_json(folder / METADATA, {"problem": problem, "lag": lag, "steps": steps, **settings, "sizes": sizes})
        metadata = {
            "problem": problem,
            "lags": sorted(lags),
            **settings,
            "sizes": sizes,
            "seed": seed,
            "chance": chance_level(problem, settings.get("alphabet")),
        }
        io.write_json(tmp / METADATA, metadata)
    summary(f"preprocess memory ({problem})", {"lags": ", ".join(map(str, sorted(lags))), **sizes, "written": out_dir})


class MemoryDataModule(SplitTensorDataModule):
    """The splits of one lag (`lag`, one of the preprocessed `task.preprocess.lags`); each test sequence is its own
    unit and group: sequences are drawn independently."""

    def __init__(self, processed_dir: str, lag: int = 100, **kwargs: Any) -> None:
        if not is_int(lag) or lag <= 0:
            raise DataError(f"task.data.lag must be a positive whole number, got {lag!r}.")
        root, task = Path(processed_dir), kwargs.get("task") or Path(processed_dir).name
        lags = read_processed_json(root, "metadata.json", task, ["lags"])["lags"]
        if lag not in lags:
            raise DataError(
                f"task.data.lag={lag} was not preprocessed: {root} holds the lags {', '.join(map(str, lags))}. Train one of "
                f"those, or add {lag} to task.preprocess.lags and preprocess again."
            )
        super().__init__(lag_dir(root, lag), **kwargs)
        self.task, self.lag = task, lag

    def test_units(self) -> pd.DataFrame:
        ids = np.arange(len(self.datasets["test"]))
        return pd.DataFrame({"unit": ids, "group": ids})


class AddingDataModule(MemoryDataModule):
    """Batches of (inputs [B, T, 2]: value and marker per step, target sums [B])."""

    batch_keys = ("inputs", "targets")

    def transform(self, split: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # Saved as values and marked positions: a quarter of the bytes of the inputs themselves.
        return {**tensors, "inputs": adding_inputs(tensors["values"], tensors["positions"])}

    @property
    def front_end_dims(self) -> dict[str, int]:
        return {"num_features": 2}

    @property
    def head_dims(self) -> dict[str, int]:
        return {}


class CopyDataModule(MemoryDataModule):
    """Batches of (token ids [B, lag + 2 * length], the symbols to recall [B, length] as classes)."""

    batch_keys = ("tokens", "targets")

    def transform(self, split: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {**tensors, "tokens": tensors["tokens"].long()}

    @property
    def front_end_dims(self) -> dict[str, int]:
        return {"vocab_size": self.metadata["alphabet"] + 2}

    @property
    def head_dims(self) -> dict[str, int]:
        return {"alphabet": self.metadata["alphabet"], "length": self.metadata["length"]}
