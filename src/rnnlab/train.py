"""Train, test and track one (task, model, seed): `python -m rnnlab.train task=sentiment model=lstm`.

Hydra composes the run from conf/; Lightning trains; MLflow records the run and
registers the model; the metrics file and best checkpoint are the DVC outputs.
"""

from __future__ import annotations

import shutil
import time
import warnings
from pathlib import Path

import lightning as L
import pandas as pd
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from rnnlab import io, search, tracking
from rnnlab.callbacks import EpochHistory
from rnnlab.config import hydra_entry
from rnnlab.console import summary
from rnnlab.data.base import SplitTensorDataModule
from rnnlab.models.encoder import count_parameters
from rnnlab.models.lit import RecurrentModule

# Noise from Lightning's own internals on torch 2.11; nothing a user can act on.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")


def build(cfg: DictConfig) -> tuple[SplitTensorDataModule, RecurrentModule]:
    """The task's DataModule and the LightningModule sized to its data."""
    datamodule = instantiate(cfg.task.data)
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


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit, test on the best checkpoint, log everything, and write the DVC outputs.

    As a trial of a hyperparameter search (search.trial set), fit only: the trial reports its
    validation metric each epoch and may be pruned; the test set stays unseen.
    """
    L.seed_everything(cfg.seed, workers=True)
    trial = search.open_trial(cfg)
    # A fresh run must not pick up (or be confused by) a previous run's checkpoints.
    for stale in ("checkpoints", "figures"):
        shutil.rmtree(Path(cfg.paths.run_dir, stale), ignore_errors=True)
    datamodule, module = build(cfg)
    n_params = count_parameters(module.net)
    history = EpochHistory()
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None]
    logger = tracking.make_logger(cfg)
    if trial is not None:
        from optuna_integration import PyTorchLightningPruningCallback

        callbacks.append(PyTorchLightningPruningCallback(trial, monitor=cfg.search.metric))
        trial.set_user_attr(search.RUN_ID_ATTR, logger.run_id)
    trainer = instantiate(cfg.trainer, logger=logger, callbacks=[*callbacks, history], default_root_dir=cfg.paths.run_dir)
    tracking.log_config(logger, cfg)
    logger.log_metrics({"n_params": n_params})
    try:
        started = time.perf_counter()
        trainer.fit(module, datamodule=datamodule)
        train_seconds = time.perf_counter() - started
        if trial is not None:
            logger.finalize("success")
            return {"train_seconds": round(train_seconds, 2), "epochs": len(history.rows)}
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        tested = trainer.test(module, datamodule=datamodule, ckpt_path=best or None, weights_only=True, verbose=False)[0]
        metrics = {
            **{key: float(value) for key, value in tested.items()},
            "n_params": n_params,
            "train_seconds": round(train_seconds, 2),
            "seconds_per_epoch": round(history.seconds_per_epoch, 2),
            "epochs": len(history.rows),
        }
        logger.log_metrics({"train_seconds": metrics["train_seconds"], "seconds_per_epoch": metrics["seconds_per_epoch"]})
        if best:
            module = type(module).load_from_checkpoint(best, weights_only=True)
        tracking.log_model(logger, module.net, cfg.tracking.registered_model)
        _write_outputs(cfg, metrics, history, best)
    except BaseException:
        logger.finalize("failed")
        raise
    logger.finalize("success")
    summary(
        f"{cfg.task.name} x {cfg.model.name} (seed {cfg.seed}, profile {cfg.profile_name})",
        {
            **{k: f"{v:.4f}" for k, v in metrics.items() if k.startswith("test_")},
            "parameters": f"{n_params:,}",
            "train time": f"{train_seconds:.1f} s ({metrics['epochs']} epochs)",
            "metrics": cfg.paths.metrics_file,
            "model": cfg.paths.model_dir,
            "MLflow run": f"{cfg.tracking.experiment} / {cfg.tracking.run_name} ({logger.run_id})",
        },
    )
    return metrics


def _write_outputs(cfg: DictConfig, metrics: dict[str, float], history: EpochHistory, best_checkpoint: str) -> None:
    """Write the DVC outputs, each atomically, the metrics file last."""
    with io.atomic_dir(cfg.paths.model_dir) as tmp:
        if best_checkpoint:
            shutil.copy2(best_checkpoint, tmp / "model.ckpt")
        (tmp / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    with io.atomic_path(cfg.paths.history_file) as tmp:
        pd.DataFrame(history.rows).to_csv(tmp, index=False)
    with io.atomic_dir(cfg.paths.plots_dir) as tmp:
        for figure in tracking.figures_dir(cfg.paths.run_dir).glob("*.png"):
            shutil.copy2(figure, tmp / figure.name)
    io.write_json(cfg.paths.metrics_file, metrics)


@hydra_entry
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
