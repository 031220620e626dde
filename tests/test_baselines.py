"""The baseline stages: TF-IDF + logistic regression (sentiment), Kneser-Ney character n-grams (textgen), log-mel
statistics + logistic regression (speech), the training prior (memory tasks) and the statistical forecasters (forecast
tasks), each on the networks' splits and test units."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import run_main
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig
from sklearn.metrics import accuracy_score, log_loss
from test_forecast import fetch_and_preprocess, make_series
from test_memory import make_data
from test_textgen import archive, textgen_overrides, textgen_root  # noqa: F401 (the textgen fixtures)

from rnnlab.baselines import main as baselines_main
from rnnlab.baselines import run, written_baselines
from rnnlab.baselines.forecast import persistence_forecasts, seasonal_naive_forecasts
from rnnlab.baselines.textgen import KneserNey
from rnnlab.config import config_dir
from rnnlab.data.forecast import ForecastDataModule
from rnnlab.data.sentiment import SentimentDataModule
from rnnlab.data.speech import SpeechDataModule
from rnnlab.data.textgen import TextStreamDataModule
from rnnlab.errors import ConfigError, DataError
from rnnlab.inference import unit_scores


def compose_baselines(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="baselines", overrides=list(overrides))


def assert_c_is_the_best_on_validation(overrides: list[str], name: str, metrics: dict, tmp_path: Path) -> dict[float, float]:
    """The chosen C is the one whose model, fitted alone (a grid of that C only), is the most accurate on validation,
    the smallest C among equals, and the reported val_acc is that model's."""
    val_acc = {}
    for c in compose_baselines(*overrides).task.baselines.c_grid:
        alone = [*overrides, f"task.baselines.c_grid=[{c}]", f"paths.baselines_dir={tmp_path / f'C{c}'}"]
        val_acc[c] = run(compose_baselines(*alone))[name]["val_acc"]
    best = max(val_acc, key=lambda c: (val_acc[c], -c))
    assert (metrics["C"], metrics["val_acc"]) == (best, val_acc[best])
    return val_acc


