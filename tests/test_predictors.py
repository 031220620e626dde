"""Serving predictors of the speech and forecast tasks: the inputs they build from raw files equal what
preprocess built for training, their outputs are the network's on those inputs, and bad input is refused."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from helpers import fit_one_batch, isolated_outputs, write_tone
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PyFuncModel
from mlflow.utils.proto_json_utils import dataframe_from_parsed_json
from omegaconf import DictConfig
from scipy.io import wavfile
from test_forecast import TINY as TINY_FORECAST
from test_forecast import fetch_and_preprocess, make_forecaster, make_series, tiny_run, write_csv
from test_memory import adding_regressor, make_data, sequence_copier
from test_speech import make_speech_classifier

from rnnlab.data.forecast import read_series_csv, series_frequency
from rnnlab.data.memory import adding_inputs
from rnnlab.errors import DataError
from rnnlab.predictors.forecast import SeriesPredictor, periods_between
from rnnlab.predictors.memory import AddingPredictor, CopyPredictor
from rnnlab.predictors.speech import ClipPredictor
from rnnlab.serving import predictor_for, register_champion
from rnnlab.training import train

# --- speech --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_predictor(speech_dirs: tuple[Path, Path], compose_cfg: Callable[..., DictConfig]) -> ClipPredictor:
    """The predictor the speech task config names, built as register_champion builds it."""
    predictor = predictor_for(compose_cfg("task=speech", f"paths.processed={speech_dirs[1]}"))
    assert isinstance(predictor, ClipPredictor)
    return predictor


def test_clip_features_equal_the_preprocessed_test_features(speech_dirs: tuple[Path, Path], clip_predictor: ClipPredictor) -> None:
    raw, processed = speech_dirs
    files = json.loads((processed / "splits.json").read_text())["test"]
    features, notes = clip_predictor.features(pd.DataFrame({"path": [str(raw / "wav" / f) for f in files]}))
    expected = torch.load(processed / "test.pt", weights_only=True)["features"]
    assert features.shape == expected.shape == (len(files), 51, 40)
    assert torch.equal(features, expected)  # the same samples, the same transform: the same numbers
    one, _ = clip_predictor.features(pd.DataFrame({"path": [str(raw / "wav" / files[-1])]}))
    assert torch.equal(one[0], expected[-1])  # a clip alone gets the features it got in its batch
    assert notes == [""] * len(files)  # fetch wrote 16 kHz mono one-second clips: nothing to convert


def test_clip_predictions_are_the_nets_most_likely_classes(speech_dirs: tuple[Path, Path], clip_predictor: ClipPredictor) -> None:
    raw, processed = speech_dirs
    torch.manual_seed(0)
    model = make_speech_classifier()
    train = torch.load(processed / "train.pt", weights_only=True)
    fit_one_batch(model, train["features"], train["labels"], steps=20)  # confident, distinct predictions
    files = json.loads((processed / "splits.json").read_text())["test"]
    frame = pd.DataFrame({"path": [str(raw / "wav" / f) for f in files]})
    predicted = clip_predictor.predict(model.net, frame, {})
    with torch.no_grad():
        probabilities = torch.softmax(model.net.eval()(torch.load(processed / "test.pt", weights_only=True)["features"]), dim=-1)
    names = ["yes", "no", "unknown", "silence"]
    assert list(predicted.columns) == ["path", "label", "probability", "top3", "note"]
    assert predicted["path"].tolist() == frame["path"].tolist()
    assert predicted["label"].tolist() == [names[i] for i in probabilities.argmax(-1)]
    assert predicted["probability"].to_numpy() == pytest.approx(probabilities.max(-1).values.numpy(), abs=1e-5)
    best = probabilities[0].argsort(descending=True)[:3]
    assert predicted["top3"].iloc[0] == ", ".join(f"{names[i]} {probabilities[0, i]:.3f}" for i in best)


def test_other_rates_channels_and_lengths_are_converted_as_fetch_does(clip_predictor: ClipPredictor, tmp_path: Path) -> None:
    write_tone(tmp_path / "plain.wav")
    write_tone(tmp_path / "odd.wav", rate=44100, seconds=2.5, channels=2)
    features, notes = clip_predictor.features(pd.DataFrame({"path": [str(tmp_path / "plain.wav"), str(tmp_path / "odd.wav")]}))
    assert notes == ["", "downmixed from 2 channels to mono and resampled from 44100 Hz to 16000 Hz; cut to its first second of 2.50 s"]
    # The same tone, resampled: nearly the same features as the 16 kHz original.
    assert (features[0] - features[1]).abs().mean() < 0.1 * features[0].abs().mean()


def test_bad_clips_are_refused_naming_the_file_and_the_fix(clip_predictor: ClipPredictor, tmp_path: Path) -> None:
    net = make_speech_classifier().net
    (tmp_path / "notes.txt").write_text("not audio")
    wavfile.write(tmp_path / "empty.wav", 16000, np.zeros(0, dtype=np.int16))
    fix = r"give a PCM WAV file of one spoken word .*ffmpeg"
    cases = [
        (str(tmp_path / "absent.wav"), rf"absent\.wav does not exist; {fix}"),
        (str(tmp_path), r"is a folder, not a WAV file"),
        (str(tmp_path / "notes.txt"), rf"notes\.txt is not a readable WAV file .* Fix: {fix}"),
        (str(tmp_path / "empty.wav"), rf"empty\.wav holds no samples\. Fix: {fix}"),
        ("  ", r"row 0 of column 'path' is .*whitespace"),
        (None, r"row 0 of column 'path' is None \(NoneType\), not text"),
    ]
    for path, message in cases:
        with pytest.raises(DataError, match=message):
            clip_predictor.predict(net, pd.DataFrame({"path": [path]}), {})
    with pytest.raises(DataError, match=r"the input lacks the column\(s\) \['path'\] \(it has \['file'\]\)"):
        clip_predictor.predict(net, pd.DataFrame({"file": ["a.wav"]}), {})
    assert ClipPredictor.read_input("clip.wav").to_dict("list") == {"path": ["clip.wav"]}


def test_clip_predictor_needs_the_preprocessed_metadata(compose_cfg: Callable[..., DictConfig], tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"metadata\.json is missing: run `dvc repro preprocess@speech`"):
        predictor_for(compose_cfg("task=speech", f"paths.processed={tmp_path}"))


# --- forecast ------------------------------------------------------------------------------


SETTINGS = {
    # the target and a covariate, standard scaling, one Fourier pair of the weekly season
    "standard": {"covariates": ["lead"]},
    "last_value": {"normalize": "last_value", "fourier_terms": 0},
}


@pytest.fixture(scope="module", params=sorted(SETTINGS))
def forecast_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame, dict]:
    """(processed directory, the raw series, the preprocess settings) of the tiny daily series of test_forecast.py."""
    frame = make_series()
    settings = {**TINY_FORECAST, **SETTINGS[request.param]}
    processed = fetch_and_preprocess(tmp_path_factory.mktemp(f"forecast_{request.param}"), frame, **SETTINGS[request.param])
    return processed, read_series_csv(processed.parent / "raw" / "series.csv"), settings


def series_predictor(compose_cfg: Callable[..., DictConfig], processed: Path, *overrides: str) -> SeriesPredictor:
    predictor = predictor_for(compose_cfg("task=forecast", f"paths.processed={processed}", *overrides))
    assert isinstance(predictor, SeriesPredictor)
    return predictor


def test_preprocess_saves_what_the_predictor_needs(forecast_run: tuple[Path, pd.DataFrame, dict]) -> None:
    processed, series, settings = forecast_run
    metadata = json.loads((processed / "metadata.json").read_text())
    scaler = json.loads((processed / "scaler.json").read_text())
    assert metadata["frequency"] == "D" and metadata["first_date"] == "2021-01-01 00:00:00"
    columns = ["value", *settings.get("covariates", [])]
    train = series[columns].to_numpy()[:112]
    assert scaler["centers"] == (pytest.approx(train.mean(axis=0).tolist()) if settings.get("normalize") != "last_value" else None)


def test_series_inputs_equal_the_preprocessed_test_windows(
    forecast_run: tuple[Path, pd.DataFrame, dict], compose_cfg: Callable[..., DictConfig]
) -> None:
    processed, series, _settings = forecast_run
    predictor = series_predictor(compose_cfg, processed)
    test = torch.load(processed / "test.pt", weights_only=True)
    origins = np.arange(136, 160 - 3 + 1)  # the test windows' origins (rows 136-159 are the test split)
    for index, origin in enumerate(origins):
        # More rows than the lookback, starting anywhere: the Fourier phase comes from the dates, not the row number.
        rows = series.iloc[origin - 8 - index % 3 : origin]
        inputs, _ = predictor.inputs(rows)
        assert torch.equal(inputs[0], test["inputs"][index]), f"window {index}"


def test_series_forecasts_are_the_nets_outputs_in_the_series_units(
    forecast_run: tuple[Path, pd.DataFrame, dict], compose_cfg: Callable[..., DictConfig]
) -> None:
    processed, series, _settings = forecast_run
    metadata = json.loads((processed / "metadata.json").read_text())
    predictor = series_predictor(compose_cfg, processed)
    torch.manual_seed(0)
    net = make_forecaster(front_end={"_target_": "rnnlab.models.front_ends.DenseFeatures", "num_features": metadata["num_features"]}).net
    test = torch.load(processed / "test.pt", weights_only=True)
    with torch.no_grad():
        expected = test["offsets"][:, None].double() + metadata["target_scale"] * net.eval()(test["inputs"]).double()
    for index in (0, 5, len(expected) - 1):
        forecast = predictor.predict(net, series.iloc[: 136 + index], {})
        assert list(forecast.columns) == ["step", "date", "forecast"] and forecast["step"].tolist() == [1, 2, 3]
        assert forecast["forecast"].to_numpy() == pytest.approx(expected[index].numpy(), abs=1e-4)
        # The dates continue the daily series: those of the window's targets.
        assert forecast["date"].to_numpy().astype("datetime64[ns]").astype(np.int64).tolist() == test["target_times"][index].tolist()


def test_describe_names_the_target_and_the_last_date(
    forecast_run: tuple[Path, pd.DataFrame, dict], compose_cfg: Callable[..., DictConfig]
) -> None:
    processed, series, _ = forecast_run
    predictor = series_predictor(compose_cfg, processed)
    inputs = series.iloc[:50]
    forecast = predictor.predict(make_forecaster(front_end=front_end(processed)).net, inputs, {})
    text = predictor.describe(inputs, forecast)
    assert text.splitlines()[0] == "value, 3 steps after 2021-02-19 (from the last 8 rows):"
    assert text.splitlines()[1].split() == ["step", "date", "value"]
    assert text.splitlines()[2].split() == ["1", "2021-02-20", f"{forecast['forecast'].iloc[0]:.6g}"]


def front_end(processed: Path) -> dict:
    num_features = json.loads((processed / "metadata.json").read_text())["num_features"]
    return {"_target_": "rnnlab.models.front_ends.DenseFeatures", "num_features": num_features}


def test_bad_series_inputs_are_refused_with_the_fix(
    forecast_run: tuple[Path, pd.DataFrame, dict], compose_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    processed, series, _settings = forecast_run
    predictor = series_predictor(compose_cfg, processed)
    net = make_forecaster(front_end=front_end(processed)).net
    recent = series.iloc[100:120].reset_index(drop=True)

    def refused(frame: pd.DataFrame, message: str) -> None:
        with pytest.raises(DataError, match=message):
            predictor.predict(net, frame, {})

    refused(recent.iloc[:5], r"the input has 5 row\(s\); the model reads the last 8 \(task.preprocess.lookback\), so give at least 8")
    refused(recent.drop(columns="value"), r"the input lacks the column\(s\) \['value'\] .*at least 8 rows")
    gap = recent.drop(index=15)
    refused(gap, r"the dates are not evenly spaced: 2021-04-25 00:00:00 is followed by 2021-04-27 00:00:00, expected 2021-04-26")
    recent.loc[0, "value"] = np.nan  # before the last 8 rows: not read, no error
    assert len(predictor.predict(net, recent, {})) == 3
    recent.loc[16, "value"] = np.nan
    refused(recent, r"column 'value' has a missing \(NaN\) value at line 18 \(2021-04-27.*fix or fill it in")
    recent.loc[16, "value"] = np.inf
    refused(recent, r"column 'value' has an infinite value at line 18")
    recent = recent.astype({"value": object})
    recent.loc[16, "value"] = "warm"
    refused(recent, r"line 18 \(2021-04-27 00:00:00\): column 'value' has the non-numeric value 'warm'")
    with pytest.raises(DataError, match=r"recent\.csv has no column 'date' .*the model reads the recent rows of the series"):
        SeriesPredictor.read_input(str(write_csv(series.rename(columns={"date": "day"}), tmp_path / "recent.csv")))
    with pytest.raises(DataError, match=r"absent\.csv does not exist"):
        SeriesPredictor.read_input(str(tmp_path / "absent.csv"))
    (tmp_path / "recent_rows").mkdir()
    with pytest.raises(DataError, match=r"recent_rows is a folder, not a CSV file; give a CSV"):
        SeriesPredictor.read_input(str(tmp_path / "recent_rows"))


def test_a_model_trained_with_forward_fill_fills_its_input(
    forecast_run: tuple[Path, pd.DataFrame, dict], compose_cfg: Callable[..., DictConfig]
) -> None:
    processed, series, _ = forecast_run
    predictor = series_predictor(compose_cfg, processed, "task.preprocess.fill_missing=forward_fill")
    net = make_forecaster(front_end=front_end(processed)).net
    recent = series.iloc[100:120].reset_index(drop=True)
    filled = recent.copy()
    filled.loc[16, "value"] = filled.loc[15, "value"]
    recent.loc[16, "value"] = np.nan
    pd.testing.assert_frame_equal(predictor.predict(net, recent, {}), predictor.predict(net, filled, {}))


def test_string_dates_and_values_as_a_json_request_sends_them(
    forecast_run: tuple[Path, pd.DataFrame, dict], compose_cfg: Callable[..., DictConfig]
) -> None:
    processed, series, _ = forecast_run
    predictor = series_predictor(compose_cfg, processed)
    net = make_forecaster(front_end=front_end(processed)).net
    as_text = series.iloc[100:120].astype(str)
    pd.testing.assert_frame_equal(predictor.predict(net, as_text, {}), predictor.predict(net, series.iloc[100:120], {}))


def trading_days(n: int = 200) -> pd.DataFrame:
    """A weekday-only price series with holidays missing, like MSFT's daily close."""
    days = pd.bdate_range("2021-01-04", periods=n + 4)
    days = days.drop([days[20], days[61], days[100], days[150]])  # holidays
    rng = np.random.default_rng(0)
    return pd.DataFrame({"date": days, "value": 100 + np.cumsum(rng.normal(0, 1, len(days)))})


