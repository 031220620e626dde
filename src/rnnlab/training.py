"""Train, test and track one (task, model, seed): what `python -m rnnlab.train` runs once Hydra has composed its config.

Lightning trains; MLflow records the run and registers the model; the metrics file and best checkpoint are the DVC
outputs. The command itself is rnnlab.train, which imports this module (torch, Lightning, MLflow: seconds) only after
composing the config.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import shlex
import shutil
import signal
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import pandas as pd
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from rnnlab import io, run_paths, streams, tracking, validation
from rnnlab.callbacks import EpochHistory, FiniteLoss, InferenceCost, NoiseStream, ResumeState, StopOnSignal
from rnnlab.console import summary
from rnnlab.data.base import SplitTensorDataModule
from rnnlab.errors import ConfigError, TrainingError
from rnnlab.models.encoder import check_encoder_settings, count_parameters
from rnnlab.models.lit import RecurrentModule

# Noise from Lightning's own internals on torch 2.11; nothing a user can act on.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
# A resumed run's checkpoint directory holds its earlier epochs, as it should; a fresh run empties it first.
warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
# Lightning advertises its hosted logger (litlogger) at every run's start; rnnlab tracks in MLflow. Its notices go to
# the standalone pytorch_lightning's logger instead once a process has imported it (mlflow.pytorch does).
for notices in ("lightning.pytorch.utilities.rank_zero", "pytorch_lightning.utilities.rank_zero"):
    logging.getLogger(notices).addFilter(lambda record: "litlogger" not in record.getMessage())


def build(cfg: DictConfig) -> tuple[SplitTensorDataModule, RecurrentModule]:
    """The task's DataModule and the LightningModule sized to its data, initialised from the run's weights stream."""
    datamodule = instantiate(cfg.task.data, seed=cfg.seed, task=cfg.task.name)
    torch.manual_seed(streams.stream_seed(cfg.seed, streams.WEIGHTS))
    front_end = {**OmegaConf.to_container(cfg.task.front_end, resolve=True), **datamodule.front_end_dims}
    module = instantiate(
        cfg.task.module,
        front_end=front_end,
        encoder=OmegaConf.to_container(cfg.model.encoder, resolve=True),
        optimizer=OmegaConf.to_container(cfg.optimizer, resolve=True),
        scheduler=OmegaConf.to_container(cfg.scheduler, resolve=True),
        **datamodule.head_dims,
        _recursive_=False,
        _convert_="all",
    )
    return datamodule, module


class RunInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped a run; `exit_code` is the shell's convention, 128 + the signal number."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


# A folder that cannot take what a run writes: full, over quota, read-only or not ours.
WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


@contextlib.contextmanager
def _writable(cfg: DictConfig, when: str, where: str) -> Iterator[None]:
    """A full, read-only or forbidden folder met `when` (checkpoints, figures, MLflow artifacts) as one line that names
    the file and the fix: `where`, the settings that point at the folders the step writes."""
    try:
        yield
    except OSError as err:
        if err.errno not in WRITE_ERRORS:
            raise
        raise ConfigError(
            f"cannot write {err.filename or 'into ' + cfg.paths.run_dir} ({err.strerror}) {when}; free space there, or point "
            f"{where} at writable folders with free space."
        ) from None


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit, test on the best checkpoint, log everything, and write the DVC outputs.

    As a trial of a hyperparameter search (search.trial set), fit only: the trial reports its
    validation metric each epoch and may be pruned; the test set stays unseen; `objective` is the
    best value it reported.

    SIGINT and SIGTERM stop a run alike (RunInterrupted): its MLflow run is marked KILLED, no DVC
    output is written, and `resume=true` continues it from <run_dir>/checkpoints/last.ckpt, the
    end of its last finished epoch. Under DDP the main process tests, logs and writes the outputs;
    the others return {} after fitting.
    """
    stop = StopOnSignal()
    with stop.installed(), contextlib.ExitStack() as trial_scope:  # a search trial's heartbeat lasts while this run does
        try:
            return _train(cfg, stop, trial_scope)
        except BaseException:
            if not stop.received:
                raise
            raise RunInterrupted(stop.received[0], _interrupted_message(cfg, stop.received[0])) from None