def test_tfidf_baseline_scores_the_networks_test_reviews(sentiment_root: Path, tmp_path: Path) -> None:
    overrides = [f"paths.root={sentiment_root}", "task.data.limit_test=20"]
    cfg = compose_baselines(*overrides, f"paths.baselines_dir={tmp_path}")
    metrics = run(cfg)["tfidf_logreg"]
    predictions = pd.read_csv(tmp_path / "tfidf_logreg_predictions.csv")
    assert json.loads((tmp_path / "tfidf_logreg.json").read_text()) == metrics
    assert json.loads((tmp_path / "baselines.json").read_text()) == {"task": "sentiment", "baselines": ["tfidf_logreg"]}
    # The same test reviews, in the same order, as a network's test loader reads them.
    data = SentimentDataModule(sentiment_root / "data" / "processed" / "sentiment", limit_test=20)
    data.setup()
    pd.testing.assert_frame_equal(predictions[["unit", "group"]], data.test_units())
    assert predictions["target"].tolist() == data.datasets["test"].tensors[1].tolist()
    assert list(predictions.columns) == ["unit", "group", "target", "prediction", "score", "loss"]
    assert metrics["test_acc"] == pytest.approx((predictions["prediction"] == predictions["target"]).mean())
    assert metrics["test_acc"] >= 0.9  # three sentiment words per synthetic review: an easy bar
    assert metrics["C"] in cfg.task.baselines.c_grid and metrics["features"] > 0
    assert ((predictions["score"] > 0.5) == predictions["prediction"]).all()
    # scikit-learn's own measures of the written predictions.
    assert metrics["test_acc"] == pytest.approx(accuracy_score(predictions["target"], predictions["prediction"]))
    assert metrics["test_loss"] == pytest.approx(log_loss(predictions["target"], predictions["score"], labels=[0, 1]), rel=1e-5)
    # The fixture's reviews separate at every C of the grid: all tie on validation, so the smallest C must win.
    assert set(assert_c_is_the_best_on_validation(overrides, "tfidf_logreg", metrics, tmp_path).values()) == {1.0}
    assert metrics["C"] == min(cfg.task.baselines.c_grid)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("task.baselines=null", r"task sentiment has no baseline: its config needs `baselines:`"),
        ("task.baselines._target_=rnnlab.baselines.nosuch.fit", r"task.baselines._target_='rnnlab.baselines.nosuch.fit' is not a function"),
        ("+task.baselines.c_gird=[1]", r"task.baselines.c_gird is not a setting of .*tfidf_logistic_regression; its settings are c_grid"),
        (
            "~task.baselines.c_grid",
            r"task.baselines.c_grid is missing: .*tfidf_logistic_regression needs c_grid; set it in conf/task/sentiment",
        ),
    ],
)
def test_a_bad_baseline_setting_is_one_line_before_anything_is_fitted(
    sentiment_root: Path, tmp_path: Path, override: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        run(compose_baselines(f"paths.root={sentiment_root}", override, f"paths.baselines_dir={tmp_path}"))
    assert not list(tmp_path.iterdir())


def test_a_task_without_a_baseline_stage_is_a_clear_error(sentiment_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match=r"task sentiment has no baseline: its config needs `baselines:` with the `_target_` function"):
        run(compose_baselines(f"paths.root={sentiment_root}", "~task.baselines", f"paths.baselines_dir={tmp_path}"))
    result = run_main(baselines_main, f"paths.root={tmp_path}", run_dir=tmp_path / "hydra", capsys=capsys)
    assert result.returncode == 2 and "splits.json is missing: run `dvc repro preprocess@sentiment`" in result.stderr
    assert not list(tmp_path.glob("metrics/**/*.csv"))


# --- textgen: interpolated Kneser-Ney character n-grams ------------------------------------------------------

A, B, C, D = range(4)  # a 4-character vocabulary; "d" never occurs in training


def probability(model: KneserNey, context: list[int], target: int, order: int, history: int | None = None) -> float:
    stream = np.array([*context, target], dtype=np.int64)
    position = np.array([len(context)])
    usable = np.array([len(context) if history is None else history])
    return float(np.exp(model.log_probabilities(stream, position, usable, order))[0])


def test_kneser_ney_gives_the_hand_computed_probabilities() -> None:
    # Training text "abcab". Bigrams ab x2, bc, ca: counts of counts n1 = 2, n2 = 1, so D2 = 2 / (2 + 2) = 0.5.
    # Continuation unigrams (distinct predecessors): a, b, c once each, so D1 = 3 / 3 = 1 and P_cont is uniform, 1/4.
    # Raw unigrams a2 b2 c1 (the order-1 model): n1 = 1, n2 = 2, D = 1 / 5.
    model = KneserNey(np.array([A, B, C, A, B]), vocab_size=4, max_order=2)
    assert probability(model, [A], B, order=2) == pytest.approx((2 - 0.5) / 2 + 0.5 * 1 / 2 * 1 / 4)  # 0.8125
    assert probability(model, [A], C, order=2) == pytest.approx(0.5 * 1 / 2 * 1 / 4)  # unseen after a: 0.0625
    assert probability(model, [D], A, order=2) == pytest.approx(1 / 4)  # unseen context: the lower order alone
    # No history allowed (the start of a row): the order-1 model, raw unigram counts over a uniform floor.
    assert probability(model, [A], B, order=2, history=0) == pytest.approx((2 - 0.2) / 5 + 0.2 * 3 / 5 * 1 / 4)  # 0.39
    assert probability(model, [A], D, order=1) == pytest.approx(0.2 * 3 / 5 * 1 / 4)


def test_kneser_ney_distributions_sum_to_one_for_every_context_and_order() -> None:
    rng = np.random.default_rng(0)
    train = rng.choice(4, size=400, p=[0.5, 0.3, 0.15, 0.05])  # id 4 of a 5-character vocabulary never occurs
    model = KneserNey(train, vocab_size=5, max_order=4)
    contexts = [list(train[10:13]), list(train[200:203]), [4, 4, 4], [0, 4, 1], [3, 3, 3]]
    for context in contexts:
        for order in range(1, 5):
            for history in range(4):
                total = sum(probability(model, context, target, order, history) for target in range(5))
                assert total == pytest.approx(1.0), (context, order, history)


def reference_probability(train: list[int], vocab_size: int, order: int, context: list[int], target: int) -> float:
    """Interpolated Kneser-Ney by its textbook recursion, one probability at a time with Counters: raw counts at the
    highest order the context allows, continuation counts below, a uniform floor, D = n1 / (n1 + 2 n2) per table."""
    grams = {n: Counter(tuple(train[i : i + n]) for i in range(len(train) - n + 1)) for n in range(1, order + 1)}
    continuation = {n: Counter(gram[1:] for gram in grams[n + 1]) for n in range(1, order)}

    def discount(counts: Counter) -> float:
        n1, n2 = sum(c == 1 for c in counts.values()), sum(c == 2 for c in counts.values())
        return n1 / (n1 + 2 * n2) if n1 + 2 * n2 else 0.5

    def probability(history: tuple[int, ...] | None, highest: bool) -> float:
        if history is None:
            return 1 / vocab_size
        counts = grams[len(history) + 1] if highest else continuation[len(history) + 1]
        lower = probability(history[1:] if history else None, highest=False)
        following = {gram: count for gram, count in counts.items() if gram[:-1] == history}
        total = sum(following.values())
        if not total:
            return lower
        d = discount(counts)
        return (max(following.get((*history, target), 0) - d, 0) + d * len(following) * lower) / total

    used = min(len(context), order - 1)
    return probability(tuple(context[len(context) - used :]), highest=True)


def test_kneser_ney_agrees_with_the_textbook_recursion_on_random_text() -> None:
    rng = np.random.default_rng(1)
    # Skewed, with repeats: continuation counts differ from raw counts at every order.
    train = rng.choice(5, size=300, p=[0.4, 0.3, 0.15, 0.1, 0.05]).tolist()
    model = KneserNey(np.array(train), vocab_size=6, max_order=4)  # id 5 never occurs
    for _ in range(60):
        context = rng.choice(6, size=int(rng.integers(0, 5))).tolist()
        target, order = int(rng.integers(6)), int(rng.integers(1, 5))
        expected = reference_probability(train, 6, order, context, target)
        assert probability(model, context, target, order) == pytest.approx(expected, rel=1e-12), (context, target, order)


def test_one_pass_over_the_orders_gives_each_order_the_textbook_probabilities() -> None:
    rng = np.random.default_rng(5)
    train = rng.choice(5, size=300, p=[0.4, 0.3, 0.15, 0.1, 0.05]).tolist()
    model = KneserNey(np.array(train), vocab_size=6, max_order=4)
    stream, positions = rng.choice(6, size=40), np.arange(1, 40)
    history = np.minimum(positions, rng.integers(0, 5, len(positions)))  # rows that start mid-stream see less context
    by_order = model.log_probabilities_by_order(stream, positions, history, 4)
    assert list(by_order) == [1, 2, 3, 4]
    for order in range(1, 5):
        for i, position in enumerate(positions):
            context = stream[position - history[i] : position].tolist()
            expected = reference_probability(train, 6, order, context, int(stream[position]))
            assert np.exp(by_order[order][i]) == pytest.approx(expected, rel=1e-12), (order, position, history[i])


def test_an_order_that_does_not_fit_an_int64_key_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"task.baselines.orders: order 12 with 100 characters does not fit .*from 1 to 9"):
        KneserNey(np.arange(50), vocab_size=100, max_order=12)


