"""Time-series forecasting: fetch a series, split it chronologically, window it, and the DataModule.

Sources (no network needed): Seattle's daily weather 2012-2015 from the PyPI package
`vega-datasets`, daily Microsoft prices 1986-2017 and half-hourly electricity demand of
England and Wales (summer 2000) from `pmdarima`'s datasets, or a CSV of your own with a
date column and numeric value columns. The statistical baselines are the baseline stage's
(rnnlab.baselines.forecast): `baseline_inputs` gives them the series and test origins that preprocess cut.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from numpy.lib.stride_tricks import sliding_window_view
from pandas.tseries.frequencies import to_offset
from torch.utils.data import TensorDataset

from rnnlab import io
from rnnlab.console import summary
from rnnlab.data.base import SPLITS, SplitTensorDataModule, load_split, missing_hint, read_csv, read_processed_json, save_split
from rnnlab.errors import ConfigError, DataError

RAW_FILE = "series.csv"
NORMALIZATIONS = ("standard", "last_value")
FILL_STRATEGIES = ("error", "forward_fill")
# The test batch also carries the target dates (for the plot and the test units' names).
TEST_EXTRAS = ("target_times",)


def _seattle_weather() -> pd.DataFrame:
    from vega_datasets import local_data

    return local_data.seattle_weather().drop(columns="weather")  # the weather label is text, not a series


def _msft() -> pd.DataFrame:
    from pmdarima.datasets import load_msft

    return load_msft().rename(columns={"Date": "date"}).drop(columns="OpenInt")  # OpenInt is all zeros


def _electricity() -> pd.DataFrame:
    from pmdarima.datasets import load_taylor

    # pmdarima ships the values only: half-hourly from Monday 5 June 2000 (Taylor, 2003).
    demand = load_taylor()
    return pd.DataFrame({"date": pd.date_range("2000-06-05", periods=len(demand), freq="30min"), "demand": demand})


# source -> (loader, PyPI package that ships it)
PACKAGED_SOURCES: dict[str, tuple[Callable[[], pd.DataFrame], str]] = {
    "seattle_weather": (_seattle_weather, "vega-datasets"),
    "msft": (_msft, "pmdarima"),
    "electricity": (_electricity, "pmdarima"),
}


def _line(frame: pd.DataFrame, row: int) -> str:
    """Where a row is, for error messages: its CSV line (the header is line 1) and its date."""
    date = frame["date"].iloc[row] if "date" in frame.columns else None
    return f"line {row + 2}" + (f" ({date})" if isinstance(date, pd.Timestamp) else "")


def first_bad_row(frame: pd.DataFrame, bad: pd.Series) -> str:
    """Where the first row flagged in `bad` is (its CSV line and date) and how many there are, for error messages."""
    return f"{_line(frame, int(np.flatnonzero(bad)[0]))} ({int(bad.sum())} in all)"


def read_series_csv(path: str | Path, date_column: str = "date", date_fix: str = "set task.fetch.date_column") -> pd.DataFrame:
    """Read a CSV with a date column and numeric value columns, sorted by date.

    Returns a frame with the column `date` first; names the line and the fix on failure
    (`date_fix`: what to do when the date column is missing).
    """
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a CSV file" if path.is_dir() else "does not exist"
        raise DataError(f"{path} {what}; give a CSV with a {date_column!r} column and numeric value columns.")
    return series_rows(read_csv(path, "a header line and one row per date"), str(path), date_column, date_fix)


def series_rows(frame: pd.DataFrame, name: str, date_column: str = "date", date_fix: str = "set task.fetch.date_column") -> pd.DataFrame:
    """`frame` (a CSV's rows, or a served model's input) checked and sorted by date: dates parsed, values numeric,
    one row per date, the column `date` first. `name` says where the rows came from in error messages."""
    if date_column not in frame.columns:
        raise DataError(f"{name} has no column {date_column!r} (columns: {list(frame.columns)}); {date_fix}.")
    if len(frame.columns) < 2 or frame.empty:
        raise DataError(
            f"{name} needs a date column and at least one value column with rows; it has {list(frame.columns)}, {len(frame)} rows."
        )
    frame = frame.rename(columns={date_column: "date"})
    written = frame["date"]  # as read, for the message about a truncated date
    dates = pd.to_datetime(frame["date"], errors="coerce", format="mixed")
    if dates.isna().any():
        row = int(np.flatnonzero(dates.isna())[0])
        raise DataError(f"{name} {_line(frame, row)}: {frame['date'].iloc[row]!r} is not a date (a truncated or malformed row?).")
    frame["date"] = dates
    values = frame.drop(columns="date")
    numeric = values.apply(pd.to_numeric, errors="coerce")
    malformed = numeric.isna() & values.notna()
    if malformed.to_numpy().any():
        row, col = (int(i[0]) for i in np.nonzero(malformed.to_numpy()))
        raise DataError(f"{name} {_line(frame, row)}: column {values.columns[col]!r} has the non-numeric value {values.iat[row, col]!r}.")
    frame = pd.concat([frame[["date"]], numeric], axis=1)
    duplicated = frame["date"].duplicated()
    if duplicated.any():
        row = int(np.flatnonzero(duplicated)[0])
        first = int(np.flatnonzero(frame["date"] == frame["date"].iloc[row])[0])
        if str(written.iloc[row]) != str(written.iloc[first]):  # '2015-12-3', cut from '2015-12-31', reads as a date of line 4
            raise DataError(
                f"{name} line {row + 2}: {str(written.iloc[row])!r} reads as {frame['date'].iloc[row]}, the date of line {first + 2} "
                f"({str(written.iloc[first])!r}): a truncated or malformed row? Fix it, keeping one row per date."
            )
        raise DataError(
            f"{name} has {int(duplicated.sum())} repeated date(s), e.g. {frame.loc[duplicated, 'date'].iloc[0]}; keep one row per date."
        )
    return frame.sort_values("date", kind="stable").reset_index(drop=True)


def fetch(out_dir: str, source: str = "seattle_weather", csv_path: str | None = None, date_column: str = "date") -> None:
    """Write data/raw/<task>/series.csv (date + numeric columns) and a record of where it came from."""
    if source == "csv":
        if not csv_path:
            raise DataError("task.fetch.source=csv needs task.fetch.csv_path=<your CSV with a date column and value columns>.")
        frame = read_series_csv(csv_path, date_column)
        # The file's name and content hash, not this machine's path: the same series gives the same bytes anywhere.
        origin: dict[str, Any] = {"source": "csv", "origin": Path(csv_path).name, "sha256": io.sha256(csv_path)}
    elif source in PACKAGED_SOURCES:
        loader, package = PACKAGED_SOURCES[source]
        frame = loader()
        frame["date"] = pd.to_datetime(frame["date"])
        origin = {"source": source, "package": package, "version": version(package)}
    else:
        raise DataError(f"Unknown series source {source!r}; choose one of {[*PACKAGED_SOURCES, 'csv']}.")
    with io.atomic_dir(out_dir) as tmp:
        frame.to_csv(tmp / RAW_FILE, index=False)
        io.write_json(tmp / "source.json", {**origin, "rows": len(frame), "columns": list(frame.columns[1:])})
    summary(
        f"fetch {source}",
        {"rows": len(frame), "from": frame["date"].iloc[0], "to": frame["date"].iloc[-1], "written": Path(out_dir) / RAW_FILE},
    )


def clean_values(frame: pd.DataFrame, columns: Sequence[str], fill_missing: str, name: str) -> tuple[pd.DataFrame, int]:
    """The chosen columns, checked: infinite values are an error; NaN too, unless `fill_missing="forward_fill"`.

    Forward fill carries the last observed value forward. Unlike interpolation it never looks
    ahead, so a filled input cannot leak the value the model is asked to forecast.
    Returns the frame and how many values were filled.
    """
    if fill_missing not in FILL_STRATEGIES:
        raise ConfigError(f"task.preprocess.fill_missing must be one of {list(FILL_STRATEGIES)}, got {fill_missing!r}.")
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"{name} has no column(s) {missing}; its columns are {list(frame.columns[1:])}.")
    values = frame[list(columns)]
    for column in columns:
        infinite, missing_values = np.isinf(values[column]), values[column].isna()
        if infinite.any():
            raise DataError(f"{name} column {column!r} has an infinite value at {first_bad_row(frame, infinite)}; fix or remove the row.")
        if missing_values.any() and fill_missing == "error":
            raise DataError(
                f"{name} column {column!r} has a missing (NaN) value at {first_bad_row(frame, missing_values)}; "
                "fix the data or set task.preprocess.fill_missing=forward_fill."
            )
        if missing_values.iloc[0]:
            raise DataError(
                f"{name} column {column!r} starts with a missing (NaN) value at {_line(frame, 0)}, which nothing earlier can fill; "
                "drop the leading rows without a value."
            )
    filled = int(values.isna().to_numpy().sum())
    return pd.concat([frame[["date"]], values.ffill()], axis=1), filled


def split_bounds(n_rows: int, val_fraction: float, test_fraction: float) -> dict[str, tuple[int, int]]:
    """Chronological [start, end) row ranges: the oldest rows train, the newest test."""
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ConfigError(f"val_fraction={val_fraction} and test_fraction={test_fraction} must be in (0, 1) with a sum below 1.")
    n_test = round(n_rows * test_fraction)
    n_val = round(n_rows * val_fraction)
    n_train = n_rows - n_val - n_test
    return {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, n_rows)}


def window_origins(start: int, end: int, lookback: int, horizon: int, split: str) -> np.ndarray:
    """Forecast origins o of a split: the inputs are rows [o - lookback, o), the targets rows [o, o + horizon).

    All targets lie inside the split; the inputs may reach back into the previous split (the past is known).
    """
    first = max(start, lookback)
    if end - horizon < first:
        raise DataError(
            f"The {split} split has {end - start} rows, too few for one window of lookback={lookback} and horizon={horizon} "
            f"(the train split needs lookback + horizon rows, val and test need horizon rows); "
            "lower task.preprocess.lookback or horizon, or give the split a larger fraction."
        )
    return np.arange(first, end - horizon + 1)


def input_windows(values: np.ndarray, origins: np.ndarray, lookback: int) -> np.ndarray:
    """[N, lookback, F]: the rows [o - lookback, o) of a [T, F] array for each origin o."""
    return sliding_window_view(values, lookback, axis=0)[origins - lookback].transpose(0, 2, 1)


def target_windows(series: np.ndarray, origins: np.ndarray, horizon: int) -> np.ndarray:
    """[N, horizon]: the values [o, o + horizon) of a [T] array for each origin o."""
    return sliding_window_view(series, horizon)[origins]


def fourier_features(n_rows: int, season: int, terms: int) -> np.ndarray:
    """[n_rows, 2 * terms] sin/cos pairs of the season's first `terms` harmonics, by row position."""
    return fourier_at(np.arange(n_rows), season, terms)


