"""Strong simple baselines on the networks' splits and test units: `python -m rnnlab.baselines task=sentiment`.

A baseline answers "is this score good?": the comparison puts it in the task's table and tests every network
against it on the same test examples. It writes, beside the networks' outputs (`paths.baselines_dir`,
metrics/<task>/baselines/), `<name>.json` (its test metrics and chosen settings) and `<name>_predictions.csv` (the
per-example test outputs, with the columns of a training's). Forecast tasks need no stage: their baselines'
forecasts are part of every run's test outputs.

- sentiment: TF-IDF over word 1- and 2-grams (rnnlab's own tokenizer) and a logistic regression (scikit-learn),
  its inverse regularisation C chosen on validation accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

from rnnlab import io
from rnnlab.config import hydra_entry
from rnnlab.console import summary
from rnnlab.data.base import SPLITS
from rnnlab.data.sentiment import RAW_FILE, read_reviews_csv, tokenize
from rnnlab.errors import ConfigError, DataError


def split_ids(processed_dir: Path, limits: dict[str, int | None]) -> dict[str, list[Any]]:
    """The example ids of each split as the networks read them: splits.json's order, cut at task.data.limit_<split>."""
    path = processed_dir / "splits.json"
    if not path.is_file():
        raise DataError(f"{path} is missing: run the preprocess stage first (`dvc repro` or `python -m rnnlab.preprocess task=...`).")
    splits = json.loads(path.read_text())
    return {split: splits[split][: limits.get(split)] for split in SPLITS}


def tfidf_logistic_regression(
    raw_dir: Path, processed_dir: Path, limits: dict[str, int | None], c_grid: list[float], ngram_max: int, min_df: int
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Fit TF-IDF + logistic regression on train for each C of `c_grid`, keep the best on validation accuracy, and
    score the test reviews; the per-review test outputs and the metrics."""
    ids = split_ids(processed_dir, limits)
    if not (raw_dir / RAW_FILE).is_file():
        raise DataError(f"{raw_dir / RAW_FILE} is missing: run the fetch stage first (`dvc repro` or `python -m rnnlab.fetch task=...`).")
    reviews = read_reviews_csv(raw_dir / RAW_FILE).set_index("id")
    texts = {split: reviews.loc[ids[split], "text"].tolist() for split in SPLITS}
    labels = {split: reviews.loc[ids[split], "label"].astype(int).to_numpy() for split in SPLITS}
    vectorizer = TfidfVectorizer(tokenizer=tokenize, lowercase=False, token_pattern=None, ngram_range=(1, ngram_max), min_df=min_df)
    vectorizer.set_params(sublinear_tf=True)
    features = {"train": vectorizer.fit_transform(texts["train"])}
    features |= {split: vectorizer.transform(texts[split]) for split in ("val", "test")}
    fitted = {c: LogisticRegression(C=c, max_iter=2000).fit(features["train"], labels["train"]) for c in c_grid}
    val_acc = {c: float((model.predict(features["val"]) == labels["val"]).mean()) for c, model in fitted.items()}
    best = max(c_grid, key=lambda c: (val_acc[c], -c))  # the strongest regularisation among equals
    probability = fitted[best].predict_proba(features["test"])[:, 1]
    target = labels["test"]
    prediction = (probability > 0.5).astype(int)
    loss = -np.log(np.where(target == 1, probability, 1 - probability).clip(1e-12))
    outputs = pd.DataFrame(
        {"unit": ids["test"], "group": ids["test"], "target": target, "prediction": prediction, "score": probability, "loss": loss}
    )
    metrics = {
        "test_acc": float((prediction == target).mean()),
        "test_loss": float(loss.mean()),
        "val_acc": val_acc[best],
        "C": best,
        "features": len(vectorizer.vocabulary_),
    }
    return outputs, metrics


BASELINES = {"sentiment": ("tfidf_logreg", tfidf_logistic_regression)}


def run(cfg: DictConfig) -> dict[str, Any]:
    """Fit the task's baseline and write its metrics and per-example test outputs atomically."""
    if cfg.task.name not in BASELINES:
        raise ConfigError(
            f"task {cfg.task.name} has no baseline stage (tasks with one: {', '.join(BASELINES)}); forecast tasks score their "
            "baselines inside every training run."
        )
    name, fit = BASELINES[cfg.task.name]
    settings = OmegaConf.to_container(cfg.baselines[name], resolve=True)
    limits = {split: cfg.task.data.get(f"limit_{split}") for split in SPLITS}
    outputs, metrics = fit(Path(cfg.paths.raw), Path(cfg.paths.processed), limits, **settings)
    out = Path(cfg.paths.baselines_dir)
    with io.atomic_path(out / f"{name}_predictions.csv") as predictions_tmp, io.atomic_path(out / f"{name}.json") as metrics_tmp:
        outputs.to_csv(predictions_tmp, index=False, float_format="%.6g")
        metrics_tmp.write_text(io.json_text(metrics))
    summary(f"baseline {name} on {cfg.task.name}", {**{k: f"{v:.4g}" for k, v in metrics.items()}, "written": out})
    return metrics


@hydra_entry(config_name="baselines")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