def test_ngram_baseline_scores_the_language_models_test_chunk_rows(textgen_root: Path, archive: Path, tmp_path: Path) -> None:  # noqa: F811
    overrides = [o for o in textgen_overrides(textgen_root, archive) if not o.startswith("task.fetch")]
    data_overrides = ["task.data.batch_size=4", "task.data.seq_len=10"]
    cfg = compose_baselines(*overrides, *data_overrides, f"paths.baselines_dir={tmp_path}", "task.baselines.orders=[1,2,3,4]")
    metrics = run(cfg)["kn_ngram"]
    predictions = pd.read_csv(tmp_path / "kn_ngram_predictions.csv")
    assert json.loads((tmp_path / "kn_ngram.json").read_text()) == metrics
    data = TextStreamDataModule(textgen_root / "data" / "processed" / "textgen", batch_size=4, seq_len=10)
    data.setup()
    pd.testing.assert_frame_equal(predictions[["unit", "group"]], data.test_units())
    # Each row predicts what the language model's test chunk row predicts: one character per input but the first.
    lengths = [len(row) - 1 for chunk in data.test_dataloader() for row in chunk]
    assert predictions["characters"].tolist() == lengths
    assert np.average(predictions["loss"], weights=predictions["characters"]) == pytest.approx(metrics["test_loss"])
    assert metrics["order"] in (1, 2, 3, 4) and metrics["val_loss"] == min(metrics[f"val_loss_order{n}"] for n in (1, 2, 3, 4))
    assert metrics["test_loss"] < np.log(len(data.vocabulary))  # better than guessing uniformly
    # Row 1 of chunk 0 (unit 1): its first 10 characters after the row's start, each from the row's text before it.
    streams = {split: data.chunks[split].stream.numpy() for split in ("train", "test")}
    model = KneserNey(streams["train"], len(data.vocabulary), 4)
    start = int(data.chunks["test"].row_starts()[1])
    history = np.arange(1, 11)
    nats = -model.log_probabilities(streams["test"], start + history, history, metrics["order"])
    assert predictions.loc[1, "loss"] == pytest.approx(nats.mean(), rel=1e-5) and predictions.loc[1, "characters"] == 10
    assert metrics["test_bpc"] == pytest.approx(metrics["test_loss"] / np.log(2))