def _train(cfg: DictConfig, stop: StopOnSignal, trial_scope: contextlib.ExitStack) -> dict[str, float]:
    validation.check_run_config(cfg)  # before any data is read or MLflow run created
    check_encoder_settings(cfg.model.encoder)
    if HydraConfig.initialized():
        validation.check_overrides(list(HydraConfig.get().overrides.task), cfg.task.name, cfg)
    run_paths.resolve_paths(cfg)
    run_paths.check_outputs(cfg)
    L.seed_everything(cfg.seed, workers=True)
    trial = _open_trial(cfg, trial_scope)
    resume_from = _resume_checkpoint(cfg)
    run_paths.claim_run_dir(cfg)
    if resume_from is None:
        _clear_run_dir(cfg)
    datamodule, module = build(cfg)
    n_params = count_parameters(module.net)
    width = module.net.encoder.hidden_size  # differs from model.encoder.hidden_size under match_params
    history = EpochHistory()
    cost = InferenceCost()
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None]
    stop.check()  # before an MLflow run exists
    run_id = ResumeState.mlflow_run_of(resume_from) if resume_from else None
    if run_id is not None:
        tracking.check_resumable(cfg, run_id)
    logger = tracking.make_logger(cfg, run_id=run_id)
    try:
        if trial is not None and cfg.search.cost is None:  # a study of two objectives takes no per-epoch reports
            from optuna_integration import PyTorchLightningPruningCallback

            callbacks.append(PyTorchLightningPruningCallback(trial, monitor=cfg.search.metric))
        if trial is not None:
            from rnnlab.trial import RUN_ID_ATTR

            trial.set_user_attr(RUN_ID_ATTR, logger.run_id)
        callbacks += [history, NoiseStream(cfg.seed), ResumeState(), FiniteLoss(), cost, stop]
        try:
            trainer = instantiate(cfg.trainer, logger=logger, callbacks=callbacks, default_root_dir=cfg.paths.run_dir)
        except InstantiationException as err:  # Hydra's wrapper around Lightning's refusal (enable_checkpointing=false
            if not isinstance(err.__cause__, MisconfigurationException):  # with a checkpoint callback, say)
                raise
            raise ConfigError(f"Lightning refused the trainer settings: {err.__cause__}") from None
        _check_launch(trainer)
        tracking.log_config(logger, cfg)
        if resume_from is None:
            logger.log_metrics({"n_params": n_params, "hidden_size": width})
        started = time.perf_counter()
        try:
            with _writable(cfg, "while training", "paths.run_dir (checkpoints) and tracking.artifact_location"):
                trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from, weights_only=True)
        except MisconfigurationException as err:  # Lightning's own refusal of a setting: its message names the fix
            raise ConfigError(f"Lightning refused the trainer settings: {err}") from None
        except RuntimeError as err:
            if "conditioned on metric" not in str(err):
                raise
            # EarlyStopping's monitor is checked only after the first validation; its message lists what was logged.
            raise ConfigError(f"callbacks.early_stopping.monitor names no logged metric: {' '.join(str(err).split())}") from None
        train_seconds = time.perf_counter() - started
        if trainer.global_step == 0:
            raise TrainingError(
                "the run made no optimizer step (an empty training split, or trainer limits such as limit_train_batches or "
                "max_steps that leave nothing to train): nothing it records would be a trained model. Check task.data.limit_train "
                "and the trainer.* overrides."
            )
        if trial is not None:
            from rnnlab.trial import best_in_history, trial_objective

            logger.finalize("success")
            if cfg.search.cost is None:
                objective = trial_objective(trial)
            else:  # search.cost names n_params, the one cost (resolved before any trial by the sweeper's checks)
                objective = (best_in_history(history.rows, cfg.search.metric, cfg.search.direction), n_params)
            return {"train_seconds": round(train_seconds, 2), "epochs": len(history.rows), "objective": objective}
        stop.check()  # a signal after the last batch
        tester = _tester(cfg, trainer, [cost, stop])
        if tester is None:
            return {}
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if best:  # the best epoch's weights alone: test(ckpt_path=...) would also roll the callbacks back to that epoch
            module = type(module).load_from_checkpoint(best, weights_only=True)
        with _writable(cfg, "while testing", "paths.run_dir (figures) and tracking.artifact_location"):
            tested = tester.test(module, datamodule=datamodule, verbose=False)[0]
            predictions = test_predictions(datamodule, module).to_csv(index=False, float_format="%.6g")
            logger.experiment.log_text(logger.run_id, predictions, tracking.PREDICTIONS_ARTIFACT)
        metrics = {
            **{key: float(value) for key, value in tested.items()},
            "n_params": n_params,
            "hidden_size": width,
            "train_seconds": round(train_seconds, 2),
            "seconds_per_epoch": round(history.seconds_per_epoch, 2),
            "epochs": len(history.rows),
            **cost.metrics,
        }
        logger.log_metrics({key: metrics[key] for key in ("train_seconds", "seconds_per_epoch", *cost.metrics)})
        with _writable(cfg, "while logging the model", "tracking.artifact_location"):
            model_uri = tracking.log_model(logger, module.net)
        stop.check()
        _publish(cfg, {**metrics, "mlflow_run_id": logger.run_id}, history, predictions, best, model_uri, stop)
    except BaseException:
        logger.finalize("KILLED" if stop.received else "failed")
        raise
    logger.finalize("success")
    summary(
        f"{cfg.task.name} x {cfg.model.name} (seed {cfg.seed}, profile {cfg.profile_name})",
        {
            **{k: f"{v:.4f}" for k, v in metrics.items() if k.startswith("test_")},
            "parameters": f"{n_params:,} (width {width})",
            "train time": f"{train_seconds:.1f} s ({metrics['epochs']} epochs)",
            "inference": f"{metrics['latency_ms_per_sequence']:.3g} ms per sequence, peak memory {metrics['peak_memory_mb']:,.0f} MB",
            "metrics": cfg.paths.metrics_file,
            "model": cfg.paths.model_dir,
            "MLflow run": f"{cfg.tracking.experiment} / {cfg.tracking.run_name} ({logger.run_id})",
        },
    )
    return metrics


