"""Sentiment's predictor: raw review texts to the positive-class probability, tokenized and encoded as
preprocess encoded the training reviews."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import torch
from omegaconf import DictConfig

from rnnlab.data.base import read_processed_json
from rnnlab.data.sentiment import encode, tokenize
from rnnlab.errors import DataError
from rnnlab.predictors.base import TaskPredictor, check_utf8, require_columns, text_rows


class ReviewPredictor(TaskPredictor):
    """Raw review texts (column `text`) to the positive-class probability, with the run's tokenizer and vocabulary.

    State: the vocabulary and the number of tokens the network read in training (the last `max_len`,
    left-padded, as preprocess and the DataModule encoded them).
    """

    EXAMPLE = '{"dataframe_split": {"columns": ["text"], "data": [["A wonderful, moving film."]]}}'

    @classmethod
    def from_config(cls, cfg: DictConfig) -> ReviewPredictor:
        processed = Path(cfg.paths.processed)
        vocabulary = read_processed_json(processed, "vocab.json", cfg.task.name)
        max_len = read_processed_json(processed, "metadata.json", cfg.task.name, ["max_len"])["max_len"]
        if cfg.task.data.get("max_len") is not None:  # the DataModule kept only the last task.data.max_len tokens
            max_len = min(max_len, int(cfg.task.data.max_len))
        return cls(vocabulary=vocabulary, max_len=max_len, labels=["negative", "positive"])

    @classmethod
    def read_input(cls, source: str) -> pd.DataFrame:
        what = 'review text, e.g. "A wonderful, moving film"'
        frame = pd.DataFrame({"text": [check_utf8(source, "row 0 of column 'text'", what)]})
        text_rows(frame, "text", what)
        return frame

    def predict(self, net: torch.nn.Module, frame: pd.DataFrame, params: dict[str, Any]) -> pd.DataFrame:
        require_columns(frame, ["text"], self.EXAMPLE)
        texts = text_rows(frame, "text", "review text")
        index = {token: i for i, token in enumerate(self.state["vocabulary"])}
        ids = []
        for row, text in enumerate(texts):
            tokens = tokenize(text)
            if not tokens:  # nothing for the network to read: an all-padding sequence would get an arbitrary score
                raise DataError(f"row {row} of column 'text' ({text[:60]!r}) has no words; give a review in words.")
            ids.append(encode(tokens, index, self.state["max_len"]))
        probability = net(torch.tensor(ids)).softmax(dim=-1)[:, 1]
        labels = [self.state["labels"][int(p >= 0.5)] for p in probability.tolist()]
        return pd.DataFrame({"probability": probability.double().numpy(), "label": labels})

    def input_example(self) -> pd.DataFrame:
        return pd.DataFrame({"text": ["A wonderful, moving film.", "Dull, and far too long."]})

    def describe(self, inputs: pd.DataFrame, outputs: pd.DataFrame) -> str:
        lines = []
        for text, probability, label in zip(inputs["text"], outputs["probability"], outputs["label"], strict=True):
            shown = text if len(text) <= 70 else text[:67] + "..."
            lines.append(f"{label:<8}  P(positive) = {probability:.3f}  {shown!r}")
        return "\n".join(lines)