# --- speech: log-mel statistics + logistic regression ----------------------------------------------------------


def test_mel_statistics_baseline_scores_the_networks_test_clips(speech_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    _, processed_dir = speech_dirs
    overrides = ["task=speech", f"paths.processed={processed_dir}"]
    cfg = compose_baselines(*overrides, f"paths.baselines_dir={tmp_path}")
    metrics = run(cfg)["mel_logreg"]
    predictions = pd.read_csv(tmp_path / "mel_logreg_predictions.csv", keep_default_na=False)
    data = SpeechDataModule(str(processed_dir))
    data.setup()
    pd.testing.assert_frame_equal(predictions[["unit", "group"]], data.test_units())
    assert predictions["target"].tolist() == data.datasets["test"].tensors[1].tolist()
    assert metrics["test_acc"] == pytest.approx((predictions["prediction"] == predictions["target"]).mean())
    assert metrics["test_loss"] == pytest.approx(predictions["loss"].mean(), rel=1e-5)  # the CSV keeps 6 digits
    num_classes = data.head_dims["num_classes"]
    assert predictions["score"].between(1 / num_classes, 1).all()  # the predicted class's probability
    assert metrics["C"] in cfg.task.baselines.c_grid and metrics["features"] == 5 * data.metadata["num_features"]
    val_acc = assert_c_is_the_best_on_validation(overrides, "mel_logreg", metrics, tmp_path)
    assert len(set(val_acc.values())) > 1  # the Cs differ on validation here: the choice is by accuracy, not the tie rule


def test_unknown_mel_statistics_are_refused(speech_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    _, processed_dir = speech_dirs
    cfg = compose_baselines(
        "task=speech", f"paths.processed={processed_dir}", f"paths.baselines_dir={tmp_path}", "task.baselines.statistics=[mean,median]"
    )
    with pytest.raises(ConfigError, match=r"task.baselines.statistics \['mean', 'median'\] is invalid; choose one or more of"):
        run(cfg)
    assert not list(tmp_path.iterdir())


# --- memory tasks: the best guess that ignores the inputs --------------------------------------------------------


@pytest.mark.parametrize("problem", ["adding", "copy"])
def test_the_memory_baseline_is_the_training_targets_best_blind_guess(problem: str, tmp_path: Path) -> None:
    processed = make_data(tmp_path / "data", problem)
    task = f"memory_{problem}"
    cfg = compose_baselines(f"task={task}", f"paths.processed={processed}", f"paths.baselines_dir={tmp_path}", "task.data.lag=4")
    metrics = run(cfg)["train_prior"]
    predictions = pd.read_csv(tmp_path / "train_prior_predictions.csv")
    data = instantiate(cfg.task.data)
    data.setup()
    train, test = (data.datasets[split].tensors[1].numpy() for split in ("train", "test"))
    scored = unit_scores(predictions, cfg.task.primary_metric)  # as compare scores it against the networks
    if problem == "adding":
        assert list(predictions.columns) == ["unit", "group", "target", "prediction", "loss"]
        assert predictions["prediction"].to_numpy() == pytest.approx(np.full(len(test), train.mean()), rel=1e-5)
        assert metrics["test_mse"] == pytest.approx(((train.mean() - test) ** 2).mean(), rel=1e-5) == scored["score"].mean()
    else:
        assert list(predictions.columns) == ["unit", "group", "horizon", "target", "prediction", "loss"]
        length = test.shape[1]
        assert predictions["horizon"].tolist() == list(range(1, length + 1)) * len(test)
        assert predictions["target"].tolist() == test.reshape(-1).tolist()
        for step in range(length):  # each position's guess is its most frequent training symbol
            counts = Counter(train[:, step].tolist())
            guessed = set(predictions.loc[predictions["horizon"] == step + 1, "prediction"])
            assert guessed == {min(counts, key=lambda symbol: (-counts[symbol], symbol))}
            frequency = counts[test[0, step]] / len(train)
            assert predictions.loc[step, "loss"] == pytest.approx(-np.log(max(frequency, 1e-12)), rel=1e-5)
        assert metrics["test_acc"] == pytest.approx(scored["score"].mean())
        correct = (predictions["prediction"] == predictions["target"]).to_numpy().reshape(len(test), length)
        assert metrics["test_seq_acc"] == pytest.approx(correct.all(axis=1).mean())
    pd.testing.assert_frame_equal(scored[["unit", "group"]].drop_duplicates().reset_index(drop=True), data.test_units())


# --- forecast tasks: the statistical forecasters -----------------------------------------------------------------

# A fixed ARIMA order: the forecasters are fitted and written without auto-ARIMA's search.
FORECAST_SETTINGS = ("task.baselines.seasonal_periods=[7]", "task.baselines.arima.order=[1,0,0]", "task.baselines.arima.trend=c")


def forecast_overrides(root: Path, out: Path, *more: str) -> list[str]:
    return ["task=forecast", f"paths.raw={root / 'raw'}", f"paths.processed={root / 'processed'}", f"paths.baselines_dir={out}", *more]


@pytest.fixture(scope="module")
def forecast_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("forecast")
    fetch_and_preprocess(root, make_series())
    return root


def test_forecast_baselines_score_the_networks_test_windows(forecast_root: Path, tmp_path: Path) -> None:
    results = run(compose_baselines(*forecast_overrides(forecast_root, tmp_path, *FORECAST_SETTINGS, "task.data.limit_test=10")))
    names = ["persistence", "seasonal_naive_7", "naive2", "arima", "ets"]
    assert list(results) == names == written_baselines(tmp_path)
    data = ForecastDataModule(forecast_root / "processed", limit_test=10)
    data.setup()
    targets = data.datasets["test"].tensors[1].numpy()
    series = pd.read_csv(forecast_root / "raw" / "series.csv")["value"].to_numpy()
    origins = np.arange(136, 136 + 10)  # the oldest 10 test origins, as the networks' limited test loader
    expected = {"persistence": persistence_forecasts(series, origins, 3)}
    expected["seasonal_naive_7"] = seasonal_naive_forecasts(series, origins, 3, 7)
    for name in names:
        predictions = pd.read_csv(tmp_path / f"{name}_predictions.csv")
        assert list(predictions.columns) == ["unit", "group", "horizon", "target", "prediction"]
        # One row per test origin and step ahead, the units and groups of a network's test outputs.
        pd.testing.assert_frame_equal(predictions[["unit", "group"]].drop_duplicates(ignore_index=True), data.test_units())
        assert predictions["horizon"].tolist() == [1, 2, 3] * 10
        assert predictions["target"].to_numpy() == pytest.approx(targets.ravel(), rel=1e-5)  # 6 significant digits
        metrics = json.loads((tmp_path / f"{name}.json").read_text())
        # The CSV keeps 6 significant digits: values near 20 to +-5e-5 each.
        mae = (predictions["prediction"] - predictions["target"]).abs().mean()
        assert metrics["test_mae"] == pytest.approx(mae, abs=1e-4)
        assert metrics["test_mase"] == pytest.approx(metrics["test_mae"] / data.metadata["mase_scale"], rel=1e-12)
        if name in expected:
            assert predictions["prediction"].to_numpy() == pytest.approx(expected[name].ravel(), rel=1e-5)
        scored = unit_scores(predictions, "test_mase", data.metadata["mase_scale"])  # as compare scores it beside the networks
        assert scored["score"].mean() == pytest.approx(mae / data.metadata["mase_scale"], rel=1e-12)
    assert results["arima"]["fitted"]["order"] == [1, 0, 0] and "fitted" not in results["persistence"]


def test_a_dropped_forecaster_leaves_the_list_compare_reads(forecast_root: Path, tmp_path: Path) -> None:
    run(compose_baselines(*forecast_overrides(forecast_root, tmp_path, *FORECAST_SETTINGS)))
    run(compose_baselines(*forecast_overrides(forecast_root, tmp_path, *FORECAST_SETTINGS[1:], "task.baselines.seasonal_periods=[]")))
    # The earlier run's seasonal naive stays on disk (a run deletes nothing), but is no longer listed.
    assert (tmp_path / "seasonal_naive_7_predictions.csv").is_file()
    assert written_baselines(tmp_path) == ["persistence", "naive2", "arima", "ets"]
    (tmp_path / "baselines.json").write_text("{")
    with pytest.raises(DataError, match=r"baselines.json is unreadable .*: rerun the task's baseline stage"):
        written_baselines(tmp_path)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("task.baselines.seasonal_periods=[1]", r"task.baselines.seasonal_periods must be periods > 1 \(1 is persistence\)"),
        ("task.baselines.arima.order=[1,0]", r"task.baselines.arima.order must be auto or \[p, d, q\]"),
    ],
)
def test_bad_forecast_baseline_settings_are_refused_before_anything_is_written(
    forecast_root: Path, tmp_path: Path, setting: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        run(compose_baselines(*forecast_overrides(forecast_root, tmp_path / "out", *FORECAST_SETTINGS, setting)))
    assert not (tmp_path / "out").exists()


def test_forecast_baselines_refuse_processed_data_of_another_series(forecast_root: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    fetch_and_preprocess(other, make_series(seed=1))  # as many rows, other values: the targets do not match
    overrides = forecast_overrides(forecast_root, tmp_path / "out", *FORECAST_SETTINGS)
    cfg = compose_baselines(*overrides, f"paths.processed={other / 'processed'}")
    with pytest.raises(DataError, match="does not match the fetched series: rerun the preprocess stage"):
        run(cfg)
    assert not (tmp_path / "out").exists()