def _open_trial(cfg: DictConfig, scope: contextlib.ExitStack) -> Any:
    """The Optuna trial a search's training job runs; None outside a search, which then never imports Optuna."""
    if cfg.search.trial is None:
        return None
    from rnnlab.trial import open_trial

    return open_trial(cfg, scope)


def _last_checkpoint(cfg: DictConfig) -> Path | None:
    """Where the checkpoint callback keeps the end of the latest epoch (what resume=true continues), if it does."""
    checkpoint = cfg.callbacks.get("checkpoint")
    if checkpoint is None or not checkpoint.get("save_last"):
        return None
    return Path(checkpoint.dirpath, ModelCheckpoint.CHECKPOINT_NAME_LAST + ModelCheckpoint.FILE_EXTENSION)


def _resume_checkpoint(cfg: DictConfig) -> Path | None:
    """The checkpoint resume=true continues from; None for a fresh run."""
    if not cfg.resume:
        return None
    if cfg.search.trial is not None:
        raise ConfigError("resume=true is for single runs: a search resumes when its command runs again (interrupted trials rerun).")
    path = _last_checkpoint(cfg)
    if path is None:
        raise ConfigError("resume=true needs callbacks.checkpoint with save_last: true, which keeps the checkpoint a run resumes from.")
    if not path.is_file():
        raise ConfigError(
            f"resume=true, but there is no checkpoint to resume at {path}: no run with this config (run dir {cfg.paths.run_dir}) "
            "finished an epoch. Start it without resume=true."
        )
    return path


@rank_zero_only
def _clear_run_dir(cfg: DictConfig) -> None:
    run_paths.clear_run_dir(cfg)


def _check_launch(trainer: L.Trainer) -> None:
    """Refuse multi-process training that Lightning would launch from a Hydra multirun: its launcher
    re-runs the command line in each new process, which would start the whole sweep again there."""
    environment = getattr(trainer.strategy, "cluster_environment", None)
    spawns = trainer.world_size > 1 and environment is not None and not environment.creates_processes_externally
    if spawns and HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        raise ConfigError(
            f"trainer.devices={trainer.num_devices} with -m (multirun): Lightning would start each sweep again in every process. "
            "Run multi-process training as single runs (no -m), or through a cluster launcher (hydra/launcher=slurm)."
        )


def _tester(cfg: DictConfig, trainer: L.Trainer, callbacks: list[L.Callback]) -> L.Trainer | None:
    """The trainer that tests the model: the fit's own on one device. After multi-process training, a
    one-device trainer in the main process (with `callbacks`), as Lightning advises: a DistributedSampler repeats examples
    to even out the shards, and a loss logged without syncing would be one process's. None elsewhere."""
    if trainer.world_size == 1:
        return trainer
    torch.distributed.destroy_process_group()  # the test must not wait on processes that are done
    if not trainer.is_global_zero:
        return None
    single = {**OmegaConf.to_container(cfg.trainer, resolve=True), "strategy": "auto", "devices": 1, "num_nodes": 1}
    return instantiate(single, logger=trainer.logger, callbacks=callbacks, default_root_dir=cfg.paths.run_dir)