def fourier_at(positions: np.ndarray, season: int, terms: int) -> np.ndarray:
    """[len(positions), 2 * terms] sin/cos pairs at the given row positions (row 0: the series' first row)."""
    steps = np.asarray(positions)[:, None] * np.arange(1, terms + 1)[None, :] * (2 * np.pi / season)
    return np.concatenate([np.sin(steps), np.cos(steps)], axis=1)


def series_frequency(dates: pd.Series) -> str | None:
    """The pandas frequency of evenly spaced `dates` (e.g. "D", "30min", "MS"); "B" for weekday-only dates
    with gaps (trading days: holidays have no row); None for anything else."""
    with warnings.catch_warnings():  # pandas 3 warns that infer_freq will return an offset; to_offset takes either
        warnings.simplefilter("ignore", DeprecationWarning)
        inferred = pd.infer_freq(dates) if len(dates) >= 3 else None
    if inferred is not None:
        return to_offset(inferred).freqstr
    if len(dates) >= 3 and (dates.dt.day_of_week < 5).all() and (dates == dates.dt.normalize()).all():
        return "B"
    return None


def seasonal_naive_scale(history: np.ndarray, season: int) -> float:
    """The in-sample MAE of the seasonal naive forecast y[t] = y[t - season] over `history` (M4's MASE scale).

    As in M4, the history is everything known before the forecasts being scored: here the
    train and val rows, the series before the test period. The model never sees this number.
    """
    if len(history) <= season:
        raise DataError(f"The history before the test split has {len(history)} rows, not more than one season ({season}); MASE needs more.")
    scale = float(np.mean(np.abs(history[season:] - history[:-season])))
    if scale == 0:
        raise DataError(f"The series repeats exactly every {season} steps, so MASE (scaled by that error) is undefined.")
    return scale


