"""Forecasting's predictor: the recent rows of a series to forecasts, scaled as preprocess scaled the
training windows (the same predictor serves every forecasting task: forecast, forecast_stock, forecast_electricity)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig
from pandas.tseries.frequencies import to_offset

from rnnlab.data.base import read_processed_json
from rnnlab.data.forecast import first_bad_row, fourier_at, read_series_csv, series_rows
from rnnlab.errors import DataError
from rnnlab.predictors.base import TaskPredictor, require_columns


def periods_between(start: pd.Timestamp, end: pd.Timestamp, frequency: str) -> int | None:
    """How many steps of `frequency` lead from `start` to `end` (negative if end is earlier); None if `end`
    is not on the grid of `frequency` steps from `start`."""
    offset = to_offset(frequency)
    try:
        step = pd.Timedelta(offset)  # fixed-length steps: days, hours, minutes ...
    except ValueError:
        step = None
    if step is not None:
        count, rest = divmod(end - start, step)
        return int(count) if rest == pd.Timedelta(0) else None
    # Calendar steps (months, weeks, business days) vary in length: count the dates of the grid between.
    low, high = sorted((start, end))
    grid = pd.date_range(low, high, freq=offset)
    if len(grid) == 0 or grid[0] != low or grid[-1] != high:
        return None
    return (len(grid) - 1) * (1 if end >= start else -1)


class SeriesPredictor(TaskPredictor):
    """Forecasts from the recent rows of a series: the last `lookback` rows of the target (and covariates),
    scaled as preprocess scaled the training windows, give `horizon` forecasts in the series' units."""

    @classmethod
    def from_config(cls, cfg: DictConfig) -> SeriesPredictor:
        processed, task = Path(cfg.paths.processed), cfg.task.name
        metadata = read_processed_json(processed, "metadata.json", task, ["first_date", "frequency"])
        scaler = read_processed_json(processed, "scaler.json", task, ["centers"])
        settings = ("target", "columns", "lookback", "horizon", "season", "fourier_terms", "first_date", "frequency")
        return cls(
            **{key: metadata[key] for key in settings},
            normalize=scaler["normalize"],
            scales=scaler["scales"],
            centers=scaler["centers"],
            fill_missing=cfg.task.preprocess.get("fill_missing", "error"),
        )

    @classmethod
    def read_input(cls, source: str) -> pd.DataFrame:
        """A CSV of the series' recent rows: a 'date' column and the value columns (checked as fetch checks a CSV)."""
        return read_series_csv(source, date_fix="the model reads the recent rows of the series: a 'date' column and its value columns")

    def predict(self, net: torch.nn.Module, frame: pd.DataFrame, params: dict[str, Any]) -> pd.DataFrame:
        """One row per forecast step: `step` (1 .. horizon), `date` and `forecast` (in the target's units)."""
        inputs, rows = self.inputs(frame)
        net.eval()
        with torch.no_grad():
            outputs = net(inputs)[0].double().numpy()
        # Forecasts are changes from the last value of the target (as normalised_inputs' offsets).
        offset, scale = float(rows[self.state["target"]].iloc[-1]), self.state["scales"][0]
        # Dates in nanoseconds, the unit of MLflow's datetime schema (pandas 3 infers microseconds from text).
        dates = self.future_dates(rows["date"]).astype("datetime64[ns]")
        return pd.DataFrame({"step": np.arange(1, len(outputs) + 1, dtype=np.int64), "date": dates, "forecast": offset + scale * outputs})

    def inputs(self, frame: pd.DataFrame) -> tuple[torch.Tensor, pd.DataFrame]:
        """The network's input [1, lookback, num_features] for the last `lookback` rows of `frame`, and the
        checked rows (sorted by date; NaN forward-filled if the model was trained that way)."""
        state = self.state
        # MLflow copies the frame before predict sees it, so the rows are "the input", whatever file they came from.
        name, columns, lookback = "the input", state["columns"], state["lookback"]
        example = f"a column 'date' and the column(s) {columns}, one row per date, at least {lookback} rows"
        require_columns(frame, ["date", *columns], example)
        rows = series_rows(frame.copy(), name)
        if len(rows) < lookback:
            raise DataError(
                f"{name} has {len(rows)} row(s); the model reads the last {lookback} (task.preprocess.lookback), so give at least "
                f"{lookback} rows of recent values."
            )
        if state["fill_missing"] == "forward_fill":
            rows[columns] = rows[columns].ffill()  # as preprocess filled the training series: never from a later row
        first = len(rows) - lookback
        for column in columns:
            values = rows[column].to_numpy(dtype=np.float64)
            for bad, what in ((np.isnan(values), "a missing (NaN)"), (np.isinf(values), "an infinite")):
                bad[:first] = False  # only the rows the model reads matter
                if bad.any():
                    raise DataError(
                        f"{name} column {column!r} has {what} value at {first_bad_row(rows, bad)}; the model reads "
                        f"every value of the last {lookback} rows: fix or fill it in."
                    )
        window = rows.iloc[first:]
        self.check_spacing(window["date"], name)
        values = window[columns].to_numpy(dtype=np.float64)
        centers = np.asarray(state["centers"]) if state["normalize"] == "standard" else values[-1]
        inputs = (values - centers) / np.asarray(state["scales"])  # as normalised_inputs scales a window
        if state["fourier_terms"]:
            inputs = np.concatenate(
                [inputs, fourier_at(self.positions(window["date"], name), state["season"], state["fourier_terms"])], axis=1
            )
        return torch.tensor(inputs[None], dtype=torch.float32), rows

    def input_example(self) -> pd.DataFrame | None:
        """`lookback` rows from the training series' first date at its frequency, every column at its train mean
        (last_value: 0). None when the model reads Fourier terms of a series with gaps, which no dates place."""
        state = self.state
        if state["fourier_terms"] and state["frequency"] in (None, "B"):
            return None
        frequency = state["frequency"] or "D"
        start = pd.Timestamp(state["first_date"])
        dates = pd.date_range(start, periods=state["lookback"], freq=frequency)
        centers = state["centers"] or [0.0] * len(state["columns"])
        return pd.DataFrame({"date": dates, **{column: float(center) for column, center in zip(state["columns"], centers, strict=True)}})

    def describe(self, inputs: pd.DataFrame, outputs: pd.DataFrame) -> str:
        """The forecasts under a line saying what they are and from which rows."""
        state = self.state
        last = pd.to_datetime(inputs["date"], format="mixed").max()
        when = f"{last:%Y-%m-%d}" if last == last.normalize() else str(last)
        head = f"{state['target']}, {state['horizon']} steps after {when} (from the last {state['lookback']} rows):"
        table = outputs.rename(columns={"forecast": state["target"]}).to_string(index=False, float_format=lambda v: f"{v:.6g}")
        return f"{head}\n{table}"

    def check_spacing(self, dates: pd.Series, name: str) -> None:
        """The rows the model reads must be consecutive steps of the series' frequency (trading days: weekdays)."""
        frequency = self.state["frequency"]
        if frequency is None:  # the training series was irregular too
            return
        if frequency == "B":
            weekend = dates.dt.day_of_week >= 5
            if weekend.any():
                date = dates[weekend].iloc[0]
                raise DataError(f"{name} has a row on {date:%A %Y-%m-%d}; the series has weekdays only (trading days).")
            return
        expected = pd.date_range(dates.iloc[0], periods=len(dates), freq=frequency)
        wrong = np.flatnonzero(dates.to_numpy() != expected.to_numpy())
        if len(wrong):
            at = int(wrong[0])
            raise DataError(
                f"{name}: the dates are not evenly spaced: {dates.iloc[at - 1]} is followed by {dates.iloc[at]}, expected "
                f"{expected[at]} (the series has one row every {frequency}); give consecutive rows without gaps."
                if at
                else f"{name}: {dates.iloc[0]} is not a step of the series' frequency {frequency}."
            )

    def positions(self, dates: pd.Series, name: str) -> np.ndarray:
        """Row positions of `dates` in the training series (row 0: its first date), which set the Fourier terms' phase."""
        frequency, first_date = self.state["frequency"], pd.Timestamp(self.state["first_date"])
        if frequency in (None, "B"):
            raise DataError(
                f"The model reads Fourier terms of the season, counted in rows, but its training series had gaps (frequency "
                f"{frequency}), so the season's phase of new rows cannot be told from their dates; "
                "retrain with task.preprocess.fourier_terms=0."
            )
        start = periods_between(first_date, dates.iloc[0], frequency)
        if start is None:
            raise DataError(
                f"{name}: {dates.iloc[0]} is not a whole number of {frequency} steps after the training series' first date "
                f"{first_date}; give the series' own dates."
            )
        return start + np.arange(len(dates))

    def future_dates(self, dates: pd.Series) -> pd.DatetimeIndex:
        """The dates of the `horizon` steps after the last row, continuing the series' frequency (irregular series:
        at the median spacing of the rows read)."""
        horizon, last = self.state["horizon"], dates.iloc[-1]
        if self.state["frequency"] is None:
            spacing = dates.iloc[-self.state["lookback"] :].diff().median()
            return pd.DatetimeIndex([last + spacing * step for step in range(1, horizon + 1)])
        return pd.date_range(last, periods=horizon + 1, freq=self.state["frequency"])[1:]
