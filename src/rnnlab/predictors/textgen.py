"""Textgen's predictor: prompts to continuations sampled from the character-level language model."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pandas as pd
import torch
from omegaconf import DictConfig

from rnnlab.data.base import read_processed_json
from rnnlab.errors import ConfigError, DataError
from rnnlab.models.language_model import check_sampling, encode_prompt, generate
from rnnlab.predictors.base import TaskPredictor, check_utf8, require_columns, text_rows
from rnnlab.vocab import PAD, UNK


class PromptPredictor(TaskPredictor):
    """Prompts (column `prompt`) to sampled continuations (columns `continuation` and `text`, prompt included).

    State: the character vocabulary and a prompt it can encode (for the model's input example).
    Params: `length` characters, sampling `temperature` and `seed`; every row is sampled with the same
    seed, so a prompt's text does not depend on the rows beside it.
    """

    default_params: ClassVar[dict[str, Any]] = {"length": 200, "temperature": 0.8, "seed": 1}
    EXAMPLE = '{"dataframe_split": {"columns": ["prompt"], "data": [["ROMEO:"]]}, "params": {"length": 200}}'

    @classmethod
    def from_config(cls, cfg: DictConfig) -> PromptPredictor:
        vocabulary = read_processed_json(Path(cfg.paths.processed), "vocab.json", cfg.task.name)
        characters = [char for char in vocabulary if char not in (PAD, UNK)]
        prompt = cfg.task.module.get("sample_prompt")
        if not (isinstance(prompt, str) and prompt and set(prompt) <= set(characters)):
            prompt = characters[0]
        return cls(vocabulary=vocabulary, example_prompt=prompt)

    @classmethod
    def read_input(cls, source: str) -> pd.DataFrame:
        what = "prompt to continue, e.g. 'ROMEO:'"
        frame = pd.DataFrame({"prompt": [check_utf8(source, "row 0 of column 'prompt'", what)]})
        text_rows(frame, "prompt", what, blank=True)
        return frame

    def predict(self, net: torch.nn.Module, frame: pd.DataFrame, params: dict[str, Any]) -> pd.DataFrame:
        require_columns(frame, ["prompt"], self.EXAMPLE)
        prompts = text_rows(frame, "prompt", "prompt to continue", blank=True)
        for row, prompt in enumerate(prompts):  # all rows checked before sampling any
            try:
                encode_prompt(prompt, self.state["vocabulary"])
            except ConfigError as err:
                raise DataError(f"row {row} of column 'prompt': {err}") from err
        length, temperature, seed = params["length"], params["temperature"], params["seed"]
        check_sampling(length, temperature, None)
        continuations = [generate(net, prompt, length, temperature, seed=seed) for prompt in prompts]
        return pd.DataFrame({"continuation": continuations, "text": [p + c for p, c in zip(prompts, continuations, strict=True)]})

    def input_example(self) -> pd.DataFrame:
        return pd.DataFrame({"prompt": [self.state["example_prompt"]]})

    def describe(self, inputs: pd.DataFrame, outputs: pd.DataFrame) -> str:
        return "\n\n".join(outputs["text"])
