"""Sentiment data: tokenizer, split properties, train-only vocabulary, loaders and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from rnnlab.data.sentiment import (
    SentimentDataModule,
    build_vocab,
    encode,
    fetch,
    load_aclimdb,
    read_reviews_csv,
    split_indices,
    tokenize,
)
from rnnlab.errors import DataError


def test_tokenize_strips_markup_and_lowercases() -> None:
    assert tokenize("Great film!<br /><br />I didn't LIKE the end?") == ["great", "film", "!", "i", "didn't", "like", "the", "end", "?"]


def test_encode_keeps_the_last_tokens_left_padded() -> None:
    index = {"<pad>": 0, "<unk>": 1, "a": 2, "b": 3}
    assert encode(["a", "b"], index, 4) == [0, 0, 2, 3]
    assert encode(["a", "x", "b", "a", "b"], index, 3) == [3, 2, 3]
    assert encode(["zzz"], index, 2) == [0, 1]


def test_split_is_deterministic_stratified_and_disjoint() -> None:
    labels = pd.Series([i % 2 for i in range(1000)], index=range(5000, 6000))
    first = split_indices(labels, 0.1, 0.1, seed=3)
    assert first == split_indices(labels, 0.1, 0.1, seed=3)
    assert first != split_indices(labels, 0.1, 0.1, seed=4)
    sets = {name: set(ids) for name, ids in first.items()}
    assert not (sets["train"] & sets["val"] or sets["train"] & sets["test"] or sets["val"] & sets["test"])
    assert set().union(*sets.values()) == set(labels.index)
    assert {name: len(ids) for name, ids in first.items()} == {"train": 800, "val": 100, "test": 100}
    for ids in first.values():
        assert labels.loc[ids].mean() == pytest.approx(0.5)


def test_vocab_ranks_by_frequency_with_alphabetical_ties() -> None:
    vocab = build_vocab([["b", "a", "c", "c"], ["a", "d"]], size=3)
    assert vocab == ["<pad>", "<unk>", "a", "c", "b"]


def test_preprocessed_splits_have_no_overlap_and_vocab_from_train_only(sentiment_root: Path) -> None:
    processed = sentiment_root / "data" / "processed" / "sentiment"
    splits = json.loads((processed / "splits.json").read_text())
    assert sum(len(v) for v in splits.values()) == 240  # the rotten_tomatoes row is dropped
    assert not set(splits["train"]) & (set(splits["val"]) | set(splits["test"]))
    raw = pd.read_csv(sentiment_root / "data" / "raw" / "sentiment" / "reviews.csv").set_index("id")
    vocab = set(json.loads((processed / "vocab.json").read_text()))
    train_tokens = {t for i in splits["train"] for t in tokenize(raw.loc[i, "text"])}
    # Each review ends with its own number: numbers of val/test reviews must not be in the vocabulary.
    held_out_numbers = {str(i) for i in splits["val"] + splits["test"]} - train_tokens
    assert held_out_numbers and not (held_out_numbers & vocab)
    assert vocab - {"<pad>", "<unk>"} <= train_tokens
    tensors = torch.load(processed / "train.pt", weights_only=True)
    assert tensors["tokens"].shape == (len(splits["train"]), 40)
    assert tensors["labels"].tolist() == raw.loc[splits["train"], "label"].tolist()


def test_datamodule_limits_and_truncates(sentiment_root: Path) -> None:
    dm = SentimentDataModule(sentiment_root / "data" / "processed" / "sentiment", batch_size=8, max_len=10, limit_train=20)
    dm.setup()
    tokens, _labels = next(iter(dm.train_dataloader()))
    assert tokens.shape == (8, 10) and tokens.dtype == torch.long
    assert len(dm.datasets["train"]) == 20
    assert dm.front_end_dims == {"vocab_size": 52} and dm.head_dims == {"num_classes": 2}


def test_aclimdb_loader_reads_the_original_layout(tmp_path: Path) -> None:
    root = tmp_path / "aclImdb"
    reviews = {("train", "pos"): "A joy.<br />Loved it", ("train", "neg"): "Dull", ("test", "pos"): "Superb", ("test", "neg"): "Awful"}
    for (split, polarity), text in reviews.items():
        (root / split / polarity).mkdir(parents=True)
        (root / split / polarity / "0_7.txt").write_text(text, encoding="utf-8")
    (root / "train" / "unsup").mkdir()
    (root / "train" / "unsup" / "1_0.txt").write_text("unlabelled", encoding="utf-8")
    frame = load_aclimdb(root)
    assert len(frame) == 4
    assert dict(zip(frame["text"], frame["label"], strict=False)) == {"A joy.<br />Loved it": 1, "Dull": 0, "Superb": 1, "Awful": 0}
    fetch(str(tmp_path / "raw"), source="aclimdb", aclimdb_dir=str(root))
    assert len(pd.read_csv(tmp_path / "raw" / "reviews.csv")) == 4


def test_aclimdb_invalid_utf8_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "aclImdb" / "train" / "pos" / "3_9.txt"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"caf\xe9 review")
    with pytest.raises(DataError, match=r"3_9\.txt is not valid UTF-8"):
        load_aclimdb(tmp_path / "aclImdb")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("text,rating\nfine,5\n", r"lacks the column\(s\) \['label'\]"),
        ("text,label\nfine,7\n", "label\\(s\\) other than 0/1"),
        ("", "not a readable CSV"),
    ],
)
def test_bad_review_csv_is_refused_with_the_fix(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "reviews.csv"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        read_reviews_csv(path)


def test_fetch_leaves_nothing_behind_on_failure(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"text,label\n\xff\xfe,1\n")
    with pytest.raises(DataError, match="not valid UTF-8"):
        fetch(str(tmp_path / "raw"), source_csv=str(bad))
    assert not (tmp_path / "raw").exists()
