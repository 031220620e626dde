"""MLflow tracking: one experiment per task, one run per (task, model, seed), a registered model."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib
from filelock import FileLock
from lightning import LightningModule
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf
from torch import nn

import rnnlab
from rnnlab import run_paths
from rnnlab.errors import ConfigError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

matplotlib.use("Agg")  # figures are files, never windows (torchmetrics draws with pyplot)


# Where a training run keeps its per-example test outputs in MLflow (the metrics folder's seed<seed>_predictions.csv).
PREDICTIONS_ARTIFACT = "test_predictions.csv"


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


def warm_up() -> None:
    """Pay MLflow's one-off costs of a run in advance: rnnlab.warm's server calls this once, and a smoke training
    forked from it then took 1.5 s instead of 3.5 s. The SQLite store's modules, mlflow.pytorch (which imports a
    second copy of Lightning) and the map of installed packages that MLflow checks a logged model's requirements against."""
    import mlflow.pytorch
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
    from mlflow.utils import requirements_utils

    requirements_utils._init_modules_to_packages_map()  # a cache MLflow fills on first use; no public way to fill it


class ContinuedRunLogger(MLFlowLogger):
    """An MLFlowLogger that continues a run (resume=true) and skips what the interrupted attempt already logged at a
    step (the learning rate at the start of the epoch it was stopped in, test metrics logged before a kill during model
    logging): the continued run's history is the one an uninterrupted run would have."""

    def __init__(self, *args: Any, run_id: str, **kwargs: Any) -> None:
        super().__init__(*args, run_id=run_id, **kwargs)
        client = self.experiment
        self._logged = {  # by the interrupted attempt only: Lightning itself logs `epoch` twice at an epoch's last step
            (key, metric.step) for key in client.get_run(run_id).data.metrics for metric in client.get_metric_history(run_id, key)
        }

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        fresh = {key: value for key, value in metrics.items() if (key, step or 0) not in self._logged}  # MLFlowLogger's step: step or 0
        if fresh:
            super().log_metrics(fresh, step)


def make_logger(cfg: DictConfig, run_id: str | None = None) -> MLFlowLogger:
    """A Lightning MLFlowLogger on the project's SQLite store (never the ./mlruns file store);
    with `run_id`, one that continues that run (resume=true)."""
    tags = {
        "task": cfg.task.name,
        "model": cfg.model.name,
        "seed": str(cfg.seed),
        "profile": cfg.profile_name,
        "git_commit": git_commit(cfg.paths.root),
    }
    if cfg.search.trial is not None:  # a trial of a hyperparameter search: nested under the study's run
        tags |= {"mlflow.parentRunId": cfg.search.parent_run_id, "optuna.study": cfg.search.study, "optuna.trial": str(cfg.search.trial)}
    if rank_zero_only.rank == 0:  # MLFlowLogger itself logs from rank zero only
        ensure_experiment(cfg.tracking)
    settings = {
        "experiment_name": cfg.tracking.experiment,
        "run_name": cfg.tracking.run_name,
        "tracking_uri": cfg.tracking.uri,
        "artifact_location": cfg.tracking.artifact_location,
        "tags": tags,
        "log_model": False,
    }
    if run_id is None:
        return MLFlowLogger(**settings)
    logger = ContinuedRunLogger(**settings, run_id=run_id)
    logger.experiment.update_run(run_id, status="RUNNING")  # it was KILLED when interrupted
    return logger


def ensure_experiment(tracking: DictConfig) -> str:
    """The id of the experiment `tracking.experiment`, created unless it exists. Two processes that start
    together on a new store both find it missing; the one that loses the race to create it uses the winner's."""
    client = open_store(tracking.uri)
    experiment = client.get_experiment_by_name(tracking.experiment)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(tracking.experiment, artifact_location=tracking.artifact_location)
    except MlflowException as err:
        if err.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
    return client.get_experiment_by_name(tracking.experiment).experiment_id