def normalised_inputs(
    values: np.ndarray, origins: np.ndarray, lookback: int, train_end: int, mode: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Input windows [N, lookback, F] scaled with statistics of the train rows only, the per-window
    target offsets [N] and the per-column scales [F]: a target is `offset + scales[0] * its scaled value`.

    The offset is the window's last target value whatever the input scaling, so the network forecasts changes from
    it: a network whose output is 0 is persistence. standard: inputs (x - train mean) / train std. last_value:
    (x - the window's last value) / std of the train rows' one-step changes, for series that leave their training
    range (prices).
    """
    train = values[:train_end]
    scales = train.std(axis=0) if mode == "standard" else np.diff(train, axis=0).std(axis=0)
    if (scales == 0).any():
        raise DataError(f"Column(s) {np.flatnonzero(scales == 0).tolist()} do not vary over the train split; they cannot be scaled.")
    last = values[origins - 1]
    centers = np.broadcast_to(train.mean(axis=0), (len(origins), values.shape[1])) if mode == "standard" else last
    return (input_windows(values, origins, lookback) - centers[:, None, :]) / scales, last[:, 0].copy(), scales


def preprocess(
    raw_dir: str,
    out_dir: str,
    target: str,
    covariates: Sequence[str] = (),
    lookback: int = 56,
    horizon: int = 7,
    season: int = 1,
    fourier_terms: int = 0,
    m4_period: int = 1,
    mase_history: int | None = None,
    normalize: str = "standard",
    fill_missing: str = "error",
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
) -> None:
    """Split chronologically, fit the scaling on train only, and cut windows.

    `season` is the Fourier terms' period; `m4_period` is M4's seasonal period of the data's frequency, the lag of
    MASE's scale (over the last `mase_history` rows before the test split; None: all, as M4) and the seasonality of
    the baseline stage's Naive2 and ETS.
    """
    if lookback <= 0 or horizon <= 0 or season <= 0 or m4_period <= 0 or fourier_terms < 0:
        raise ConfigError(
            f"lookback ({lookback}), horizon ({horizon}), season ({season}) and m4_period ({m4_period}) must be positive, "
            f"fourier_terms ({fourier_terms}) >= 0."
        )
    if mase_history is not None and mase_history <= m4_period:
        raise ConfigError(f"task.preprocess.mase_history ({mase_history}) must exceed m4_period ({m4_period}), or be null (all rows).")
    if normalize not in NORMALIZATIONS:
        raise ConfigError(f"task.preprocess.normalize must be one of {list(NORMALIZATIONS)}, got {normalize!r}.")
    if target in covariates:
        raise ConfigError(f"The target {target!r} is read anyway; remove it from task.preprocess.covariates.")
    raw_path = Path(raw_dir) / RAW_FILE
    if not raw_path.is_file():
        raise DataError(f"{raw_path} is missing: run the fetch stage first.")
    columns = [target, *covariates]
    frame, filled = clean_values(read_series_csv(raw_path), columns, fill_missing, str(raw_path))
    values = frame[columns].to_numpy(dtype=np.float64)
    series = values[:, 0]
    bounds = split_bounds(len(frame), val_fraction, test_fraction)
    train_end = bounds["train"][1]
    origins = {split: window_origins(*bounds[split], lookback, horizon, split) for split in SPLITS}
    test_start = bounds["test"][0]
    mase_scale = seasonal_naive_scale(series[max(0, test_start - (mase_history or test_start)) : test_start], m4_period)
    fourier = fourier_features(len(frame), season, fourier_terms) if fourier_terms else None
    times = frame["date"].to_numpy(dtype="datetime64[ns]").astype(np.int64)
    source_file = Path(raw_dir) / "source.json"  # absent if the user wrote series.csv by hand
    source = json.loads(source_file.read_text())["source"] if source_file.is_file() else "csv"

    with io.atomic_dir(out_dir) as tmp:
        for split in SPLITS:
            split_origins = origins[split]
            inputs, offsets, scales = normalised_inputs(values, split_origins, lookback, train_end, normalize)
            if fourier is not None:
                inputs = np.concatenate([inputs, input_windows(fourier, split_origins, lookback)], axis=2)
            tensors = {
                "inputs": torch.tensor(inputs, dtype=torch.float32),
                "targets": torch.tensor(target_windows(series, split_origins, horizon), dtype=torch.float32),
                "offsets": torch.tensor(offsets, dtype=torch.float32),
                "target_times": torch.tensor(target_windows(times, split_origins, horizon)),
            }
            save_split(tmp, split, tensors)
        splits = {
            split: {
                "rows": list(bounds[split]),
                "first_date": str(frame["date"].iloc[bounds[split][0]]),
                "last_date": str(frame["date"].iloc[bounds[split][1] - 1]),
                "windows": len(origins[split]),
            }
            for split in SPLITS
        }
        io.write_json(tmp / "splits.json", splits)
        # The centers (train means; last_value centers on each window's last row) let a served model scale new rows.
        centers = values[:train_end].mean(axis=0).tolist() if normalize == "standard" else None
        scaler = {"normalize": normalize, "columns": columns, "scales": scales.tolist(), "centers": centers, "fitted_on": "train"}
        io.write_json(tmp / "scaler.json", scaler)
        metadata = {
            "series": f"{source}: {target}",
            "target": target,
            "columns": columns,
            "num_features": inputs.shape[2],
            "lookback": lookback,
            "horizon": horizon,
            "season": season,
            "fourier_terms": fourier_terms,
            "m4_period": m4_period,
            "mase_history": mase_history,
            # Row 0's date and the spacing of the rows: the Fourier terms count rows from row 0, so a served
            # model places new rows in the season by their date.
            "first_date": str(frame["date"].iloc[0]),
            "frequency": series_frequency(frame["date"]),
            "normalize": normalize,
            "target_scale": float(scales[0]),
            "mase_scale": mase_scale,
            "fill_missing": fill_missing,
            "filled_missing": filled,
            "sizes": {split: len(origins[split]) for split in SPLITS},
        }
        io.write_json(tmp / "metadata.json", metadata)
    summary(
        f"preprocess {metadata['series']}",
        {
            **{f"{s} windows": f"{splits[s]['windows']} ({splits[s]['first_date'][:10]} .. {splits[s]['last_date'][:10]})" for s in SPLITS},
            "MASE scale": f"{mase_scale:.4g} (in-sample seasonal naive MAE at lag {m4_period}, M4's period)",
            "written": out_dir,
        },
    )


def baseline_inputs(raw_dir: str | Path, processed_dir: str | Path, task: str | None = None) -> dict[str, Any]:
    """What the statistical baselines fit and forecast from, as preprocess cut it (its metadata.json and splits.json,
    over the fetched series): the cleaned target series, its Fourier regressors (None without), the end of the train
    rows, every test origin in order, the horizon and M4's period; rnnlab.baselines.forecast.baseline_forecasts' arguments.
    `task` names the stages to run in errors (by default the processed folder's name, as in the pipeline's layout)."""
    raw_path, task = Path(raw_dir) / RAW_FILE, task or Path(processed_dir).name
    if not raw_path.is_file():
        raise DataError(f"{raw_path} is missing: {missing_hint(task, 'fetch')}.")
    meta = read_processed_json(processed_dir, "metadata.json", task, ["columns", "fill_missing"])
    splits = read_processed_json(processed_dir, "splits.json", task, ["test"])
    frame, _ = clean_values(read_series_csv(raw_path), meta["columns"], meta["fill_missing"], str(raw_path))
    rows = splits["test"]["rows"][1]  # the last row preprocess cut windows from
    if len(frame) != rows:
        raise DataError(f"{raw_path} has {len(frame)} rows but {processed_dir} was cut from {rows}: rerun preprocess (`dvc repro`).")
    season, terms = meta["season"], meta["fourier_terms"]
    return {
        "target": frame[meta["target"]].to_numpy(dtype=np.float64),
        "exog": fourier_features(len(frame), season, terms) if terms else None,
        "train_end": splits["train"]["rows"][1],
        "origins": window_origins(*splits["test"]["rows"], meta["lookback"], meta["horizon"], "test"),
        "horizon": meta["horizon"],
        "m4_period": meta["m4_period"],
    }


class ForecastDataModule(SplitTensorDataModule):
    """Batches of (input windows [B, lookback, F], targets [B, horizon] in the series' units, offsets [B]).

    Windows stay in time order (a limit keeps the oldest); test batches also carry the target dates [B, horizon]
    (ns since 1970).
    """

    batch_keys = ("inputs", "targets", "offsets")

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        test = self.datasets["test"]
        if len(test.tensors) == len(self.batch_keys):
            tensors = load_split(self.processed_dir, "test", self.task)
            self.datasets["test"] = TensorDataset(*test.tensors, *(tensors[key][: len(test)] for key in TEST_EXTRAS))

    def test_units(self) -> pd.DataFrame:
        """Each test example is one forecast origin, named by its first target date; consecutive origins overlap in
        what they forecast, so blocks of `horizon` origins form the groups (block bootstrap, Diebold-Mariano)."""
        first_dates = pd.to_datetime(self.datasets["test"].tensors[-1][:, 0].numpy())
        blocks = np.arange(len(first_dates)) // self.metadata["horizon"]
        return pd.DataFrame({"unit": first_dates.strftime("%Y-%m-%d %H:%M"), "group": blocks})

    @property
    def front_end_dims(self) -> dict[str, int]:
        return {"num_features": self.metadata["num_features"]}

    @property
    def head_dims(self) -> dict[str, Any]:
        meta = self.metadata
        return {key: meta[key] for key in ("horizon", "target_scale", "mase_scale", "series")}
