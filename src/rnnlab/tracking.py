"""MLflow tracking: one experiment per task, one run per (task, model, seed), a registered model."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # figures are files, never windows
import matplotlib.pyplot as plt
import mlflow
import mlflow.pytorch
from filelock import FileLock
from lightning import LightningModule
from lightning.pytorch.loggers import MLFlowLogger
from matplotlib.figure import Figure
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf
from torch import nn

import rnnlab


def git_commit(root: str | Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def open_store(uri: str) -> MlflowClient:
    """An MlflowClient on `uri`. A new SQLite store is created under a file lock: two processes
    creating one at the same instant race in MLflow's schema migration (alembic), and one fails."""
    if not uri.startswith("sqlite:///"):
        return MlflowClient(tracking_uri=uri)
    database = Path(uri.removeprefix("sqlite:///"))
    database.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{database}.lock"):
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)  # creates and migrates the schema, if new
    return client


def make_logger(cfg: DictConfig) -> MLFlowLogger:
    """A Lightning MLFlowLogger on the project's SQLite store (never the ./mlruns file store)."""
    open_store(cfg.tracking.uri)
    tags = {
        "task": cfg.task.name,
        "model": cfg.model.name,
        "seed": str(cfg.seed),
        "profile": cfg.profile_name,
        "git_commit": git_commit(cfg.paths.root),
    }
    if cfg.search.trial is not None:  # a trial of a hyperparameter search: nested under the study's run
        tags |= {"mlflow.parentRunId": cfg.search.parent_run_id, "optuna.study": cfg.search.study, "optuna.trial": str(cfg.search.trial)}
    return MLFlowLogger(
        experiment_name=cfg.tracking.experiment,
        run_name=cfg.tracking.run_name,
        tracking_uri=cfg.tracking.uri,
        artifact_location=cfg.tracking.artifact_location,
        tags=tags,
        log_model=False,
    )


def log_config(logger: MLFlowLogger, cfg: DictConfig) -> None:
    """Log the resolved config once: flattened as parameters and whole as config.yaml."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    logger.log_hyperparams(resolved)
    logger.experiment.log_text(logger.run_id, OmegaConf.to_yaml(resolved), "config.yaml")


def log_model(logger: MLFlowLogger, net: nn.Module, registered_name: str) -> Any:
    """Log `net` as an MLflow PyTorch model and register it under `registered_name`.

    MLflow 3's default pt2 format needs a torch.export-able input signature, which
    recurrent nets with masks do not give; pickle with rnnlab's code bundled loads anywhere.
    """
    mlflow.set_tracking_uri(logger._tracking_uri)
    # MLFlowLogger writes through MlflowClient; log_model needs the run active in the fluent API.
    with mlflow.start_run(run_id=logger.run_id):
        return mlflow.pytorch.log_model(
            net.cpu(),
            name="model",
            registered_model_name=registered_name,
            serialization_format="pickle",
            code_paths=[str(Path(rnnlab.__file__).parent)],
            pip_requirements=_requirements(),
        )


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"torch=={version('torch').split('+')[0]}", f"hydra-core=={version('hydra-core')}"]


def save_figure(module: LightningModule, figure: Figure, name: str) -> Path:
    """Save a matplotlib figure as <run_dir>/figures/<name>.png and log it to the run in MLflow.

    train.py publishes the run's figures to plots/<task>/<model>/ (a DVC plots directory).
    """
    path = figures_dir(module.trainer.default_root_dir) / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
    logger = module.logger
    if isinstance(logger, MLFlowLogger):
        logger.experiment.log_artifact(logger.run_id, str(path), "figures")
    return path


def figures_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "figures"
