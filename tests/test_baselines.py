"""The baseline stage: TF-IDF + logistic regression on the networks' sentiment splits and test units."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from helpers import run_main
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from rnnlab.baselines import main as baselines_main
from rnnlab.baselines import run
from rnnlab.config import config_dir
from rnnlab.data.sentiment import SentimentDataModule
from rnnlab.errors import ConfigError


def compose_baselines(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="baselines", overrides=list(overrides))


def test_tfidf_baseline_scores_the_networks_test_reviews(sentiment_root: Path, tmp_path: Path) -> None:
    cfg = compose_baselines(f"paths.root={sentiment_root}", f"paths.baselines_dir={tmp_path}", "task.data.limit_test=20")
    metrics = run(cfg)
    predictions = pd.read_csv(tmp_path / "tfidf_logreg_predictions.csv")
    assert json.loads((tmp_path / "tfidf_logreg.json").read_text()) == metrics
    # The same test reviews, in the same order, as a network's test loader reads them.
    data = SentimentDataModule(sentiment_root / "data" / "processed" / "sentiment", limit_test=20)
    data.setup()
    pd.testing.assert_frame_equal(predictions[["unit", "group"]], data.test_units())
    assert predictions["target"].tolist() == data.datasets["test"].tensors[1].tolist()
    assert list(predictions.columns) == ["unit", "group", "target", "prediction", "score", "loss"]
    assert metrics["test_acc"] == pytest.approx((predictions["prediction"] == predictions["target"]).mean())
    assert metrics["test_acc"] >= 0.9  # three sentiment words per synthetic review: an easy bar
    assert metrics["C"] in cfg.baselines.tfidf_logreg.c_grid and metrics["features"] > 0
    assert ((predictions["score"] > 0.5) == predictions["prediction"]).all()


def test_a_task_without_a_baseline_stage_is_a_clear_error(sentiment_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match=r"task speech has no baseline stage \(tasks with one: sentiment\)"):
        run(compose_baselines(f"paths.root={sentiment_root}", "task=speech", f"paths.baselines_dir={tmp_path}"))
    result = run_main(baselines_main, f"paths.root={tmp_path}", run_dir=tmp_path / "hydra", capsys=capsys)
    assert result.returncode == 2 and "splits.json is missing: run the preprocess stage first" in result.stderr
    assert not list(tmp_path.glob("metrics/**/*.csv"))
