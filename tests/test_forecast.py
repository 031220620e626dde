"""Forecasting: sources, chronological split, train-only scaling, windows, metrics, baselines, model and bad input."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest.mock import ANY

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import isolated_outputs, quiet_trainer
from hydra.utils import instantiate
from omegaconf import DictConfig
from statsmodels.tsa.arima.model import ARIMA

from rnnlab.baselines.forecast import arima_forecasts, persistence_forecasts, seasonal_naive_forecasts
from rnnlab.data.forecast import (
    ForecastDataModule,
    baseline_inputs,
    fetch,
    fourier_features,
    input_windows,
    preprocess,
    read_series_csv,
    seasonal_naive_scale,
    target_windows,
    window_origins,
)
from rnnlab.errors import ConfigError, DataError
from rnnlab.models.forecaster import Forecaster, forecast_metrics
from rnnlab.training import build, train

TINY = {
    "lookback": 8,
    "horizon": 3,
    "season": 7,
    "fourier_terms": 1,
    "m4_period": 7,
}


def make_series(n: int = 160, seed: int = 0) -> pd.DataFrame:
    """A daily series with a weekly cycle and noise, and a covariate that leads it by a day."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    value = 20 + 5 * np.sin(2 * np.pi * t / 7) + rng.normal(0, 0.5, n)
    return pd.DataFrame({"date": pd.date_range("2021-01-01", periods=n, freq="D"), "value": value, "lead": np.roll(value, -1)})


def write_csv(frame: pd.DataFrame, path: Path) -> Path:
    frame.to_csv(path, index=False)
    return path


def fetch_and_preprocess(root: Path, frame: pd.DataFrame, **options) -> Path:
    """Fetch `frame` as a user CSV and preprocess it with the tiny settings; return the processed directory."""
    root.mkdir(parents=True, exist_ok=True)
    fetch(str(root / "raw"), source="csv", csv_path=str(write_csv(frame, root / "mine.csv")))
    preprocess(str(root / "raw"), str(root / "processed"), target="value", **{**TINY, **options})
    return root / "processed"


@pytest.fixture(scope="module")
def processed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fetch_and_preprocess(tmp_path_factory.mktemp("forecast"), make_series())


def load(processed_dir: Path, split: str) -> dict[str, torch.Tensor]:
    return torch.load(processed_dir / f"{split}.pt", weights_only=True)


# --- fetch, preprocess, split, scaling, windows ---------------------------------------------


@pytest.mark.parametrize(
    ("source", "columns", "rows"),
    [("seattle_weather", ["temp_max", "temp_min"], 1461), ("msft", ["Close"], 7983), ("electricity", ["demand"], 4032)],
)
def test_fetch_reads_the_packaged_series(tmp_path: Path, source: str, columns: list[str], rows: int) -> None:
    fetch(str(tmp_path), source=source)
    frame = read_series_csv(tmp_path / "series.csv")
    assert len(frame) == rows and set(columns) <= set(frame.columns)
    assert frame["date"].is_monotonic_increasing and not frame.isna().any().any()
    assert json.loads((tmp_path / "source.json").read_text())["source"] == source


def test_preprocess_writes_windows_and_metadata(processed: Path) -> None:
    meta = json.loads((processed / "metadata.json").read_text())
    assert meta["num_features"] == 1 + 2  # the target plus one sin/cos pair
    assert meta["fill_missing"] == "error" and "baselines" not in meta  # the baselines are the baseline stage's
    # 160 rows: 112 train, 24 val, 24 test; train windows start after the lookback, all end inside their split.
    assert meta["sizes"] == {"train": 112 - 8 - 3 + 1, "val": 24 - 3 + 1, "test": 24 - 3 + 1}
    test = load(processed, "test")
    n = meta["sizes"]["test"]
    assert test["inputs"].shape == (n, 8, 3) and test["targets"].shape == (n, 3)
    assert set(test) == {"inputs", "targets", "offsets", "target_times"}
    assert load(processed, "train")["inputs"].shape == (meta["sizes"]["train"], 8, 3)


