"""Measure what rnnlab costs besides the training itself: start-up, and per step.

`python -m rnnlab.overhead` prints both:
- start-up: a fresh interpreter, `import rnnlab.training` (what a training imports), a misspelt override refused,
  and a whole smoke-profile forecast training from process start to exit (fetch and preprocess into a temporary
  project root first), each the median
  of `startup_repeats` processes, after one warm-up run that creates the MLflow store; then the same training
  as the pipeline runs it, through rnnlab.warm: its first call (which starts the server) and the median of
  the later ones;
- per step: the same training steps (same network, data, optimiser and gradient clipping) in a plain
  PyTorch loop and through Lightning, its callbacks and MLflow logging, in ms per step.
"""

from __future__ import annotations

import itertools
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from rnnlab.config import hydra_entry
from rnnlab.console import summary
from rnnlab.errors import RnnlabError
from rnnlab.tracking import make_logger
from rnnlab.training import build


class StepTimer(L.Callback):
    """Wall time of the training steps after the warm-up."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.started = 0.0
        self.finished = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.warmup:
            self.started = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        self.finished = time.perf_counter()


def plain_loop(cfg: DictConfig) -> float:
    """Seconds per step of a hand-written loop over the same batches."""
    L.seed_everything(cfg.seed)
    datamodule, module = build(cfg)
    datamodule.setup()
    optimizer = instantiate(cfg.optimizer, params=module.parameters())
    module.train()
    loader = datamodule.train_dataloader()
    batches = (batch for _ in itertools.count() for batch in loader)  # epochs back to back, as Lightning does
    started = 0.0
    for step in range(cfg.warmup + cfg.steps):
        if step == cfg.warmup:
            started = time.perf_counter()
        inputs, labels = next(batches)
        optimizer.zero_grad()
        loss = F.cross_entropy(module(inputs), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.trainer.gradient_clip_val)
        optimizer.step()
    return (time.perf_counter() - started) / cfg.steps


def lightning_loop(cfg: DictConfig) -> float:
    """Seconds per step of `Trainer.fit` with rnnlab's callbacks and MLflow logging."""
    L.seed_everything(cfg.seed)
    datamodule, module = build(cfg)
    timer = StepTimer(cfg.warmup)
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None]
    trainer = instantiate(
        cfg.trainer,
        logger=make_logger(cfg),
        callbacks=[*callbacks, timer],
        max_steps=cfg.warmup + cfg.steps,
        limit_val_batches=0,
        default_root_dir=cfg.paths.run_dir,
    )
    trainer.fit(module, datamodule=datamodule)
    return (timer.finished - timer.started) / cfg.steps


def _seconds(*args: str, exit_code: int = 0) -> float:
    """Wall time of `python <args>` from process start to exit; it must end with `exit_code`."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if result.returncode != exit_code:
        raise RnnlabError(f"`python {' '.join(args)}` failed (exit {result.returncode}): {result.stderr.strip()[-500:]}")
    return elapsed


def startup_times(repeats: int) -> dict[str, float]:
    """Median seconds, over `repeats` processes, of each start-up figure (see the module's docstring)."""
    with tempfile.TemporaryDirectory() as root:
        smoke = ["task=forecast", "profile=smoke", f"paths.root={root}"]
        times = {"fetch (forecast, smoke)": _seconds("-m", "rnnlab.fetch", *smoke)}
        times["preprocess (forecast, smoke)"] = _seconds("-m", "rnnlab.preprocess", *smoke)
        train = ["-m", "rnnlab.train", *smoke, "callbacks.progress_bar=null"]
        _seconds(*train, "seed=0")  # warm-up: creates the MLflow store, as the pipeline's first run does
        seeds = range(1, repeats + 1)
        measured = {
            "python -c pass": [_seconds("-c", "pass") for _ in range(repeats)],
            "import rnnlab.training": [_seconds("-c", "import rnnlab.training") for _ in range(repeats)],
            # Hydra refuses it before rnnlab.train imports the training code: a typo costs no torch import.
            "misspelt override, start to error": [_seconds(*train, "model.encoder.hiden_size=8", exit_code=1) for _ in range(repeats)],
            "smoke forecast training, start to exit": [_seconds(*train, f"seed={seed}") for seed in seeds],
        }
        # As the pipeline runs it: forked from a warm server (rnnlab.warm), started by the first call here.
        warm = ["-m", "rnnlab.warm", *train[1:]]
        times["smoke forecast training, warm, first call (starts the server)"] = _seconds(*warm, f"seed={repeats + 1}")
        measured["smoke forecast training, warm, start to exit"] = [_seconds(*warm, f"seed={repeats + 1 + seed}") for seed in seeds]
    return {**times, **{name: statistics.median(values) for name, values in measured.items()}}


@hydra_entry(config_name="overhead")
def main(cfg: DictConfig) -> None:
    startup = startup_times(cfg.startup_repeats)
    summary(f"Start-up, median of {cfg.startup_repeats} processes", {name: f"{seconds:.2f} s" for name, seconds in startup.items()})
    with tempfile.TemporaryDirectory() as tmp, open_dict(cfg):
        # Keep the benchmark's runs and checkpoints out of the project's store.
        cfg.tracking.uri = f"sqlite:///{Path(tmp, 'mlflow.db')}"
        cfg.tracking.artifact_location = str(Path(tmp, "artifacts"))
        cfg.paths.run_dir = tmp
        cfg.callbacks.early_stopping = None
        plain = plain_loop(cfg)
        lightning = lightning_loop(cfg)
    summary(
        f"Training-step overhead: {cfg.task.name} x {cfg.model.name}, batch {cfg.task.data.batch_size}, {cfg.steps} steps",
        {
            "plain PyTorch loop": f"{plain * 1000:.1f} ms/step",
            "Lightning + callbacks + MLflow": f"{lightning * 1000:.1f} ms/step",
            "overhead": f"{(lightning / plain - 1) * 100:+.1f} %",
        },
    )


if __name__ == "__main__":
    main()
