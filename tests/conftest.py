"""Shared fixtures: composed configs and a tiny sentiment project built from a CSV the tests write."""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from helpers import isolated_outputs, write_tone
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig

from rnnlab.config import config_dir


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (`make test` runs one worker per core), give each worker and the processes
    it starts one torch thread: two workers with two OpenMP threads each would share two cores and
    slow every test several-fold."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        import torch

        torch.set_num_threads(1)


POSITIVE = ["great", "wonderful", "superb", "loved", "brilliant", "moving"]
NEGATIVE = ["awful", "terrible", "boring", "hated", "dull", "worst"]
FILLER = ["the", "film", "plot", "actor", "scene", "story", "was", "and", "a", "it", "movie", "this"]


def make_reviews(n: int, seed: int = 0) -> pd.DataFrame:
    """Synthetic reviews whose label is carried by a few sentiment words among filler."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = [rng.choice(FILLER) for _ in range(rng.randint(8, 30))]
        for _ in range(3):
            words.insert(rng.randrange(len(words)), rng.choice(POSITIVE if label else NEGATIVE))
        rows.append({"text": " ".join(words) + f" <br /><br />review {i}", "label": label, "source": "imdb"})
    rows.append({"text": "not from imdb", "label": 1, "source": "rotten_tomatoes"})
    return pd.DataFrame(rows)


@pytest.fixture(scope="session")
def compose_cfg() -> Callable[..., DictConfig]:
    """Compose conf/config.yaml with overrides, as `python -m rnnlab.train` would."""

    def _compose(*overrides: str) -> DictConfig:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides))

    return _compose


@pytest.fixture(scope="session")
def sentiment_root(tmp_path_factory: pytest.TempPathFactory, compose_cfg: Callable[..., DictConfig]) -> Path:
    """A project root whose sentiment data went through the real fetch and preprocess steps."""
    root = tmp_path_factory.mktemp("project")
    csv = root / "reviews_source.csv"
    make_reviews(240).to_csv(csv, index=False)
    cfg = compose_cfg(f"paths.root={root}", f"task.fetch.source_csv={csv}", "task.preprocess.vocab_size=50", "task.preprocess.max_len=40")
    instantiate(cfg.task.fetch)
    instantiate(cfg.task.preprocess)
    return root


TINY = (
    "profile=smoke",
    "model.encoder.hidden_size=8",
    "task.front_end.embedding_dim=8",
    "task.data.batch_size=32",
    "callbacks.progress_bar=null",
)


@pytest.fixture
def tiny_overrides(sentiment_root: Path, tmp_path: Path) -> list[str]:
    """Overrides for a seconds-long training run on the tiny data, tracked in a fresh store."""
    return [
        *TINY,
        f"paths.root={sentiment_root}",
        f"paths.processed={sentiment_root}/data/processed/sentiment",
        *isolated_outputs(tmp_path),
    ]


@pytest.fixture
def speechcommands_root(tmp_path: Path) -> Path:
    """A tiny SpeechCommands/speech_commands_v0.02 tree: word folders, split lists and background noise.
    One file is odd, yes/aaaa1111_nohash_1.wav: 8 kHz stereo, not 16 kHz mono."""
    root = tmp_path / "archive"
    folder = root / "SpeechCommands" / "speech_commands_v0.02"
    for word in ("yes", "no", "bed"):
        for speaker in ("aaaa1111", "bbbb2222", "cccc3333"):
            write_tone(folder / word / f"{speaker}_nohash_0.wav", seconds=0.8)
    write_tone(folder / "yes" / "aaaa1111_nohash_1.wav", rate=8000, channels=2)
    (folder / "validation_list.txt").write_text("yes/bbbb2222_nohash_0.wav\nno/bbbb2222_nohash_0.wav\nbed/bbbb2222_nohash_0.wav\n")
    (folder / "testing_list.txt").write_text("yes/cccc3333_nohash_0.wav\nno/cccc3333_nohash_0.wav\nbed/cccc3333_nohash_0.wav\n")
    write_tone(folder / "_background_noise_" / "hum.wav", seconds=5.0)
    return root


@pytest.fixture(scope="module")
def speech_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(raw, processed) directories of a tiny set that went through the real espeak-ng fetch and preprocess."""
    from test_speech import fetch_tiny  # the tiny espeak-ng settings live with the speech tests

    from rnnlab.data.speech import preprocess

    root = tmp_path_factory.mktemp("speech")
    fetch_tiny(root / "raw")
    preprocess(str(root / "raw"), str(root / "processed"))
    return root / "raw", root / "processed"
