"""The memory tasks' predictors: a sequence of the adding problem to its sum, symbols to the copy task's recall,
built as preprocess built the training sequences (rnnlab.data.memory)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig

from rnnlab.data.base import read_csv, read_processed_json
from rnnlab.data.memory import adding_inputs, copy_tokens
from rnnlab.errors import DataError
from rnnlab.predictors.base import TaskPredictor, require_columns, text_rows


def trained_lag(cfg: DictConfig, keys: list[str]) -> dict[str, Any]:
    """The lag the run trained at (task.data.lag) and the preprocessed `keys` of metadata.json."""
    metadata = read_processed_json(Path(cfg.paths.processed), "metadata.json", cfg.task.name, ["lags", *keys])
    return {"lag": int(cfg.task.data.lag), **{key: metadata[key] for key in keys}}


class AddingPredictor(TaskPredictor):
    """Sequences of (value, marker) steps to the predicted sum of the two marked values.

    Input: columns `value` (in [0, 1], as in training) and `marker` (1 at exactly two steps, else 0), one row per
    step, and optionally `sequence`, an id that puts several sequences in one table. Output per sequence: its
    steps, the prediction, the true sum of the marked values, the error and whether it is within the tolerance
    of training's accuracy. State: the lag (sequence length) the network was trained at and that tolerance.
    """

    EXAMPLE = '{"dataframe_split": {"columns": ["value", "marker"], "data": [[0.3, 1], [0.9, 0], [0.5, 1], [0.1, 0]]}}'
    FIX = "give one row per step with a value in [0, 1] and a marker of 0 or 1, exactly two markers per sequence"

    @classmethod
    def from_config(cls, cfg: DictConfig) -> AddingPredictor:
        return cls(**trained_lag(cfg, []), tolerance=float(cfg.task.module.tolerance))

    @classmethod
    def read_input(cls, source: str) -> pd.DataFrame:
        """A CSV file of one or more sequences: columns value,marker[,sequence], one row per step."""
        path = Path(source)
        if not path.is_file():
            raise DataError(f"{source} is not a CSV file; {cls.FIX} (columns value,marker), e.g. a file made by `head` of a test sequence.")
        return read_csv(path, "the columns value,marker[,sequence], one row per step")

    def sequences(self, frame: pd.DataFrame) -> list[tuple[Any, torch.Tensor, torch.Tensor]]:
        """(id, values [T], marked positions [2]) of each sequence of `frame`, checked row by row."""
        require_columns(frame, ["value", "marker"], self.EXAMPLE)
        if frame.empty:
            raise DataError(f"the input has no rows; {self.FIX}.")
        ids = frame["sequence"] if "sequence" in frame.columns else pd.Series(0, index=frame.index)
        found = []
        for sequence, rows in frame.groupby(ids, sort=False, dropna=False):
            where = f"sequence {sequence!r}" if "sequence" in frame.columns else "the input"
            values = self._column(rows, "value", where)
            markers = self._column(rows, "marker", where)
            outside = ~((values >= 0) & (values <= 1))
            if outside.any():
                row, value = rows.index[outside.argmax()], float(values[outside.argmax()])
                raise DataError(f"{where}: row {row} has the value {value:g}, outside [0, 1] where the model was trained; {self.FIX}.")
            not_marker = ~np.isin(markers, (0, 1))
            if not_marker.any():
                row = rows.index[not_marker.argmax()]
                raise DataError(f"{where}: row {row} has the marker {markers[not_marker.argmax()]:g}, not 0 or 1; {self.FIX}.")
            marked = np.flatnonzero(markers == 1)
            if len(marked) != 2:
                raise DataError(f"{where} has {len(marked)} marker(s) of 1 in {len(rows)} steps, not 2; {self.FIX}.")
            found.append((sequence, torch.tensor(values, dtype=torch.float32), torch.tensor(marked)))
        return found

    @staticmethod
    def _column(rows: pd.DataFrame, column: str, where: str) -> np.ndarray:
        """The column as finite numbers; the first row that is not one is refused by its number."""
        numbers = pd.to_numeric(rows[column], errors="coerce").to_numpy(dtype=np.float64)
        bad = ~np.isfinite(numbers)
        if bad.any():
            row, value = rows.index[bad.argmax()], rows[column].iloc[bad.argmax()]
            shown = value.item() if isinstance(value, np.generic) else value  # nan, not numpy's np.float64(nan)
            raise DataError(f"{where}: row {row} of column {column!r} is {shown!r}, not a finite number.")
        return numbers

    def predict(self, net: torch.nn.Module, frame: pd.DataFrame, params: dict[str, Any]) -> pd.DataFrame:
        rows = []
        for sequence, values, marked in self.sequences(frame):
            with torch.no_grad():
                prediction = float(net(adding_inputs(values[None], marked[None])).reshape(-1)[0])
            target = float(values[marked].sum())
            rows.append({"sequence": sequence, "steps": len(values), "prediction": prediction, "target": target})
        out = pd.DataFrame(rows)
        out["error"] = out["prediction"] - out["target"]
        out["within_tolerance"] = out["error"].abs() < self.state["tolerance"]
        return out

    def input_example(self) -> pd.DataFrame:
        """A sequence of the trained length, markers at its first and third quarters."""
        lag = self.state["lag"]
        markers = np.zeros(lag, dtype=np.int64)
        markers[[lag // 4, lag // 2 + lag // 4]] = 1
        return pd.DataFrame({"value": np.random.default_rng(0).random(lag).round(3), "marker": markers})

    def describe(self, inputs: pd.DataFrame, outputs: pd.DataFrame) -> str:
        lines = [f"trained on sequences of {self.state['lag']} steps; right when the error is below {self.state['tolerance']:g}"]
        for row in outputs.itertuples(index=False):
            verdict = "right" if row.within_tolerance else "wrong"
            lines.append(
                f"sequence {row.sequence} ({row.steps} steps): predicted {row.prediction:.4f}, sum of the marked values "
                f"{row.target:.4f}, error {row.error:+.4f} ({verdict})"
            )
        return "\n".join(lines)


class CopyPredictor(TaskPredictor):
    """Symbols to copy (text of `length` whole numbers in 1..alphabet, e.g. "3 1 4") to the network's recall of them
    after the lag it was trained at: the sequence is built as preprocess built it (symbols, lag - 1 blanks,
    the delimiter, blanks). State: that lag, the number of symbols and the alphabet's size."""

    EXAMPLE = '{"dataframe_split": {"columns": ["symbols"], "data": [["3 1 4"]]}}'

    @classmethod
    def from_config(cls, cfg: DictConfig) -> CopyPredictor:
        return cls(**trained_lag(cfg, ["length", "alphabet"]))

    @classmethod
    def read_input(cls, source: str) -> pd.DataFrame:
        return pd.DataFrame({"symbols": [source]})

    def what(self) -> str:
        length, alphabet = self.state["length"], self.state["alphabet"]
        return f"text of {length} whole numbers from 1 to {alphabet}, e.g. {' '.join(str(1 + i % alphabet) for i in range(length))!r}"

    def symbols(self, frame: pd.DataFrame) -> torch.Tensor:
        """The symbols [rows, length] of each row of `frame`, checked."""
        require_columns(frame, ["symbols"], self.EXAMPLE)
        rows = []
        for row, text in enumerate(text_rows(frame, "symbols", self.what())):
            parts = [part for part in re.split(r"[\s,]+", text.strip()) if part]
            if len(parts) != self.state["length"] or not all(
                part.isdecimal() and 1 <= int(part) <= self.state["alphabet"] for part in parts
            ):
                raise DataError(f"row {row} of column 'symbols' is {text!r}; the model copies {self.what()}.")
            rows.append([int(part) for part in parts])
        return torch.tensor(rows)

    def predict(self, net: torch.nn.Module, frame: pd.DataFrame, params: dict[str, Any]) -> pd.DataFrame:
        symbols = self.symbols(frame)
        with torch.no_grad():
            recalled = net(copy_tokens(symbols, self.state["lag"], self.state["alphabet"])).argmax(dim=-1) + 1
        return pd.DataFrame(
            {
                "symbols": [" ".join(map(str, row)) for row in symbols.tolist()],
                "copy": [" ".join(map(str, row)) for row in recalled.tolist()],
                "correct": (recalled == symbols).sum(dim=1).numpy(),
            }
        )

    def input_example(self) -> pd.DataFrame:
        length, alphabet = self.state["length"], self.state["alphabet"]
        return pd.DataFrame({"symbols": [" ".join(str(1 + (3 * i) % alphabet) for i in range(length))]})

    def describe(self, inputs: pd.DataFrame, outputs: pd.DataFrame) -> str:
        lines = [f"recalled after a lag of {self.state['lag']} steps:"]
        for row in outputs.itertuples(index=False):
            lines.append(f"{row.symbols} -> {row.copy}  ({row.correct} of {self.state['length']} right)")
        return "\n".join(lines)