def test_trading_days_continue_on_weekdays(tmp_path: Path, compose_cfg: Callable[..., DictConfig]) -> None:
    frame = trading_days()
    processed = fetch_and_preprocess(tmp_path, frame, normalize="last_value", fourier_terms=0, season=1)
    assert json.loads((processed / "metadata.json").read_text())["frequency"] == "B"
    predictor = series_predictor(compose_cfg, processed)
    net = make_forecaster(front_end=front_end(processed)).net
    gaps = frame["date"].diff().dt.days.to_numpy()
    fridays = np.flatnonzero(frame["date"].dt.day_of_week == 4)
    # A Friday whose last 8 rows skip a holiday (a gap other than one day, or Friday to Monday).
    friday = next(int(f) for f in fridays if set(gaps[f - 6 : f + 1]) - {1, 3})
    forecast = predictor.predict(net, frame.iloc[: friday + 1], {})  # the window holds a holiday gap: fine
    assert [f"{d:%a}" for d in forecast["date"]] == ["Mon", "Tue", "Wed"]
    weekend = frame.iloc[: friday + 1].copy()
    weekend.loc[friday, "date"] += pd.Timedelta(days=1)
    with pytest.raises(DataError, match=r"a row on Saturday .*weekdays only"):
        predictor.predict(net, weekend, {})
    # The window's last value is what the network's changes are added to.
    test = torch.load(processed / "test.pt", weights_only=True)
    first_test = json.loads((processed / "splits.json").read_text())["test"]["rows"][0]
    inputs, _ = predictor.inputs(frame.iloc[:first_test])
    assert torch.equal(inputs[0], test["inputs"][0])