def test_split_is_chronological(processed: Path) -> None:
    times = {split: load(processed, split)["target_times"] for split in ("train", "val", "test")}
    assert times["train"].max() < times["val"].min() and times["val"].max() < times["test"].min()
    for split_times in times.values():  # windows in time order, consecutive targets inside a window
        assert (split_times[1:, 0] > split_times[:-1, 0]).all() and (split_times[:, 1:] > split_times[:, :-1]).all()
    splits = json.loads((processed / "splits.json").read_text())
    assert splits["train"]["rows"] == [0, 112] and splits["val"]["rows"] == [112, 136] and splits["test"]["rows"] == [136, 160]


def test_scaling_is_fitted_on_train_only(tmp_path: Path) -> None:
    frame = make_series()
    shifted = frame.copy()
    shifted.loc[112:, "value"] += 1000  # change only val and test
    first = fetch_and_preprocess(tmp_path / "a", frame)
    second = fetch_and_preprocess(tmp_path / "b", shifted)
    train_values = frame["value"].to_numpy()[:112]
    meta = json.loads((first / "metadata.json").read_text())
    assert meta["target_scale"] == pytest.approx(train_values.std())
    history = frame["value"].to_numpy()[:136]  # MASE's scale: the error at lag m4_period on train + val (M4's in-sample)
    assert meta["mase_scale"] == pytest.approx(np.abs(history[7:] - history[:-7]).mean())
    recent = json.loads((fetch_and_preprocess(tmp_path / "c", frame, mase_history=30, m4_period=1) / "metadata.json").read_text())
    assert recent["mase_scale"] == pytest.approx(np.abs(np.diff(history[-30:])).mean())  # the last 30 rows before test, lag 1
    assert json.loads((second / "metadata.json").read_text())["target_scale"] == pytest.approx(meta["target_scale"])
    expected = (train_values[:8] - train_values.mean()) / train_values.std()
    assert load(first, "train")["inputs"][0, :, 0].numpy() == pytest.approx(expected, abs=1e-5)
    assert torch.equal(load(first, "train")["inputs"], load(second, "train")["inputs"])
    # Val and test windows use the train mean and std, so the shift shows in their inputs.
    assert load(second, "test")["inputs"][:, :, 0].mean() > load(first, "test")["inputs"][:, :, 0].mean() + 100
    # Targets are relative to each window's last value (the network forecasts changes), whatever the input scaling.
    assert load(first, "train")["offsets"][:3].numpy() == pytest.approx(frame["value"].to_numpy()[7:10], abs=1e-4)


def test_last_value_normalisation_is_relative_to_each_window(tmp_path: Path) -> None:
    frame = make_series()
    out = fetch_and_preprocess(tmp_path, frame, normalize="last_value")
    values = frame["value"].to_numpy()
    train = load(out, "train")
    step_scale = np.diff(values[:112]).std()
    assert train["offsets"][0].item() == pytest.approx(values[7], abs=1e-4)
    assert train["inputs"][0, :, 0].numpy() == pytest.approx((values[:8] - values[7]) / step_scale, abs=1e-5)
    assert train["inputs"][:, -1, 0].abs().max() == 0


def test_windows_and_origins() -> None:
    values = np.arange(20.0).reshape(10, 2)  # column 0: 0, 2, 4, ...
    origins = window_origins(0, 10, lookback=3, horizon=2, split="train")
    assert origins.tolist() == [3, 4, 5, 6, 7, 8]
    inputs = input_windows(values, origins, 3)
    assert inputs.shape == (6, 3, 2) and inputs[0].tolist() == [[0, 1], [2, 3], [4, 5]]
    assert target_windows(values[:, 0], origins, 2)[[0, -1]].tolist() == [[6, 8], [16, 18]]
    # Val and test windows may read inputs from before their split, never targets from after it.
    assert window_origins(6, 10, lookback=3, horizon=2, split="val").tolist() == [6, 7, 8]
    assert fourier_features(4, season=4, terms=1) == pytest.approx(np.array([[0, 1], [1, 0], [0, -1], [-1, 0]]), abs=1e-12)