def log_config(logger: MLFlowLogger, cfg: DictConfig) -> None:
    """Log the resolved config once: flattened as parameters and whole as config.yaml."""
    resolved = _loggable(cfg)
    logger.log_hyperparams(resolved)
    logger.experiment.log_text(logger.run_id, OmegaConf.to_yaml(resolved), "config.yaml")


def check_resumable(cfg: DictConfig, run_id: str) -> None:
    """Refuse to resume `run_id` with settings other than those it started with: MLflow keeps one
    value per parameter, and a run whose epochs were trained two ways would misreport itself."""
    logged = open_store(cfg.tracking.uri).get_run(run_id).data.params
    params = _flatten(_loggable(cfg))
    changed = [f"{key} was {logged[key]}, now {value}" for key, value in params if logged.get(key, str(value)) != str(value)]
    if changed:
        raise ConfigError(
            f"resume=true continues MLflow run {run_id} with the settings it started with, but {'; '.join(changed)}. "
            "Resume with the interrupted run's overrides, or start a fresh run without resume=true."
        )


def _loggable(cfg: DictConfig) -> dict[str, Any]:
    # `resume` says how a run was started, not what it is: a resumed run logs its config again into the same run.
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved.pop("resume", None)
    return resolved


def _flatten(params: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(key, value) as MLFlowLogger.log_hyperparams logs them: nested keys joined by '/'."""
    for key, value in params.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}/")
        else:
            yield f"{prefix}{key}", value


@rank_zero_only
def log_model(logger: MLFlowLogger, net: nn.Module) -> str:
    """Log `net` to its run as an MLflow PyTorch model; its URI, for register_model once the run's outputs are ready.

    MLflow 3's default pt2 format needs a torch.export-able input signature, which
    recurrent nets with masks do not give; pickle with rnnlab's code bundled loads anywhere.
    """
    import mlflow.pytorch  # 0.3 s of imports that only this step needs

    mlflow.set_tracking_uri(logger._tracking_uri)
    # MLFlowLogger writes through MlflowClient; log_model needs the run active in the fluent API.
    with mlflow.start_run(run_id=logger.run_id):
        info = mlflow.pytorch.log_model(
            net.cpu(),
            name="model",
            serialization_format="pickle",
            code_paths=[str(Path(rnnlab.__file__).parent)],
            pip_requirements=_requirements(),
        )
    return info.model_uri


def register_model(uri: str, model_uri: str, registered_name: str) -> str:
    """Register a logged model as a new version of `registered_name` (created if new); the version number."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    return str(mlflow.register_model(model_uri, registered_name).version)


def delete_version(uri: str, registered_name: str, version: str) -> None:
    """Remove a version this run registered before it failed: the registry must not list an unfinished run's model."""
    open_store(uri).delete_model_version(registered_name, version)


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"torch=={version('torch').split('+')[0]}", f"hydra-core=={version('hydra-core')}"]


def save_figure(module: LightningModule, figure: Figure, name: str) -> Path:
    """Save a matplotlib figure as <run_dir>/figures/<name>.png and log it to the run in MLflow.

    train.py publishes the run's figures to plots/<task>/<model>/seed<seed>/ (a DVC plots directory).
    Under DDP only the main process writes it: the others would write the same file at once.
    """
    import matplotlib.pyplot as plt  # only runs that draw figures need it

    if name not in run_paths.FIGURES:  # how run_paths tells a run's plots folder from someone else's
        plt.close(figure)
        raise ValueError(f"figure {name!r} is not in rnnlab.run_paths.FIGURES; add its name there.")
    path = figures_dir(module.trainer.default_root_dir) / f"{name}.png"
    if not module.trainer.is_global_zero:
        plt.close(figure)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
    logger = module.logger
    if isinstance(logger, MLFlowLogger):
        logger.experiment.log_artifact(logger.run_id, str(path), "figures")
    return path


def figures_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "figures"
