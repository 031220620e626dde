"""Strong simple baselines on the networks' splits and test units: `python -m rnnlab.baselines task=<task>`.

A baseline answers "is this score good?": the comparison puts it in the task's table and tests every network
against it on the same test examples. Per baseline it writes, beside the networks' outputs (`paths.baselines_dir`,
metrics/<task>/baselines/), `<name>.json` (its test metrics and chosen settings) and `<name>_predictions.csv` (the
per-example test outputs, with the columns of a training's). Its settings are the task config's `baselines:`.

- sentiment: TF-IDF over word 1- and 2-grams (rnnlab's own tokenizer) and a logistic regression (scikit-learn),
  its inverse regularisation C chosen on validation accuracy;
- textgen: an interpolated Kneser-Ney character n-gram model, its order chosen on validation loss, scoring each
  test chunk row from the same context the language model has (its row of the test stream, from the row's start);
- speech: summary statistics of each clip's log-mel frames (mean, spread, extremes, mean change per frame) and a
  logistic regression, C chosen on validation accuracy;
- memory_adding, memory_copy: the best guess that ignores the inputs, from the training targets (the mean sum; each
  recalled position's most frequent symbol): where a network stays at this bar it remembered nothing;
- forecast tasks: persistence, a seasonal naive per period, M4's Naive2, automatic ARIMA and ETS
  (rnnlab.data.forecast_baselines), fitted on the train rows and forecasting from every test origin. Their fits (scipy's
  optimisers) differ in the last digits between CPUs, which is why they are this stage's outputs and not data.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from rnnlab import io
from rnnlab.config import hydra_entry
from rnnlab.console import summary
from rnnlab.data.base import SPLITS, SplitTensorDataModule
from rnnlab.data.forecast import baseline_inputs, target_windows
from rnnlab.data.forecast_baselines import baseline_forecasts
from rnnlab.data.sentiment import RAW_FILE, read_reviews_csv, tokenize
from rnnlab.errors import ConfigError, DataError

# The list of the baselines a stage wrote, in paths.baselines_dir.
MANIFEST = "baselines.json"


def written_baselines(baselines_dir: Path) -> list[str]:
    """The baselines the task's baseline stage last wrote to `baselines_dir`, in its order (none without the stage)."""
    manifest = baselines_dir / MANIFEST
    if not manifest.is_file():
        return []
    try:
        return list(json.loads(manifest.read_text())["baselines"])
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(f"{manifest} is unreadable ({err}): rerun the task's baseline stage (`dvc repro`).") from err


def split_ids(processed_dir: Path, limits: dict[str, int | None]) -> dict[str, list[Any]]:
    """The example ids of each split as the networks read them: splits.json's order, cut at task.data.limit_<split>."""
    path = processed_dir / "splits.json"
    if not path.is_file():
        raise DataError(f"{path} is missing: run the preprocess stage first (`dvc repro` or `python -m rnnlab.preprocess task=...`).")
    splits = json.loads(path.read_text())
    return {split: splits[split][: limits.get(split)] for split in SPLITS}