def test_datamodule_batches_and_dims(processed: Path) -> None:
    dm = ForecastDataModule(processed, batch_size=4, limit_test=5)
    dm.setup()
    inputs, targets, offsets = next(iter(dm.train_dataloader()))
    assert inputs.shape == (4, 8, 3) and targets.shape == (4, 3) and offsets.shape == (4,)
    test_batch = next(iter(dm.test_dataloader()))
    assert [t.shape for t in test_batch[3:]] == [(4, 3)]  # the target dates
    assert len(dm.datasets["test"]) == 5
    assert dm.front_end_dims == {"num_features": 3}
    assert dm.head_dims["horizon"] == 3 and dm.head_dims["series"] == "csv: value"


# --- metrics and baselines -----------------------------------------------------------------


def test_metrics_match_hand_computed_values() -> None:
    metrics = forecast_metrics(mase_scale=2.0)
    # absolute errors 1, 0, 2, 1; squared 1, 0, 4, 1
    metrics.update(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[2.0, 2.0], [1.0, 5.0]]))
    result = {k: v.item() for k, v in metrics.compute().items()}
    assert result == pytest.approx({"mae": 1.0, "rmse": math.sqrt(1.5), "mase": 0.5})
    # seasonal differences with season 2: |2-1|, |6-3|, |4-2|
    assert seasonal_naive_scale(np.array([1.0, 3, 2, 6, 4]), season=2) == pytest.approx(2.0)
    assert seasonal_naive_scale(np.array([1.0, 3, 2, 6, 4]), season=1) == pytest.approx((2 + 1 + 4 + 2) / 4)


def test_naive_baselines_on_a_toy_series() -> None:
    series = np.arange(10.0, 20.0)
    origins = np.array([6, 8])
    assert persistence_forecasts(series, origins, 3).tolist() == [[15, 15, 15], [17, 17, 17]]
    # season 2, horizon 3: one season back for steps 1-2, two seasons back for step 3
    assert seasonal_naive_forecasts(series, origins, 3, season=2).tolist() == [[14, 15, 14], [16, 17, 16]]
    with pytest.raises(DataError, match="history"):
        seasonal_naive_forecasts(series, np.array([2]), 3, season=4)


@pytest.mark.parametrize("with_exog", [False, True])
def test_arima_forecasts_equal_statsmodels_from_each_origin(with_exog: bool) -> None:
    rng = np.random.default_rng(1)
    n, train_end, horizon = 120, 90, 4
    noise = rng.normal(size=n)
    series = np.zeros(n)
    for t in range(1, n):
        series[t] = 0.7 * series[t - 1] + noise[t]
    exog = fourier_features(n, season=12, terms=1) if with_exog else None
    series = series + (0 if exog is None else 3 * exog[:, 0])
    origins = np.arange(train_end, n - horizon + 1)
    forecasts, info = arima_forecasts(series, exog, train_end, origins, horizon, order=[1, 0, 1], trend="c")
    assert forecasts.shape == (len(origins), horizon) and info["converged"]

    def exog_rows(rows: slice) -> np.ndarray | None:
        return None if exog is None else exog[rows]

    fitted = ARIMA(series[:train_end], exog=exog_rows(slice(train_end)), order=(1, 0, 1), trend="c").fit()
    for i in (0, 7, len(origins) - 1):
        o = origins[i]
        own = fitted.apply(series[:o], exog=exog_rows(slice(o))).forecast(horizon, exog=exog_rows(slice(o, o + horizon)))
        assert forecasts[i] == pytest.approx(np.asarray(own), abs=1e-8)


def test_baseline_inputs_are_the_series_and_test_windows_preprocess_cut(processed: Path) -> None:
    test = load(processed, "test")
    series = read_series_csv(processed.parent / "raw" / "series.csv")["value"].to_numpy()
    inputs = baseline_inputs(processed.parent / "raw", processed)
    assert inputs["target"] == pytest.approx(series) and inputs["exog"] == pytest.approx(fourier_features(160, 7, 1))
    assert inputs["origins"].tolist() == list(range(136, 160 - 3 + 1)) and inputs["train_end"] == 112
    assert (inputs["horizon"], inputs["m4_period"]) == (3, 7)
    assert test["targets"].numpy() == pytest.approx(target_windows(series, inputs["origins"], 3), abs=1e-4)