def _interrupted_message(cfg: DictConfig, signum: int) -> str:
    name = signal.Signals(signum).name
    if cfg.search.trial is not None:
        return f"interrupted by {name}; this search trial runs again when the search command runs again."
    checkpoint = _last_checkpoint(cfg)
    if checkpoint is None or not checkpoint.is_file():
        return f"interrupted by {name} before an epoch finished; nothing to resume, run the command again."
    overrides = HydraConfig.get().overrides.task if HydraConfig.initialized() else ["<the same overrides>"]
    command = shlex.join(["python", "-m", "rnnlab.train", *(o for o in overrides if not o.startswith("resume=")), "resume=true"])
    return f"interrupted by {name}; MLflow run marked KILLED, no outputs written. Resume from {checkpoint} with: {command}"


def test_predictions(datamodule: SplitTensorDataModule, module: RecurrentModule) -> pd.DataFrame:
    """Per-example test outputs: each example's unit and group (from the data module), then what the model recorded."""
    units, outputs = datamodule.test_units(), module.test_predictions()
    if len(units) != outputs["example"].nunique():
        raise TrainingError(f"the test split has {len(units)} examples but the model recorded {outputs['example'].nunique()}.")
    return pd.concat([units.iloc[outputs["example"]].reset_index(drop=True), outputs.drop(columns="example")], axis=1)


def _publish(
    cfg: DictConfig,
    metrics: dict[str, float | str],
    history: EpochHistory,
    predictions: str,
    best_checkpoint: str,
    model_uri: str,
    stop: StopOnSignal,
) -> None:
    """Write every DVC output to a temporary path, register the model, then move the outputs into place: the model
    folder, history, test predictions, plots, the metrics file last. A failure or a signal on the way removes what this
    run staged and the version it registered, and puts back the earlier outputs it had replaced (io.publish), so that
    DVC and the registry see all of it or none."""
    version = None
    try:
        with contextlib.ExitStack() as staged:  # what is still staged when the block ends was not published: removed

            def stage(path: str, folder: bool = False) -> Path:
                tmp = io.staged_sibling(path, folder)
                staged.callback(io.remove, tmp)
                return tmp

            model_tmp, plots_tmp = stage(cfg.paths.model_dir, folder=True), stage(cfg.paths.plots_dir, folder=True)
            history_tmp, predictions_tmp = stage(cfg.paths.history_file), stage(cfg.paths.predictions_file)
            metrics_tmp = stage(cfg.paths.metrics_file)
            if best_checkpoint:
                shutil.copy2(best_checkpoint, model_tmp / "model.ckpt")
            (model_tmp / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
            pd.DataFrame(history.rows).to_csv(history_tmp, index=False)
            predictions_tmp.write_text(predictions)
            for figure in tracking.figures_dir(cfg.paths.run_dir).glob("*.png"):
                shutil.copy2(figure, plots_tmp / figure.name)
            metrics_tmp.write_text(io.json_text(metrics))
            version = tracking.register_model(cfg.tracking.uri, model_uri, cfg.tracking.registered_model)
            stop.check()  # the last point where a signal keeps every output unwritten
            io.publish(
                [
                    (model_tmp, Path(cfg.paths.model_dir)),
                    (history_tmp, Path(cfg.paths.history_file)),
                    (predictions_tmp, Path(cfg.paths.predictions_file)),
                    (plots_tmp, Path(cfg.paths.plots_dir)),
                    (metrics_tmp, Path(cfg.paths.metrics_file)),  # last: DVC reads a run as done by its metrics file
                ]
            )
    except BaseException as err:
        if version is not None:
            tracking.delete_version(cfg.tracking.uri, cfg.tracking.registered_model, version)
        if isinstance(err, OSError):  # a read-only or full folder, or a path through a file
            raise ConfigError(
                f"cannot write the run's outputs ({err.strerror or err}: {err.filename or ''}); point paths.model_dir, "
                "metrics_file, history_file, predictions_file and plots_dir at writable folders with free space. Nothing was published."
            ) from err
        raise
