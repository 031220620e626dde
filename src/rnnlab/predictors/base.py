"""The base of every task's predictor and the checks of raw input and preprocess outputs they share.

Imports neither MLflow nor serving: a predictor refuses bad input with DataError, and rnnlab.serving
turns it into the InvalidRequest that `mlflow models serve` answers with 400.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import pandas as pd
import torch
from omegaconf import DictConfig

from rnnlab.errors import DataError


class TaskPredictor(ABC):
    """What a task needs besides the network to answer raw inputs. Holds only JSON-serialisable state.

    Subclasses implement from_config, read_input and predict; the class attributes and the other
    methods have defaults that fit most tasks.
    """

    # Pyfunc predict params and their defaults (textgen: length, temperature, seed). They become the
    # model signature's params, which `mlflow models serve` and `rnnlab-predict --<param>` accept.
    default_params: ClassVar[dict[str, Any]] = {}

    def __init__(self, **state: Any) -> None:
        self.state = state

    @classmethod
    @abstractmethod
    def from_config(cls, cfg: DictConfig) -> TaskPredictor:
        """Built from a training run's resolved config (the run's config.yaml artifact): reads what
        preprocess saved under cfg.paths.processed. Raises DataError naming the missing file and
        `dvc repro preprocess@<task>`."""

    @classmethod
    @abstractmethod
    def read_input(cls, source: str) -> pd.DataFrame:
        """The rnnlab-predict argument as the model's input DataFrame. Raises DataError on bad input."""

    @abstractmethod
    def predict(self, net: torch.nn.Module, frame: pd.DataFrame, params: dict[str, Any]) -> pd.DataFrame:
        """Predictions for the rows of `frame` (the network is in eval mode, gradients off); `params` are
        default_params updated with the request's. Bad rows raise a DataError naming the row and the fix."""

    def input_example(self) -> pd.DataFrame | None:
        """A valid input for the model signature and MLflow's serving example; None logs neither
        (e.g. when a valid input is a file that will not exist where the model is served)."""
        return None

    def describe(self, inputs: pd.DataFrame, outputs: pd.DataFrame) -> str:
        """The predictions as rnnlab-predict prints them."""
        return outputs.to_string(index=False)

    def to_json(self) -> dict[str, Any]:
        return self.state


def require_columns(frame: pd.DataFrame, columns: list[str], example: str) -> None:
    """Refuse an input frame that lacks one of `columns`, showing a valid request."""
    if not isinstance(frame, pd.DataFrame):
        raise DataError(f"the input must be a table (a pandas DataFrame), got a {type(frame).__name__}; e.g. {example}.")
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        raise DataError(f"the input lacks the column(s) {missing} (it has {list(map(str, frame.columns))}); e.g. {example}.")


def check_utf8(text: str, where: str, what: str) -> str:
    """`text` if it is valid Unicode; bytes that were not UTF-8 (a shell's $'\\xff', which Python keeps as lone
    surrogates) are a DataError naming the byte, before pandas or a terminal fail on them with a traceback."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        char = text[err.start]
        bad = f"byte 0x{ord(char) - 0xDC00:02x}" if "\udc80" <= char <= "\udcff" else f"lone surrogate U+{ord(char):04X}"
        raise DataError(f"{where} is not valid UTF-8 ({bad} at character {err.start}); give a {what} in UTF-8.") from None
    return text


def text_rows(frame: pd.DataFrame, column: str, what: str, blank: bool = False) -> list[str]:
    """The non-empty strings of `column`; an empty or non-text row is refused by its number, and so is
    one of only whitespace unless `blank` (a language model can continue a newline)."""
    texts = []
    for row, value in enumerate(frame[column].tolist()):
        if not isinstance(value, str):
            raise DataError(f"row {row} of column {column!r} is {value!r} ({type(value).__name__}), not text; give a {what}.")
        if not value or not (blank or value.strip()):
            raise DataError(f"row {row} of column {column!r} is {'empty' if not value else 'only whitespace'}; give a {what}.")
        check_utf8(value, f"row {row} of column {column!r}", what)
        texts.append(value)
    if not texts:
        raise DataError(f"the input has no rows; give at least one {what}.")
    return texts