def test_baseline_inputs_refuse_a_series_that_is_not_the_one_preprocessed(tmp_path: Path) -> None:
    processed = fetch_and_preprocess(tmp_path, make_series(100))
    fetch(str(tmp_path / "raw"), source="csv", csv_path=str(write_csv(make_series(120), tmp_path / "longer.csv")))
    with pytest.raises(DataError, match=r"has 120 rows but .* was cut from 100: rerun preprocess"):
        baseline_inputs(tmp_path / "raw", processed)
    with pytest.raises(DataError, match=r"metadata\.json is missing: run `dvc repro preprocess@forecast_stock`"):
        baseline_inputs(tmp_path / "raw", tmp_path / "nowhere", "forecast_stock")


# --- the model -------------------------------------------------------------------------------


def make_forecaster(**overrides) -> Forecaster:
    settings = {
        "front_end": {"_target_": "rnnlab.models.front_ends.DenseFeatures", "num_features": 3},
        "encoder": {"cell": "torch.nn.GRU", "hidden_size": 32, "pooling": ["last"]},
        "optimizer": {"_target_": "torch.optim.Adam", "lr": 1e-2},
        "scheduler": None,
        "horizon": 3,
        "target_scale": 2.0,
        "mase_scale": 2.5,
    }
    return Forecaster(**{**settings, **overrides})


