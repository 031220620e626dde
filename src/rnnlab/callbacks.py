"""Lightning callbacks of rnnlab's own."""

from __future__ import annotations

import contextlib
import os
import pickle
import random
import resource
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import numpy as np
import psutil
import torch

from rnnlab import streams
from rnnlab.errors import ConfigError, TrainingError


class EpochHistory(L.Callback):
    """Collects the epoch-level train/val metrics and wall time, for the DVC plot and the summary."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []
        self._started = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        row = {"epoch": trainer.current_epoch, "seconds": time.perf_counter() - self._started}
        for key, value in sorted(trainer.callback_metrics.items()):
            if key.startswith(("train_", "val_")):
                row[key] = float(value)
        self.rows.append(row)

    # In the checkpoint, so that a resumed run's history holds the epochs before the interruption too.
    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.rows}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = list(state_dict["rows"])

    @property
    def seconds_per_epoch(self) -> float:
        return sum(r["seconds"] for r in self.rows) / max(len(self.rows), 1)


class InferenceCost(L.Callback):
    """What a model costs to use, measured while it is tested: the forward-pass latency per sequence and the
    peak memory of the run.

    Latency is the fastest of `repeats` forward passes over the first test batch, divided by the batch's
    sequences: the fastest pass is the one least disturbed by other work on the machine. Peak memory is
    the accelerator's peak allocation on a GPU, else the process's peak resident set (data, libraries and
    training included: what the run needed of the machine).
    """

    def __init__(self, repeats: int = 5) -> None:
        self.repeats = repeats
        self.latency_ms_per_sequence = float("nan")
        self.peak_memory_mb = float("nan")

    def on_test_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if batch_idx != 0:
            return
        inputs = batch[0]
        timings = []
        for _ in range(self.repeats):
            started = time.perf_counter()
            pl_module(inputs)
            if inputs.is_cuda:
                torch.cuda.synchronize(inputs.device)
            timings.append(time.perf_counter() - started)
        self.latency_ms_per_sequence = 1000 * min(timings) / len(inputs)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            self.peak_memory_mb = torch.cuda.max_memory_allocated(pl_module.device) / 2**20
        else:  # ru_maxrss is in kilobytes on Linux (bytes on macOS)
            scale = 2**20 if sys.platform == "darwin" else 2**10
            self.peak_memory_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale

    @property
    def metrics(self) -> dict[str, float]:
        return {"latency_ms_per_sequence": round(self.latency_ms_per_sequence, 4), "peak_memory_mb": round(self.peak_memory_mb, 1)}


# Set by rnnlab.warm in a run it forked: the process that asked for the run, which stands for this one's parents.
WARM_CLIENT = "RNNLAB_CLIENT_PID"


def _client_process() -> psutil.Process | None:
    """The rnnlab.warm client this run was forked for, if any (and still there)."""
    with contextlib.suppress(KeyError, ValueError, psutil.Error):
        return psutil.Process(int(os.environ[WARM_CLIENT]))
    return None


def _dvc_process() -> psutil.Process | None:
    """The `dvc` process this one runs under (through the shell that DVC starts a stage's command in, and the
    rnnlab.warm client if a warm server forked it), if found."""
    client = _client_process()
    for parent in [client, *client.parents()] if client else psutil.Process().parents():
        with contextlib.suppress(psutil.Error):
            if any(Path(part).name in ("dvc", "dvc.exe") or part == "dvc" for part in parent.cmdline()[:3]):
                return parent
    return None


def _cmdline(process: psutil.Process) -> list[str]:
    with contextlib.suppress(psutil.Error):
        return process.cmdline()
    return []


class NoiseStream(L.Callback):
    """Reseed torch's global generator, which dropout draws from, from the run's noise stream at the start of each
    training epoch (rnnlab.streams): the masks of an epoch depend on (seed, epoch) alone, not on how much randomness
    the model's initialisation or an earlier epoch consumed, and a resumed run draws what the uninterrupted one did."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        torch.manual_seed(streams.stream_seed(self.seed, streams.NOISE, trainer.current_epoch))


