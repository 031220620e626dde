"""Shared LightningDataModule for tasks whose preprocess step saves one tensor file per split."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import pandas as pd
import torch
from torch.utils.data import DataLoader, Sampler, TensorDataset

from rnnlab import streams
from rnnlab.errors import DataError

SPLITS = ("train", "val", "test")


def _not_utf8(path: Path, err: UnicodeDecodeError) -> DataError:
    """Name the first byte of `path` that is not UTF-8, and its line (pandas decodes in chunks: its error's offset is not the file's)."""
    data = Path(path).read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exact:
        err = exact
    line = data.count(b"\n", 0, err.start) + 1
    return DataError(f"{path} is not valid UTF-8 ({err.reason} at byte {err.start}, line {line}); re-encode it as UTF-8.")


def read_text(path: Path) -> str:
    """A UTF-8 text file; anything else is a DataError naming the file, the byte and the fix."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise _not_utf8(path, err) from err


def read_csv(path: Path, expected: str, **options: Any) -> pd.DataFrame:
    """A UTF-8 CSV file read by pandas; a file that is not is a DataError naming it and what was `expected`."""
    try:
        frame = pd.read_csv(path, encoding="utf-8", **options)
    except UnicodeDecodeError as err:
        raise _not_utf8(path, err) from err
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise DataError(f"{path} is not a readable CSV ({err}); expected {expected}.") from err
    # pandas takes the first column as the index, instead of failing, when the first row has more fields than the header.
    if "index_col" not in options and not isinstance(frame.index, pd.RangeIndex):
        raise DataError(
            f"{path} is not a readable CSV (the first row has more fields than the header {list(frame.columns)}); expected {expected}."
        )
    return frame


def save_split(out_dir: Path, split: str, tensors: dict[str, torch.Tensor]) -> None:
    torch.save(tensors, out_dir / f"{split}.pt")


def reprocess_hint(task: str) -> str:
    """What to do about processed data that cannot be read: DVC restores or rebuilds it."""
    return f"restore it with `dvc checkout`, or preprocess again with `dvc repro -f preprocess@{task}`"


def missing_hint(task: str, stage: str = "preprocess") -> str:
    """What to do about a file a stage (fetch or preprocess) of `task` should have written."""
    return f"run `dvc repro {stage}@{task}` (or `python -m rnnlab.{stage} task={task}`)"


def load_split(processed_dir: Path, split: str, task: str) -> dict[str, torch.Tensor]:
    path = Path(processed_dir) / f"{split}.pt"
    if not path.is_file():
        raise DataError(f"{path} is missing: {missing_hint(task)}.")
    try:
        return torch.load(path, weights_only=True)
    except Exception as err:  # truncated, overwritten or not torch's: torch.load's error depends on the bytes
        # Its first line only: torch's unpickling errors run to a dozen lines of advice about weights_only.
        reason = next(iter(str(err).strip().splitlines()), type(err).__name__)
        raise DataError(f"{path} is not readable processed data ({reason[:100]}); {reprocess_hint(task)}.") from err


def read_processed_json(processed_dir: str | Path, name: str, task: str, keys: Sequence[str] = ()) -> Any:
    """A JSON file preprocess wrote, with `keys` present (older preprocess outputs lack some); a missing, unreadable or
    older file is a DataError naming the command that writes it again."""
    path = Path(processed_dir) / name
    if not path.is_file():
        raise DataError(f"{path} is missing: {missing_hint(task)}.")
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError) as err:  # truncated or not JSON (a UnicodeDecodeError is a ValueError)
        raise DataError(f"{path} is not readable processed data ({err}); {reprocess_hint(task)}.") from None
    missing = [key for key in keys if key not in content]
    if missing:
        raise DataError(f"{path} has no {missing}: it was written by an older preprocess; run `dvc repro preprocess@{task}` and retrain.")
    return content


class EpochShuffle(Sampler[int]):
    """A fresh permutation of `size` indices each epoch, drawn from the run's data-order stream.

    Lightning calls `set_epoch` before every training epoch (also the first one after a resume), so
    the order is a function of (seed, epoch) alone: the same for every model, exact on resume.
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        return iter(torch.randperm(self.size, generator=streams.generator(self.seed, streams.ORDER, self.epoch)).tolist())


class SplitTensorDataModule(L.LightningDataModule):
    """Serves the train/val/test tensors of a processed task directory.

    Subclasses say which tensors make a batch (`batch_keys`), what the network needs to know
    about the data (`front_end_dims`, `head_dims`) and what each test example is (`test_units`).
    `seed` is the run's: the training order comes from its data-order stream (rnnlab.streams).
    """

    batch_keys: tuple[str, ...] = ()

    def __init__(
        self,
        processed_dir: str | Path,
        batch_size: int = 64,
        limit_train: int | None = None,
        limit_val: int | None = None,
        limit_test: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        task: str | None = None,
    ) -> None:
        super().__init__()
        if batch_size <= 0:
            raise DataError(f"batch_size must be a positive integer, got {batch_size}.")
        self.processed_dir = Path(processed_dir)
        self.task = task or self.processed_dir.name  # the pipeline's layout names a task's folder after it
        self.batch_size = batch_size
        self.limits = {"train": limit_train, "val": limit_val, "test": limit_test}
        self.num_workers = num_workers
        self.seed = seed
        self.datasets: dict[str, TensorDataset] = {}

    @property
    def metadata(self) -> dict[str, Any]:
        return read_processed_json(self.processed_dir, "metadata.json", self.task)

    def transform(self, split: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Hook for load-time changes (e.g. truncation); identity by default."""
        return tensors

    def setup(self, stage: str | None = None) -> None:
        for split in SPLITS:
            if split in self.datasets:
                continue
            tensors = self.transform(split, load_split(self.processed_dir, split, self.task))
            limit = self.limits[split]
            # Splits are shuffled once in preprocess, so a prefix is a random sample.
            columns = [tensors[key][:limit] for key in self.batch_keys]
            if len(columns[0]) == 0:
                raise DataError(f"The {split} split in {self.processed_dir} is empty; check the limits and the preprocess output.")
            self.datasets[split] = TensorDataset(*columns)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        dataset = self.datasets[split]
        sampler = EpochShuffle(len(dataset), self.seed) if shuffle else None
        return DataLoader(
            dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers, generator=self.loader_generator()
        )

    def loader_generator(self) -> torch.Generator:
        """The generator a DataLoader draws its workers' base seed from when it starts an epoch: without one it draws from
        torch's global generator, which dropout uses, at moments that differ between a fresh and a resumed run."""
        return streams.generator(self.seed, streams.LOADER)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def test_units(self) -> pd.DataFrame:
        """One row per test example, in test-loader order: its `unit` (what it is) and `group` (what it shares
        with other examples, for resampling: a review, a speaker, a work, a block of forecast origins)."""
        raise NotImplementedError

    @property
    def front_end_dims(self) -> dict[str, int]:
        raise NotImplementedError

    @property
    def head_dims(self) -> dict[str, int]:
        raise NotImplementedError