@pytest.fixture
def one_thread() -> Iterator[None]:
    """A tiny net gains nothing from intra-op threads, and on a busy 2-core machine they make it ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
def test_forecaster_overfits_one_batch(processed: Path) -> None:
    torch.manual_seed(0)
    train = load(processed, "train")
    inputs, targets, offsets = (train[key][:16] for key in ("inputs", "targets", "offsets"))
    module = make_forecaster(optimizer={"_target_": "torch.optim.Adam", "lr": 2e-2})
    optimizer = module.configure_optimizers()
    normalised = (targets - offsets[:, None]) / module.hparams.target_scale
    first = module.loss_fn(module(inputs), normalised).item()
    for _ in range(100):
        optimizer.zero_grad()
        loss = module.loss_fn(module(inputs), normalised)
        loss.backward()
        optimizer.step()
    assert loss.item() < first / 50
    forecasts = offsets[:, None] + module.hparams.target_scale * module(inputs)
    assert (forecasts - targets).abs().mean() < 0.1 * targets.std()  # in the series' units


def test_an_untrained_forecaster_is_persistence(processed: Path) -> None:
    test = load(processed, "test")
    module = make_forecaster()
    forecasts = test["offsets"][:, None] + module.hparams.target_scale * module(test["inputs"]).detach()
    origins = np.arange(136, 160 - 3 + 1)
    series = read_series_csv(processed.parent / "raw" / "series.csv")["value"].to_numpy()
    assert forecasts.numpy() == pytest.approx(persistence_forecasts(series, origins, 3), abs=1e-5)


def test_test_step_scores_the_model_on_the_limited_test_windows(processed: Path, tmp_path: Path) -> None:
    dm = ForecastDataModule(processed, batch_size=8, limit_test=10)
    module = make_forecaster(target_scale=json.loads((processed / "metadata.json").read_text())["target_scale"])
    result = quiet_trainer(tmp_path).test(module, datamodule=dm, verbose=False)[0]
    test = load(processed, "test")
    persistence = test["offsets"][:10, None]  # an untrained forecaster
    assert result["test_mae"] == pytest.approx((persistence - test["targets"][:10]).abs().mean().item(), rel=1e-5)
    assert {"test_mae", "test_rmse", "test_mase", "test_loss"} == {key for key in result if key.startswith("test_")}
    assert result["test_mase"] == pytest.approx(result["test_mae"] / 2.5)
    assert (tmp_path / "figures" / "forecast.png").is_file()


def test_unknown_loss_is_refused() -> None:
    with pytest.raises(ConfigError, match="loss"):
        make_forecaster(loss="mape")


def tiny_run(compose_cfg: Callable[..., DictConfig], processed: Path, tmp_path: Path) -> DictConfig:
    return compose_cfg(
        "task=forecast",
        "profile=smoke",
        "model=rnn",
        "model.encoder.hidden_size=8",
        "callbacks.progress_bar=null",
        f"paths.root={processed.parent}",
        f"paths.processed={processed}",
        *isolated_outputs(tmp_path),
    )


def test_the_task_config_builds_a_module_sized_to_the_data(compose_cfg: Callable[..., DictConfig], processed: Path, tmp_path: Path) -> None:
    datamodule, module = build(tiny_run(compose_cfg, processed, tmp_path))
    meta = json.loads((processed / "metadata.json").read_text())
    assert isinstance(datamodule, ForecastDataModule) and isinstance(module, Forecaster)
    assert module.net.head.out_features == 3 and module.net.encoder.rnn.input_size == meta["num_features"]
    assert module.hparams.mase_scale == meta["mase_scale"] and module.hparams.series == "csv: value"


@pytest.mark.slow
def test_train_writes_forecast_metrics_and_test_outputs(compose_cfg: Callable[..., DictConfig], processed: Path, tmp_path: Path) -> None:
    metrics = train(tiny_run(compose_cfg, processed, tmp_path))
    assert json.loads((tmp_path / "metrics.json").read_text()) == {**metrics, "mlflow_run_id": ANY}
    assert {"test_mae", "test_rmse", "test_mase"} <= metrics.keys() and not any(key.startswith("test_mae_") for key in metrics)
    scale = json.loads((processed / "metadata.json").read_text())["mase_scale"]
    assert metrics["test_mase"] == pytest.approx(metrics["test_mae"] / scale, rel=1e-5)
    test = load(processed, "test")
    assert (tmp_path / "plots" / "forecast.png").is_file()
    # One row per test origin and step ahead, as the baseline stage writes its forecasts: Diebold-Mariano's input.
    predictions = pd.read_csv(tmp_path / "predictions.csv")
    horizon = test["targets"].shape[1]
    assert list(predictions.columns) == ["unit", "group", "horizon", "target", "prediction"]
    assert len(predictions) == test["targets"].numel() and predictions["horizon"].tolist()[:horizon] == list(range(1, horizon + 1))
    assert predictions["group"].tolist() == [i // horizon for i in range(len(test["targets"])) for _ in range(horizon)]
    assert (predictions["prediction"] - predictions["target"]).abs().mean() == pytest.approx(metrics["test_mae"], rel=1e-4)


def test_configs_place_each_series_in_its_own_task(compose_cfg: Callable[..., DictConfig]) -> None:
    weather = compose_cfg("task=forecast", "model=gru", "paths.root=/r")
    stock = compose_cfg("task=forecast_stock", "model=gru", "paths.root=/r")
    assert weather.paths.metrics_file == "/r/metrics/forecast/gru/seed42.json"
    assert stock.paths.metrics_file == "/r/metrics/forecast_stock/gru/seed42.json"
    assert stock.task.fetch.source == "msft" and stock.task.preprocess.target == "Close"
    assert stock.task.data._target_ == weather.task.data._target_  # one data module for every series
    assert instantiate(stock.task.front_end, num_features=1).output_size == 1


# --- bad input -------------------------------------------------------------------------------


def test_missing_values_are_an_error_naming_the_row_or_filled_forward(tmp_path: Path) -> None:
    frame = make_series(60)
    frame.loc[30, "value"] = np.nan
    with pytest.raises(DataError, match=r"'value' has a missing \(NaN\) value at line 32 \(2021-01-31.*fill_missing=forward_fill"):
        fetch_and_preprocess(tmp_path / "a", frame, season=2, fourier_terms=0)
    out = fetch_and_preprocess(tmp_path / "b", frame, season=2, fourier_terms=0, fill_missing="forward_fill")
    assert json.loads((out / "metadata.json").read_text())["filled_missing"] == 1
    values = frame["value"].to_numpy()
    train = load(out, "train")
    # Filled with the value before it, never from the later value it would otherwise leak: origin 30, step 1.
    assert train["targets"][30 - 8, 0].item() == pytest.approx(values[29], abs=1e-4)
    frame.loc[0, "value"] = np.nan
    with pytest.raises(DataError, match=r"starts with a missing \(NaN\) value at line 2"):
        fetch_and_preprocess(tmp_path / "c", frame, season=2, fourier_terms=0, fill_missing="forward_fill")


def test_infinite_values_are_an_error(tmp_path: Path) -> None:
    frame = make_series(60)
    frame.loc[5, "value"] = np.inf
    with pytest.raises(DataError, match=r"'value' has an infinite value at line 7"):
        fetch_and_preprocess(tmp_path, frame, season=2, fourier_terms=0, fill_missing="forward_fill")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("date,value\n2021-01-01,1.0\n2021-01-02,2.0\n2021-01-0", r"line 4: '2021-01-0' is not a date"),
        ("date,value\n2021-01-01,1.0\n2021-01-02,abc\n", r"line 3 \(2021-01-02 00:00:00\): column 'value' has the non-numeric value 'abc'"),
        ("date,value\n2021-01-01,1.0\n2021-01-02,2.0,7\n", r"not a readable CSV"),
        ("when,value\n2021-01-01,1.0\n", r"no column 'date'"),
        ("", r"not a readable CSV"),
        ("date,value\n2021-01-01,1.0\n2021-01-01,2.0\n", r"repeated date"),
        # A row cut short that still reads as a date: not "repeated", but the row that differs from its twin.
        (
            "date,value\n" + "".join(f"2015-12-{day:02d},{day}.0\n" for day in range(1, 31)) + "2015-12-3",
            r"line 32: '2015-12-3' reads as 2015-12-03 00:00:00, the date of line 4 \('2015-12-03'\): a truncated or malformed row\?",
        ),
    ],
)
def test_malformed_or_truncated_csv_is_refused(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "mine.csv"
    path.write_text(text)
    with pytest.raises(DataError, match=message):
        fetch(str(tmp_path / "raw"), source="csv", csv_path=str(path))
    assert not (tmp_path / "raw").exists()


def test_a_csv_cut_off_inside_a_row_names_the_missing_value(tmp_path: Path) -> None:
    path = write_csv(make_series(60), tmp_path / "mine.csv")
    path.write_text(path.read_text()[: path.read_text().rindex(",")])  # the last row loses its last field
    fetch(str(tmp_path / "raw"), source="csv", csv_path=str(path))
    with pytest.raises(DataError, match=r"'lead' has a missing \(NaN\) value at line 61"):
        preprocess(str(tmp_path / "raw"), str(tmp_path / "out"), target="value", covariates=["lead"], **{**TINY, "season": 2})


def test_a_split_too_short_for_one_window_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"The val split has 9 rows, too few for one window of lookback=8 and horizon=12"):
        fetch_and_preprocess(tmp_path, make_series(60), horizon=12, season=2)
    assert not (tmp_path / "processed").exists()


def test_unknown_source_column_and_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="Unknown series source 'yahoo'"):
        fetch(str(tmp_path / "raw"), source="yahoo")
    with pytest.raises(DataError, match=r"no column\(s\) \['price'\]"):
        fetch_and_preprocess(tmp_path / "a", make_series(60), season=2, covariates=["price"])
    with pytest.raises(ConfigError, match="normalize"):
        fetch_and_preprocess(tmp_path / "b", make_series(60), season=2, normalize="minmax")
    with pytest.raises(DataError, match="not more than one season"):
        fetch_and_preprocess(tmp_path / "c", make_series(60), m4_period=365, fourier_terms=0)
    with pytest.raises(ConfigError, match="mase_history"):
        fetch_and_preprocess(tmp_path / "d", make_series(60), mase_history=5)
    assert not any((tmp_path / name / "processed").exists() for name in "cd")