class ResumeState(L.Callback):
    """What a resumed run needs beyond Lightning's own checkpoint: the MLflow run to continue,
    and the random number generators as they were when the checkpoint was saved.

    rnnlab's own draws (data order, augmentation, dropout) restart from the run's streams each epoch
    (rnnlab.streams) and need no saved state; the generators are kept for anything else that draws from
    them (a user's callback or module), so that a resumed run ends with the metrics of the uninterrupted one.
    The states are restored before the resumed fit draws anything (callbacks load before the data loaders start).
    """

    mlflow_run_id: str | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.mlflow_run_id = getattr(trainer.logger, "run_id", None)

    def state_dict(self) -> dict[str, Any]:
        kind, keys, position, has_gauss, gauss = np.random.get_state()
        return {
            "mlflow_run_id": self.mlflow_run_id,
            # Tensors and tuples only, so the checkpoint stays loadable with weights_only=True.
            "rng": {
                "python": random.getstate(),
                "numpy": (kind, torch.from_numpy(keys.copy()), position, has_gauss, gauss),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        rng = state_dict["rng"]
        random.setstate(rng["python"])
        kind, keys, position, has_gauss, gauss = rng["numpy"]
        np.random.set_state((kind, keys.numpy(), position, has_gauss, gauss))
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    @classmethod
    def mlflow_run_of(cls, checkpoint: str | Path) -> str | None:
        """The MLflow run a checkpoint belongs to (read before the logger is made); a file that is not a checkpoint
        of a run is a ConfigError naming it."""
        try:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)["callbacks"].get(cls.__qualname__, {})
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, KeyError, TypeError, AttributeError) as err:
            raise ConfigError(
                f"{checkpoint} is not a readable checkpoint of a run ({type(err).__name__}: {str(err)[:200]}); it cannot be resumed. "
                "Delete it and start the run again without resume=true."
            ) from None
        return state.get("mlflow_run_id")


class FiniteLoss(L.Callback):
    """Stop with a TrainingError as soon as the training loss is NaN or infinite: every step after
    it would train on garbage, and early stopping would only end the run quietly, marked a success."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        bad = loss is not None and not bool(torch.isfinite(loss).all())
        # Decided together, so that under DDP every process stops at the same step rather than one hanging.
        if trainer.strategy.reduce_boolean_decision(bad, all=False):
            lr = trainer.optimizers[0].param_groups[0]["lr"]
            raise TrainingError(
                f"The training loss became {float(loss) if bad else 'non-finite on another process'} in epoch {trainer.current_epoch}, "
                f"step {trainer.global_step} (batch {batch_idx}). Lower the learning rate (optimizer.lr, now {lr:g}) or clip "
                f"gradients harder (trainer.gradient_clip_val, now {trainer.gradient_clip_val})."
            )


class StopOnSignal(L.Callback):
    """SIGINT and SIGTERM stop a run at the next safe point: the end of a batch, or a `check()` between
    the steps of train(), with a KeyboardInterrupt that Lightning turns into its on_exception hooks and
    an exit. Raised from the signal handler itself, it could land inside an MLflow write and leave that
    SQLite transaction holding the lock, and marking the run KILLED would then fail. A second signal
    stops at once, for a run stuck before its next safe point.

    Python's own SIGTERM ends a process with no cleanup at all (its MLflow run left RUNNING), and a
    process started with SIGINT ignored (a background job of a script) would not stop on it.

    A run that `dvc repro` started (DVC_STAGE set) also stops as for SIGTERM when that dvc process ends:
    DVC dies on SIGTERM without passing it on, and its training would otherwise run on and write outputs
    that dvc.lock never records.
    """

    def __init__(self) -> None:
        self.received: list[int] = []
        self._stopped = threading.Event()

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopOnSignal]:
        """The handlers, for the duration of a run (only the main thread may set them)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {signum: signal.signal(signum, self._received) for signum in (signal.SIGINT, signal.SIGTERM)}
        watched = [_dvc_process() if os.environ.get("DVC_STAGE") else None, _client_process()]
        for process in filter(None, watched):
            threading.Thread(target=self._watch, args=(process,), name=f"rnnlab-watch-{process.pid}", daemon=True).start()
        try:
            yield self
        finally:
            self._stopped.set()
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _watch(self, process: psutil.Process, every: float = 1.0) -> None:
        """Stop as for SIGTERM once `process` (the dvc that started this stage, or the rnnlab.warm client this run
        stands in for) has ended: nothing would then record what this run writes."""
        name = "dvc" if any("dvc" in Path(part).name for part in _cmdline(process)[:3]) else "the rnnlab.warm client"
        while not self._stopped.wait(every):
            with contextlib.suppress(psutil.Error):
                if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                    continue
            print(f"rnnlab: {name} (pid {process.pid}), which started this run, has ended: stopping as for SIGTERM.", file=sys.stderr)
            self.received.append(signal.SIGTERM)
            return

    def _received(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signum)
        if len(self.received) > 1:
            raise KeyboardInterrupt(signal.Signals(signum).name)

    def check(self) -> None:
        if self.received:
            raise KeyboardInterrupt(signal.Signals(self.received[0]).name)

    def on_train_batch_end(self, *args: Any) -> None:
        self.check()

    def on_validation_batch_end(self, *args: Any) -> None:
        self.check()

    def on_test_batch_end(self, *args: Any) -> None:
        self.check()