def test_fourier_terms_of_a_series_with_gaps_cannot_be_placed(tmp_path: Path, compose_cfg: Callable[..., DictConfig]) -> None:
    frame = trading_days()
    processed = fetch_and_preprocess(tmp_path, frame, fourier_terms=1, season=5)
    predictor = series_predictor(compose_cfg, processed)
    assert predictor.input_example() is None  # no dates would place it: no signature rather than a failing example
    with pytest.raises(DataError, match=r"training series had gaps \(frequency B\).*task.preprocess.fourier_terms=0"):
        predictor.inputs(frame.iloc[:50])


def test_processed_data_of_an_older_preprocess_is_refused(
    forecast_run: tuple[Path, pd.DataFrame, dict], compose_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    processed, _, _ = forecast_run
    old = tmp_path / "processed"
    old.mkdir()
    scaler = json.loads((processed / "scaler.json").read_text())
    del scaler["centers"]
    (old / "scaler.json").write_text(json.dumps(scaler))
    (old / "metadata.json").write_text((processed / "metadata.json").read_text())
    with pytest.raises(DataError, match=r"scaler\.json has no \['centers'\]: it was written by an older preprocess; run `dvc repro"):
        series_predictor(compose_cfg, old)
    with pytest.raises(DataError, match=r"metadata\.json is missing: run `dvc repro preprocess@forecast`"):
        series_predictor(compose_cfg, tmp_path / "nothing")


def test_series_frequency_and_steps_between_dates() -> None:
    assert series_frequency(pd.Series(pd.date_range("2000-06-05", periods=10, freq="30min"))) == "30min"
    assert series_frequency(pd.Series(pd.date_range("2020-01-01", periods=10, freq="MS"))) == "MS"
    assert series_frequency(trading_days()["date"]) == "B"
    assert series_frequency(pd.Series(pd.to_datetime(["2020-01-01", "2020-01-02", "2020-01-04 12:00"], format="ISO8601"))) is None
    start = pd.Timestamp("2020-01-01")
    assert periods_between(start, pd.Timestamp("2020-01-11"), "D") == 10
    assert periods_between(start, pd.Timestamp("2019-12-31 23:00"), "30min") == -2
    assert periods_between(start, pd.Timestamp("2020-01-01 00:10"), "30min") is None
    assert periods_between(start, pd.Timestamp("2020-05-01"), "MS") == 4
    assert periods_between(start, pd.Timestamp("2020-05-02"), "MS") is None


def test_fourier_phase_needs_dates_on_the_training_grid(
    forecast_run: tuple[Path, pd.DataFrame, dict], compose_cfg: Callable[..., DictConfig]
) -> None:
    processed, series, settings = forecast_run
    predictor = series_predictor(compose_cfg, processed)
    shifted = series.iloc[100:120].copy()
    shifted["date"] += pd.Timedelta(hours=6)
    if settings["fourier_terms"]:
        with pytest.raises(
            DataError, match=r"the input: 2021-04-23 06:00:00 is not a whole number of D steps after .* 2021-01-01 00:00:00"
        ):
            predictor.inputs(shifted)
    else:  # no Fourier terms: the dates only need to be evenly spaced
        assert predictor.inputs(shifted)[0].shape == (1, 8, 1)


# --- memory ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def memory_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The processed folders of tiny adding and copy data (lags 4 and 9; the copy task's 3 symbols of 5)."""
    return {problem: make_data(tmp_path_factory.mktemp(problem), problem) for problem in ("adding", "copy")}


def memory_predictor(compose_cfg: Callable[..., DictConfig], processed: Path, task: str) -> AddingPredictor | CopyPredictor:
    return predictor_for(compose_cfg(f"task={task}", "task.data.lag=9", f"paths.processed={processed}"))


def step_rows(values: torch.Tensor, positions: torch.Tensor, **columns: object) -> pd.DataFrame:
    markers = np.zeros(len(values), dtype=np.int64)
    markers[positions.numpy()] = 1
    return pd.DataFrame({**columns, "value": values.double().numpy(), "marker": markers})


def test_adding_predictions_are_the_nets_on_the_preprocessed_sequences(
    memory_dirs: dict[str, Path], compose_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    processed = memory_dirs["adding"]
    predictor = memory_predictor(compose_cfg, processed, "memory_adding")
    assert isinstance(predictor, AddingPredictor) and predictor.state == {"lag": 9, "tolerance": 0.04}
    test = torch.load(processed / "lag9" / "test.pt", weights_only=True)
    torch.manual_seed(0)
    net = adding_regressor().net.eval()
    frame = pd.concat([step_rows(test["values"][i], test["positions"][i], sequence=f"s{i}") for i in range(3)])
    predicted = predictor.predict(net, frame, {})
    with torch.no_grad():
        expected = net(adding_inputs(test["values"][:3], test["positions"][:3]))[:, 0]
    assert list(predicted.columns) == ["sequence", "steps", "prediction", "target", "error", "within_tolerance"]
    assert predicted["sequence"].tolist() == ["s0", "s1", "s2"] and predicted["steps"].tolist() == [9, 9, 9]
    assert predicted["prediction"].to_numpy() == pytest.approx(expected.numpy(), abs=1e-6)
    assert predicted["target"].to_numpy() == pytest.approx(test["targets"][:3].numpy(), abs=1e-6)
    assert predicted["within_tolerance"].tolist() == (predicted["error"].abs() < 0.04).tolist()
    # rnnlab-predict's input: a CSV of one sequence, one row per step.
    path = tmp_path / "sequence.csv"
    step_rows(test["values"][0], test["positions"][0]).to_csv(path, index=False)
    alone = predictor.predict(net, AddingPredictor.read_input(str(path)), {})
    assert alone["prediction"].iloc[0] == pytest.approx(expected[0].item(), abs=1e-6)
    assert "sum of the marked values" in predictor.describe(frame, predicted)
    assert len(predictor.predict(net, predictor.input_example(), {})) == 1


def test_bad_adding_sequences_are_refused_naming_the_row(memory_dirs: dict[str, Path], compose_cfg: Callable[..., DictConfig]) -> None:
    predictor = memory_predictor(compose_cfg, memory_dirs["adding"], "memory_adding")
    net = adding_regressor().net.eval()

    def rows(values: list[object], markers: list[object], **columns: list[object]) -> pd.DataFrame:
        return pd.DataFrame({**columns, "value": values, "marker": markers})

    fix = "give one row per step with a value in [0, 1] and a marker of 0 or 1, exactly two markers per sequence"
    cases = [
        (rows([0.1, 0.2, 0.3], [1, 1, 1]), "the input has 3 marker(s) of 1 in 3 steps, not 2; " + fix),
        (rows([0.1, 0.2, 0.3], [1, 0, 0]), "the input has 1 marker(s) of 1 in 3 steps, not 2"),
        (rows([0.1, 1.5, 0.3], [1, 0, 1]), "the input: row 1 has the value 1.5, outside [0, 1] where the model was trained"),
        (rows([0.1, 0.2, 0.3], [1, 2, 1]), "the input: row 1 has the marker 2, not 0 or 1"),
        (rows([0.1, "abc", 0.3], [1, 0, 1]), "the input: row 1 of column 'value' is 'abc', not a finite number"),
        (rows([0.1, float("nan"), 0.3], [1, 0, 1]), "the input: row 1 of column 'value' is nan, not a finite number"),
        (rows([0.1, 0.2, 0.3, 0.4], [1, 1, 0, 1], sequence=["a", "a", "b", "b"]), "sequence 'b' has 1 marker(s) of 1 in 2 steps"),
        (rows([], []), "the input has no rows"),
        (pd.DataFrame({"value": [0.5]}), "the input lacks the column(s) ['marker'] (it has ['value'])"),
    ]
    for frame, message in cases:
        with pytest.raises(DataError) as refused:
            predictor.predict(net, frame, {})
        assert message in str(refused.value)
    with pytest.raises(DataError, match=r"absent.csv is not a CSV file; give one row per step"):
        AddingPredictor.read_input("absent.csv")


def test_copy_predictions_recall_from_the_sequence_preprocess_builds(
    memory_dirs: dict[str, Path], compose_cfg: Callable[..., DictConfig]
) -> None:
    processed = memory_dirs["copy"]
    predictor = memory_predictor(compose_cfg, processed, "memory_copy")
    assert isinstance(predictor, CopyPredictor) and predictor.state == {"lag": 9, "length": 3, "alphabet": 5}
    test = torch.load(processed / "lag9" / "test.pt", weights_only=True)
    torch.manual_seed(0)
    copier = sequence_copier(alphabet=5, length=3).net.eval()
    seen = []

    def net(tokens: torch.Tensor) -> torch.Tensor:
        seen.append(tokens)
        return copier(tokens)

    symbols = [" ".join(map(str, row)) for row in (test["targets"][:4] + 1).tolist()]
    predicted = predictor.predict(net, pd.DataFrame({"symbols": symbols}), {})
    assert torch.equal(seen[0], test["tokens"][:4].long())  # the sequences preprocess made for these symbols at lag 9
    with torch.no_grad():
        recalled = copier(test["tokens"][:4].long()).argmax(dim=-1) + 1
    assert predicted["symbols"].tolist() == symbols
    assert predicted["copy"].tolist() == [" ".join(map(str, row)) for row in recalled.tolist()]
    assert predicted["correct"].tolist() == (recalled == test["targets"][:4] + 1).sum(dim=1).tolist()
    assert CopyPredictor.read_input("3,1 4").to_dict("list") == {"symbols": ["3,1 4"]}
    assert len(predictor.predict(net, predictor.input_example(), {})) == 1
    assert predictor.describe(pd.DataFrame(), predicted).startswith("recalled after a lag of 9 steps:")


@pytest.mark.parametrize("symbols", ["1 2", "1 2 3 4", "1 2 6", "0 1 2", "a b c", "1.5 2 3"])
def test_bad_symbols_to_copy_are_refused(symbols: str, memory_dirs: dict[str, Path], compose_cfg: Callable[..., DictConfig]) -> None:
    predictor = memory_predictor(compose_cfg, memory_dirs["copy"], "memory_copy")
    expected = f"row 0 of column 'symbols' is {symbols!r}; the model copies text of 3 whole numbers from 1 to 5, e.g. '1 2 3'"
    with pytest.raises(DataError) as refused:
        predictor.predict(sequence_copier(alphabet=5).net, pd.DataFrame({"symbols": [symbols]}), {})
    assert str(refused.value) == expected + "."


# --- end to end: a trained run, registered as the champion, loaded as an MLflow pyfunc ------------


def champion(cfg: DictConfig) -> tuple[PyFuncModel, torch.nn.Module]:
    """Register the one run in cfg's store as the champion of its registered model; (the pyfunc, the run's own network)."""
    client = MlflowClient(cfg.tracking.uri)
    (run,) = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    version = register_champion(client, run.info.run_id, cfg.tracking.registered_model, "champion")
    assert client.get_model_version_by_alias(cfg.tracking.registered_model, "champion").version == version.version
    mlflow.set_tracking_uri(cfg.tracking.uri)
    net = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model", map_location="cpu").eval()
    return mlflow.pyfunc.load_model(f"models:/{cfg.tracking.registered_model}@champion"), net


def rnnlab_predict(cfg: DictConfig, *args: str) -> subprocess.CompletedProcess:
    """`rnnlab-predict <task> <args> --model <model> --tracking-uri <cfg's store>`, the console script installed beside this Python."""
    script = Path(sys.executable).with_name("rnnlab-predict")
    assert script.is_file(), f"the rnnlab-predict console script is not installed at {script}"
    command = [str(script), cfg.task.name, *args, "--model", cfg.model.name, "--tracking-uri", cfg.tracking.uri]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_forecast_champion_answers_recent_rows(compose_cfg: Callable[..., DictConfig], tmp_path: Path) -> None:
    processed = fetch_and_preprocess(tmp_path / "data", make_series(), covariates=["lead"])
    cfg = tiny_run(compose_cfg, processed, tmp_path / "run")
    train(cfg)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        served, net = champion(cfg)
    # The forecast's integer `step` column would make MLflow hint about missing values once per column and call.
    assert not [w for w in caught if "integer column" in str(w.message)]
    series = read_series_csv(processed.parent / "raw" / "series.csv")
    recent = series.iloc[120:150]
    expected = series_predictor(compose_cfg, processed).predict(net, recent, {})
    pd.testing.assert_frame_equal(served.predict(recent), expected)
    pd.testing.assert_frame_equal(served.predict(recent.assign(other=1.0)), expected)  # columns the model does not read are ignored
    # A JSON request, parsed as `mlflow models serve` parses it (dates as ISO text, cast by the signature): the same answer.
    request = json.loads(recent.to_json(orient="split", date_format="iso", index=False))
    parsed = dataframe_from_parsed_json(request, "split", schema=served.metadata.get_input_schema())
    pd.testing.assert_frame_equal(served.predict(parsed), expected)
    with pytest.raises(MlflowException, match=r"the input has 4 row\(s\); the model reads the last 8"):
        served.predict(recent.iloc[:4])
    # The command reads a CSV of recent rows and prints what the predictor describes.
    result = rnnlab_predict(cfg, str(write_csv(recent, tmp_path / "recent.csv")))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == served.unwrap_python_model().predictor.describe(recent, expected)
    assert "rnnlab-forecast-rnn v2" in result.stderr  # v1 is the run's bare network, v2 its serving model
    result = rnnlab_predict(cfg, str(write_csv(recent.iloc[:4], tmp_path / "short.csv")))
    assert result.returncode == 2 and "the input has 4 row(s); the model reads the last 8" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_speech_champion_answers_a_wav_file(speech_dirs: tuple[Path, Path], compose_cfg: Callable[..., DictConfig], tmp_path: Path) -> None:
    raw, processed = speech_dirs
    cfg = compose_cfg(
        "task=speech",
        "profile=smoke",
        "model=gru",
        "model.encoder.hidden_size=8",
        "callbacks.progress_bar=null",
        f"paths.root={processed.parent}",
        f"paths.processed={processed}",
        *isolated_outputs(tmp_path),
    )
    train(cfg)
    served, net = champion(cfg)
    files = json.loads((processed / "splits.json").read_text())["test"]
    clips = pd.DataFrame({"path": [str(raw / "wav" / f) for f in files]})
    expected = ClipPredictor.from_config(cfg).predict(net, clips, {})
    pd.testing.assert_frame_equal(served.predict(clips), expected)
    with torch.no_grad():
        probabilities = torch.softmax(net(torch.load(processed / "test.pt", weights_only=True)["features"]), dim=-1)
    assert served.predict(clips)["probability"].to_numpy() == pytest.approx(probabilities.max(-1).values.numpy(), abs=1e-5)
    with pytest.raises(MlflowException, match=r"absent\.wav does not exist"):
        served.predict(pd.DataFrame({"path": [str(tmp_path / "absent.wav")]}))
    result = rnnlab_predict(cfg, clips["path"].iloc[0])
    assert result.returncode == 0, result.stderr[-3000:]
    label, probability = expected["label"].iloc[0], expected["probability"].iloc[0]
    assert result.stdout.startswith(f"{clips['path'].iloc[0]}: {label} ({probability:.1%})  top 3: {expected['top3'].iloc[0]}")
    (tmp_path / "notes.txt").write_text("not audio")
    result = rnnlab_predict(cfg, str(tmp_path / "notes.txt"))
    assert result.returncode == 2 and "notes.txt is not a readable WAV file" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_memory_champions_answer_a_csv_of_steps_and_symbols_to_copy(
    memory_dirs: dict[str, Path], compose_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    adding, copy = (
        compose_cfg(
            f"task={task}",
            "profile=smoke",
            "model=gru",
            "task.data.lag=9",
            "callbacks.progress_bar=null",
            f"paths.processed={memory_dirs[problem]}",
            *isolated_outputs(tmp_path / problem),
        )
        for task, problem in (("memory_adding", "adding"), ("memory_copy", "copy"))
    )
    train(adding)
    served, net = champion(adding)
    test = torch.load(memory_dirs["adding"] / "lag9" / "test.pt", weights_only=True)
    steps = step_rows(test["values"][0], test["positions"][0])
    expected = AddingPredictor.from_config(adding).predict(net, steps, {})
    pd.testing.assert_frame_equal(served.predict(steps), expected)
    steps.to_csv(tmp_path / "sequence.csv", index=False)
    result = rnnlab_predict(adding, str(tmp_path / "sequence.csv"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"predicted {expected['prediction'].iloc[0]:.4f}, sum of the marked values {expected['target'].iloc[0]:.4f}" in result.stdout
    steps.assign(marker=0).to_csv(tmp_path / "unmarked.csv", index=False)
    result = rnnlab_predict(adding, str(tmp_path / "unmarked.csv"))
    assert (
        result.returncode == 2 and "the input has 0 marker(s) of 1 in 9 steps, not 2" in result.stderr and "Traceback" not in result.stderr
    )
    train(copy)
    champion(copy)
    result = rnnlab_predict(copy, "3 1 4")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("recalled after a lag of 9 steps:\n3 1 4 -> ")
    result = rnnlab_predict(copy, "3 1 9")
    assert result.returncode == 2 and "the model copies text of 3 whole numbers from 1 to 5" in result.stderr
