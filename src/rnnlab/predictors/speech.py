"""Speech's predictor: WAV files to spoken commands, each clip read and turned into the features preprocess
computed for training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig

from rnnlab.data.base import read_processed_json
from rnnlab.data.speech import SAMPLE_RATE, fit_length, log_mel, read_wav
from rnnlab.errors import DataError
from rnnlab.predictors.base import TaskPredictor, require_columns, text_rows

WAV_FIX = "give a PCM WAV file of one spoken word (any rate and channels: it is resampled to 16 kHz mono), e.g. `ffmpeg -i in.m4a in.wav`"


class ClipPredictor(TaskPredictor):
    """Spoken commands from WAV files: each clip gets the features preprocess computed for training (one
    second at 16 kHz, log-mel frames normalised with the train statistics) and the net's most likely classes."""

    @classmethod
    def from_config(cls, cfg: DictConfig) -> ClipPredictor:
        metadata = read_processed_json(Path(cfg.paths.processed), "metadata.json", cfg.task.name)
        features = metadata["features"]
        return cls(
            class_names=metadata["class_names"],
            log_mel={key: features[key] for key in ("n_mels", "window_ms", "hop_ms")},
            mean=metadata["normalisation"]["mean"],
            std=metadata["normalisation"]["std"],
        )

    @classmethod
    def read_input(cls, source: str) -> pd.DataFrame:
        return pd.DataFrame({"path": [source]})

    def predict(self, net: torch.nn.Module, frame: pd.DataFrame, params: dict[str, Any]) -> pd.DataFrame:
        """Per clip: its `path`, the most likely class (`label`) and its `probability`, the `top3` classes with theirs,
        and a `note` of what was done to the audio (resampled, downmixed, cut to one second; empty if nothing)."""
        features, notes = self.features(frame)
        net.eval()
        with torch.no_grad():
            probabilities = torch.softmax(net(features), dim=-1)
        names = self.state["class_names"]
        top = probabilities.topk(min(3, len(names)), dim=-1)
        return pd.DataFrame(
            {
                "path": frame["path"].tolist(),
                "label": [names[i] for i in top.indices[:, 0].tolist()],
                "probability": top.values[:, 0].double().numpy(),
                "top3": [
                    ", ".join(f"{names[i]} {p:.3f}" for i, p in zip(indices, values, strict=True))
                    for indices, values in zip(top.indices.tolist(), top.values.tolist(), strict=True)
                ],
                "note": notes,
            }
        )

    def describe(self, inputs: pd.DataFrame, outputs: pd.DataFrame) -> str:
        """One line per clip: the file, the most likely class and its probability, the top 3; what was done to the audio."""
        lines = []
        for row in outputs.itertuples(index=False):
            lines.append(f"{row.path}: {row.label} ({row.probability:.1%})  top 3: {row.top3}")
            if row.note:
                lines.append(f"  ({row.note})")
        return "\n".join(lines)

    def features(self, frame: pd.DataFrame) -> tuple[torch.Tensor, list[str]]:
        """The network's input [N, frames, n_mels] for the WAV files in `frame["path"]`, and a note per clip."""
        require_columns(frame, ["path"], 'a column `path` of WAV file paths, {"path": ["clip.wav"]}')
        waves, notes = [], []
        for path in text_rows(frame, "path", "WAV file path"):
            if Path(path).is_dir():
                raise DataError(f"{path} is a folder, not a WAV file; {WAV_FIX}.")
            if not Path(path).is_file():
                raise DataError(f"{path} does not exist; {WAV_FIX}.")
            try:
                audio, converted = read_wav(path, convert=True)  # as fetch converts the clips it reads
            except DataError as err:
                raise DataError(f"{err} Fix: {WAV_FIX}.") from err
            note = [converted] if converted else []
            if len(audio) > SAMPLE_RATE:
                note.append(f"cut to its first second of {len(audio) / SAMPLE_RATE:.2f} s")
            waves.append(fit_length(audio))
            notes.append("; ".join(note))
        settings = self.state["log_mel"]
        frames = log_mel(torch.from_numpy(np.stack(waves)), **settings)
        mean, std = (torch.tensor(self.state[key], dtype=torch.float32) for key in ("mean", "std"))
        return (frames - mean) / std, notes  # as preprocess normalised the training features