def tfidf_logistic_regression(
    raw_dir: Path, data: SplitTensorDataModule, c_grid: list[float], ngram_max: int, min_df: int
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Fit TF-IDF + logistic regression on train for each C of `c_grid`, keep the best on validation accuracy, and
    score the test reviews; the per-review test outputs and the metrics."""
    ids = split_ids(data.processed_dir, data.limits)
    if not (raw_dir / RAW_FILE).is_file():
        raise DataError(f"{raw_dir / RAW_FILE} is missing: run the fetch stage first (`dvc repro` or `python -m rnnlab.fetch task=...`).")
    reviews = read_reviews_csv(raw_dir / RAW_FILE).set_index("id")
    texts = {split: reviews.loc[ids[split], "text"].tolist() for split in SPLITS}
    labels = {split: reviews.loc[ids[split], "label"].astype(int).to_numpy() for split in SPLITS}
    vectorizer = TfidfVectorizer(tokenizer=tokenize, lowercase=False, token_pattern=None, ngram_range=(1, ngram_max), min_df=min_df)
    vectorizer.set_params(sublinear_tf=True)
    features = {"train": vectorizer.fit_transform(texts["train"])}
    features |= {split: vectorizer.transform(texts[split]) for split in ("val", "test")}
    best, val_acc, model = _best_on_validation(c_grid, lambda c: LogisticRegression(C=c, max_iter=2000), features, labels)
    outputs, test_acc, test_loss = _classifier_outputs(model, features["test"], labels["test"], 2, ids["test"], ids["test"])
    metrics = {"test_acc": test_acc, "test_loss": test_loss, "val_acc": val_acc, "C": best, "features": len(vectorizer.vocabulary_)}
    return outputs, metrics


def _best_on_validation(
    c_grid: list[float], make: Callable[[float], Any], features: dict[str, Any], labels: dict[str, np.ndarray]
) -> tuple[float, float, Any]:
    """(C, validation accuracy, fitted model) of the C in `c_grid` whose model, fitted on train, is most accurate on
    validation; the strongest regularisation (smallest C) among equals."""
    fitted = {c: make(c).fit(features["train"], labels["train"]) for c in c_grid}
    val_acc = {c: float((model.predict(features["val"]) == labels["val"]).mean()) for c, model in fitted.items()}
    best = max(c_grid, key=lambda c: (val_acc[c], -c))
    return best, val_acc[best], fitted[best]


def _classifier_outputs(
    model: Any, features: Any, target: np.ndarray, num_classes: int, units: list[Any], groups: list[Any]
) -> tuple[pd.DataFrame, float, float]:
    """A classifier's per-example test outputs as a network's (prediction; score = the positive class's probability
    with two classes, else the predicted class's; loss = cross-entropy in nats), its accuracy and its mean loss."""
    probabilities = np.zeros((len(target), num_classes))
    probabilities[:, model.classes_] = model.predict_proba(features)  # a class absent from train keeps probability 0
    prediction = probabilities.argmax(axis=1)
    loss = -np.log(probabilities[np.arange(len(target)), target].clip(1e-12))
    score = probabilities[:, 1] if num_classes == 2 else probabilities.max(axis=1)
    outputs = pd.DataFrame({"unit": units, "group": groups, "target": target, "prediction": prediction, "score": score, "loss": loss})
    return outputs, float((prediction == target).mean()), float(loss.mean())


# Per clip, over its frames [N, T, n_mels]: one value per mel bin each.
MEL_STATISTICS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "mean": lambda frames: frames.mean(axis=1),
    "std": lambda frames: frames.std(axis=1),
    "min": lambda frames: frames.min(axis=1),
    "max": lambda frames: frames.max(axis=1),
    "delta": lambda frames: np.abs(np.diff(frames, axis=1)).mean(axis=1),  # how fast each band changes
}


def mel_statistics_logistic_regression(
    raw_dir: Path, data: SplitTensorDataModule, c_grid: list[float], statistics: list[str]
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Summary statistics of each clip's log-mel frames, standardised, and a multinomial logistic regression for
    each C of `c_grid`, the best on validation accuracy scoring the test clips."""
    unknown = [name for name in statistics if name not in MEL_STATISTICS]
    if unknown or not statistics:
        raise ConfigError(f"task.baselines.statistics {statistics} is invalid; choose one or more of {list(MEL_STATISTICS)}.")
    data.setup()
    features, labels = {}, {}
    for split in SPLITS:
        frames, split_labels = (tensor.numpy() for tensor in data.datasets[split].tensors)
        features[split] = np.concatenate([MEL_STATISTICS[name](frames.astype(np.float64)) for name in statistics], axis=1)
        labels[split] = split_labels.astype(int)

    def make(c: float) -> Any:
        return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=3000))

    best, val_acc, model = _best_on_validation(c_grid, make, features, labels)
    units = data.test_units()
    num_classes = data.head_dims["num_classes"]
    outputs, test_acc, test_loss = _classifier_outputs(
        model, features["test"], labels["test"], num_classes, units["unit"].tolist(), units["group"].tolist()
    )
    metrics = {"test_acc": test_acc, "test_loss": test_loss, "val_acc": val_acc, "C": best, "features": features["test"].shape[1]}
    return outputs, metrics


@dataclass
class _NgramCounts:
    """Counts of the n-grams of one length, as int64 keys (character ids in base V), sorted for searchsorted lookups,
    with their contexts' totals and numbers of distinct following characters, and the order's discount."""

    keys: np.ndarray
    counts: np.ndarray
    contexts: np.ndarray
    totals: np.ndarray
    followers: np.ndarray
    discount: float

    @classmethod
    def of(cls, keys: np.ndarray, counts: np.ndarray, vocab_size: int) -> _NgramCounts:
        contexts, inverse = np.unique(keys // vocab_size, return_inverse=True)
        n1, n2 = int((counts == 1).sum()), int((counts == 2).sum())
        # Ney, Essen and Kneser's estimate D = n1 / (n1 + 2 n2), from the counts of counts 1 and 2.
        discount = n1 / (n1 + 2 * n2) if n1 + 2 * n2 else 0.5
        return cls(keys, counts, contexts, np.bincount(inverse, weights=counts), np.bincount(inverse), discount)

    def interpolate(self, context_keys: np.ndarray, targets: np.ndarray, lower: np.ndarray, vocab_size: int) -> np.ndarray:
        """P(target | context): the discounted count of the n-gram plus the discount's mass spread by the lower order's
        P, or the lower order's P alone where the context was never seen."""
        gram = _lookup(self.keys, self.counts, context_keys * vocab_size + targets)
        total = _lookup(self.contexts, self.totals, context_keys)
        followers = _lookup(self.contexts, self.followers, context_keys)
        seen = total > 0
        safe_total = np.where(seen, total, 1.0)
        mixed = (np.maximum(gram - self.discount, 0) + self.discount * followers * lower) / safe_total
        return np.where(seen, mixed, lower)


def _lookup(keys: np.ndarray, values: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """values[keys == query] for each query, 0 where the key is absent (keys sorted)."""
    if not len(keys):
        return np.zeros(len(queries))
    index = np.searchsorted(keys, queries).clip(max=len(keys) - 1)
    return np.where(keys[index] == queries, values[index], 0).astype(np.float64)


class KneserNey:
    """Interpolated Kneser-Ney character n-gram model (Chen and Goodman, 1999, section 3.5), one discount per order:
    the highest order interpolates raw counts, every lower one continuation counts (the number of distinct
    characters each n-gram follows), down to a uniform distribution over the vocabulary.

    Written here because nltk's KneserNeyInterpolated scores one n-gram at a time in Python, hours for the test
    set; this counts with np.unique over int64 keys and scores all positions at once.
    """

    def __init__(self, train: np.ndarray, vocab_size: int, max_order: int) -> None:
        if max_order < 1 or vocab_size**max_order >= 2**62:
            longest = max(n for n in range(1, 63) if vocab_size**n < 2**62)
            raise ConfigError(
                f"task.baselines.orders: order {max_order} with {vocab_size} characters does not fit an int64 key; "
                f"choose orders from 1 to {longest}."
            )
        self.vocab_size, self.max_order = vocab_size, max_order
        self.raw = {n: _NgramCounts.of(*np.unique(self._grams(train, n), return_counts=True), vocab_size) for n in range(1, max_order + 1)}
        # n-grams of length n, counted once per distinct preceding character: the suffixes of the distinct (n+1)-grams.
        self.continuation = {
            n: _NgramCounts.of(*np.unique(self.raw[n + 1].keys % vocab_size**n, return_counts=True), vocab_size)
            for n in range(1, max_order)
        }

    def _grams(self, stream: np.ndarray, n: int) -> np.ndarray:
        keys = np.zeros(len(stream) - n + 1, dtype=np.int64)
        for offset in range(n):
            keys = keys * self.vocab_size + stream[offset : len(stream) - n + 1 + offset]
        return keys

    def log_probabilities(self, stream: np.ndarray, positions: np.ndarray, history: np.ndarray, order: int) -> np.ndarray:
        """ln P(stream[p] | up to order - 1 characters before p) for each of `positions`, using no more than
        `history` characters before each (where its text starts for the model being matched)."""
        if not 1 <= order <= self.max_order:
            raise ConfigError(f"order {order} is outside the model's 1..{self.max_order}.")
        targets = stream[positions].astype(np.int64)
        lower = np.full(len(positions), 1.0 / self.vocab_size)  # order 0: uniform
        contexts = np.zeros(len(positions), dtype=np.int64)
        chosen = np.zeros(len(positions))
        usable = np.minimum(history, order - 1)  # context length each position may use
        for length in range(order):  # context length 0 .. order - 1
            if length:
                contexts = contexts + stream[np.maximum(positions - length, 0)].astype(np.int64) * self.vocab_size ** (length - 1)
            top = self.raw[length + 1].interpolate(contexts, targets, lower, self.vocab_size)
            chosen = np.where(usable == length, top, chosen)  # the highest order this position may use: raw counts
            if length + 1 < order:
                lower = self.continuation[length + 1].interpolate(contexts, targets, lower, self.vocab_size)
        return np.log(chosen)


def kneser_ney_ngram(raw_dir: Path, data: SplitTensorDataModule, orders: list[int]) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Count n-grams of the training stream, choose the order with the lowest validation loss (nats per character,
    each character predicted from the validation stream before it), and score every test chunk row as the language
    model does: the characters it predicts, each from its row's text since the row's start."""
    if not orders or min(orders) < 1:
        raise ConfigError(f"task.baselines.orders must be n-gram lengths of at least 1, got {orders}.")
    data.setup()
    stream = {split: data.chunks[split].stream.numpy().astype(np.int64) for split in SPLITS}
    model = KneserNey(stream["train"], len(data.vocabulary), max(orders))
    val_positions = np.arange(1, len(stream["val"]))
    val_loss = {n: float(-model.log_probabilities(stream["val"], val_positions, val_positions, n).mean()) for n in orders}
    order = min(orders, key=lambda n: (val_loss[n], n))
    # The characters the test loader's chunk rows ask for, each from its row's text since the row's start.
    chunks, n_chunks = data.chunks["test"], len(data.test_dataloader())
    positions, history, unit = chunks.predicted(n_chunks)
    nats = -model.log_probabilities(stream["test"], positions, history, order)
    characters = np.bincount(unit, minlength=n_chunks * chunks.rows)
    units = data.test_units()
    outputs = units.assign(loss=np.bincount(unit, weights=nats) / characters, characters=characters)
    metrics = {
        "test_loss": float(nats.mean()),
        "test_bpc": float(nats.mean() / np.log(2)),
        "val_loss": val_loss[order],
        "order": order,
        **{f"val_loss_order{n}": loss for n, loss in val_loss.items()},
    }
    return outputs, metrics


def training_prior(raw_dir: Path, data: SplitTensorDataModule) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The best guess that ignores the inputs, learnt from the training targets: the memory tasks' bar (a network
    that does not beat it remembered nothing). Adding problem: the mean training sum for every sequence (squared
    error per sequence). Copy task: at each recalled position its most frequent training symbol, scored with the
    training frequencies as probabilities (cross-entropy per symbol), one row per sequence and position."""
    data.setup()
    train, test = (data.datasets[split].tensors[1].numpy() for split in ("train", "test"))
    units = data.test_units()
    if train.ndim == 1:  # sums
        prediction = np.full(len(test), float(train.mean()))
        squared = (prediction - test) ** 2
        outputs = units.assign(target=test, prediction=prediction, loss=squared)
        return outputs, {"test_mse": float(squared.mean()), "test_loss": float(squared.mean())}
    alphabet, length = data.head_dims["alphabet"], test.shape[1]
    frequencies = np.stack([np.bincount(train[:, step], minlength=alphabet) for step in range(length)]) / len(train)  # [length, alphabet]
    guess = frequencies.argmax(axis=1)
    steps = np.tile(np.arange(length), len(test))
    target = test.reshape(-1)
    outputs = pd.DataFrame(
        {
            "unit": units["unit"].repeat(length).to_numpy(),
            "group": units["group"].repeat(length).to_numpy(),
            "horizon": steps + 1,  # the recalled position, from 1 as in a network's outputs
            "target": target,
            "prediction": guess[steps],
            "loss": -np.log(frequencies[steps, target].clip(1e-12)),
        }
    )
    correct = guess[None, :] == test
    metrics = {"test_acc": float(correct.mean()), "test_seq_acc": float(correct.all(axis=1).mean())}
    return outputs, metrics | {"test_loss": float(outputs["loss"].mean())}


def statistical_forecasts(
    raw_dir: Path, data: SplitTensorDataModule, seasonal_periods: list[int], arima: dict[str, Any]
) -> dict[str, tuple[pd.DataFrame, dict[str, Any]]]:
    """Each statistical forecaster's test outputs (one row per forecast origin and step ahead, as a network's) and
    metrics in the series' units (MASE over the series' scale, as the networks'), on the test origins the networks
    are tested on (task.data.limit_test keeps the oldest); the fitted models' settings go with their metrics."""
    data.setup()
    test = data.datasets["test"]
    inputs = baseline_inputs(raw_dir, data.processed_dir)
    inputs["origins"] = inputs["origins"][: len(test)]
    forecasts, fitted = baseline_forecasts(**inputs, seasonal_periods=seasonal_periods, arima=arima)
    targets = test.tensors[1].numpy().astype(np.float64)  # the networks' targets, float32 as they read them
    expected = target_windows(inputs["target"], inputs["origins"], inputs["horizon"])
    if targets.shape != expected.shape or not np.allclose(targets, expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max()):
        raise DataError(f"{data.processed_dir} does not match the fetched series: rerun the preprocess stage (`dvc repro`).")
    units, horizon = data.test_units(), inputs["horizon"]
    rows = pd.DataFrame(
        {
            "unit": units["unit"].repeat(horizon).to_numpy(),
            "group": units["group"].repeat(horizon).to_numpy(),
            "horizon": np.tile(np.arange(1, horizon + 1), len(units)),
            "target": targets.reshape(-1),
        }
    )
    results = {}
    for name, values in forecasts.items():
        errors = values - targets
        mae = float(np.abs(errors).mean())
        metrics = {"test_mae": mae, "test_rmse": float(np.sqrt((errors**2).mean())), "test_mase": mae / data.metadata["mase_scale"]}
        results[name] = rows.assign(prediction=values.reshape(-1)), metrics | ({"fitted": fitted[name]} if name in fitted else {})
    return results


Outputs = dict[str, tuple[pd.DataFrame, dict[str, Any]]]  # per baseline: its test outputs and metrics


def _one(name: str, fit: Callable[..., tuple[pd.DataFrame, dict[str, Any]]]) -> Callable[..., Outputs]:
    """A task's single baseline, named, as BASELINES' fits return them (name -> outputs and metrics)."""
    return lambda *args, **settings: {name: fit(*args, **settings)}


# Per task, what its baseline stage fits: (raw folder, data module, **task.baselines) -> {name: (outputs, metrics)}.
BASELINES: dict[str, Callable[..., Outputs]] = {
    "sentiment": _one("tfidf_logreg", tfidf_logistic_regression),
    "textgen": _one("kn_ngram", kneser_ney_ngram),
    "speech": _one("mel_logreg", mel_statistics_logistic_regression),
    "memory_adding": _one("train_prior", training_prior),
    "memory_copy": _one("train_prior", training_prior),
    "forecast": statistical_forecasts,
    "forecast_stock": statistical_forecasts,
    "forecast_electricity": statistical_forecasts,
}


def run(cfg: DictConfig) -> dict[str, dict[str, Any]]:
    """Fit the task's baselines and write each one's metrics and per-example test outputs, all or none."""
    if cfg.task.name not in BASELINES or "baselines" not in cfg.task:
        raise ConfigError(
            f"task {cfg.task.name} has no baseline (tasks with one: {', '.join(BASELINES)}); a new task's baseline is a "
            "function in rnnlab.baselines.BASELINES and its settings the task config's `baselines:` (docs/development.md)."
        )
    settings = OmegaConf.to_container(cfg.task.baselines, resolve=True)
    results = BASELINES[cfg.task.name](Path(cfg.paths.raw), instantiate(cfg.task.data), **settings)
    out = Path(cfg.paths.baselines_dir)
    with contextlib.ExitStack() as stack:
        for name, (outputs, metrics) in results.items():
            outputs.to_csv(stack.enter_context(io.atomic_path(out / f"{name}_predictions.csv")), index=False, float_format="%.6g")
            stack.enter_context(io.atomic_path(out / f"{name}.json")).write_text(io.json_text(metrics))
    # Written last, and what compare reads: a baseline dropped from the settings since an earlier run is not listed.
    io.write_json(out / MANIFEST, {"task": cfg.task.name, "baselines": list(results)})
    for name, (_, metrics) in results.items():
        shown = {key: f"{value:.4g}" for key, value in metrics.items() if isinstance(value, float)}
        summary(f"baseline {name} on {cfg.task.name}", {**shown, "written": out})
    return {name: metrics for name, (_, metrics) in results.items()}


@hydra_entry(config_name="baselines")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
