"""Serving a trained run: one MLflow pyfunc class for every task, and the registry alias that names the champion.

A run's network is wrapped with what its task needs to answer raw inputs (a `TaskPredictor` of
rnnlab.predictors: the tokenizer and vocabulary for sentiment, the character vocabulary for textgen,
the feature settings for speech, the scaler and lookback for forecasting) into an `RnnlabModel` pyfunc. `register_champion`
logs that pyfunc beside the run's network, registers it as a version of `rnnlab-<task>-<model>` and
points an alias (`champion`) at it, so that `rnnlab-predict`, `python -m rnnlab.generate` and
`mlflow models serve -m models:/rnnlab-<task>-<model>@champion` all load the same thing.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pytorch
import pandas as pd
import torch
from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.pyfunc import PyFuncModel
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

import rnnlab
from rnnlab import code_deps
from rnnlab.config import config_dir
from rnnlab.errors import ConfigError, DataError, RnnlabError
from rnnlab.predictors.base import TaskPredictor

SERVING_ARTIFACT = "serving_model"  # the pyfunc's name in the run (MLflow 3: a LoggedModel of the run)
NETWORK_ARTIFACT = "model"  # the network every training run logs (tracking.log_model)
PREDICTOR_FILE = "predictor.json"
SERVING_CODE = "rnnlab.serving_code"  # the pyfunc's code (MLflow's models from code)
SERVING_TAG = "rnnlab.serving"  # on the registered version: which of the run's models it is
PROGRESS_BAR = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
MAKE_CHAMPION = "`dvc repro compare` or `python -m rnnlab.compare`"
# Where the predictors lived before rnnlab.predictors: the class that models registered then (predictor.json)
# and the configs their runs logged (task.predictor._target_) still name.
MOVED_PREDICTORS = {
    "rnnlab.data.sentiment.ReviewPredictor": "rnnlab.predictors.sentiment.ReviewPredictor",
    "rnnlab.data.textgen.PromptPredictor": "rnnlab.predictors.textgen.PromptPredictor",
    "rnnlab.data.speech.ClipPredictor": "rnnlab.predictors.speech.ClipPredictor",
    "rnnlab.data.forecast.SeriesPredictor": "rnnlab.predictors.forecast.SeriesPredictor",
}


class InvalidRequest(MlflowException, DataError):
    """A request the predictor refused: an MlflowException, so that `mlflow models serve` answers 400 with
    the message, and a DataError, so that rnnlab's commands print it and exit with code 2."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


class RnnlabModel(mlflow.pyfunc.PythonModel):
    """The MLflow pyfunc of every rnnlab task: the run's network plus its task's TaskPredictor.

    Artifacts: `network`, the run's MLflow PyTorch model; `predictor`, predictor.json with the
    predictor's class, its state and the run it belongs to (task, model, run_id).
    """

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        info = json.loads(Path(context.artifacts["predictor"]).read_text())
        self.info = {key: info[key] for key in ("task", "model", "run_id", "class")}
        self.predictor = predictor_class(info["class"])(**info["state"])
        self.net = mlflow.pytorch.load_model(context.artifacts["network"], map_location="cpu").eval()

    @property
    def task(self) -> str:
        return self.info["task"]

    def predict(
        self, context: mlflow.pyfunc.PythonModelContext, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        merged = {**self.predictor.default_params, **(params or {})}
        try:
            with torch.no_grad():
                return self.predictor.predict(self.net, model_input, merged)
        except InvalidRequest:
            raise
        except RnnlabError as err:
            raise InvalidRequest(str(err)) from err


def predictor_class(path: str) -> type[TaskPredictor]:
    """The TaskPredictor subclass at the dotted `path` (imported, never evaluated); a predictor's old path
    (MOVED_PREDICTORS) names its new home."""
    path = MOVED_PREDICTORS.get(str(path), str(path))
    module_name, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(f"task.predictor._target_={path!r} cannot be imported ({err}); name a TaskPredictor subclass.") from err
    if not (isinstance(cls, type) and issubclass(cls, TaskPredictor)):
        raise ConfigError(f"task.predictor._target_={path!r} is not a subclass of rnnlab.predictors.base.TaskPredictor.")
    return cls


def _task_file_predictor(task: str) -> str | None:
    """`predictor._target_` of conf/task/<task>.yaml or of the task configs it extends (its defaults list)."""
    path = config_dir() / "task" / f"{task}.yaml"
    if not path.is_file():
        return None
    conf = OmegaConf.load(path)
    target = OmegaConf.select(conf, "predictor._target_")
    if target:
        return str(target)
    parents = [entry for entry in conf.get("defaults", []) if isinstance(entry, str) and entry != "_self_"]
    return next((found for parent in parents if (found := _task_file_predictor(parent))), None)


def predictor_for(cfg: DictConfig) -> TaskPredictor:
    """The TaskPredictor of a run's resolved config. Runs trained before task configs named their predictor
    get the one the task's config names now (read from conf/task/, as train.py would compose it)."""
    target = OmegaConf.select(cfg, "task.predictor._target_") or _task_file_predictor(cfg.task.name)
    if not target:
        raise ConfigError(
            f"task {cfg.task.name!r} names no predictor: add `predictor: {{_target_: <TaskPredictor subclass>}}` "
            f"to conf/task/{cfg.task.name}.yaml."
        )
    return predictor_class(target).from_config(cfg)


def run_config(client: MlflowClient, run_id: str) -> DictConfig:
    """The resolved config a training run logged as config.yaml."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run_id, "config.yaml", tmp)
        except (MlflowException, OSError) as err:
            raise DataError(f"run {run_id} has no config.yaml artifact; only runs of `python -m rnnlab.train` can be served.") from err
        return OmegaConf.load(path)


def serving_requirements(cfg: DictConfig) -> list[str]:
    """The pinned packages a run's serving model needs: every third-party package imported by the code it runs
    (serving_code, the task's predictor, the classes of the pickled network), with all of rnnlab they import.
    rnnlab itself travels as code."""
    run_code = code_deps.named_modules(OmegaConf.to_container(cfg, resolve=False))
    return code_deps.requirements(code_deps.closure([SERVING_CODE, *run_code]))


def _serving_version(client: MlflowClient, registered_model: str, run_id: str) -> ModelVersion | None:
    """The version of `registered_model` made from `run_id`'s serving model, if there is one."""
    versions = client.search_model_versions(f"name = '{registered_model}' AND run_id = '{run_id}'")
    serving = [v for v in versions if v.tags.get(SERVING_TAG) == SERVING_ARTIFACT]
    return max(serving, key=lambda v: int(v.version)) if serving else None


def _ready_serving_model(client: MlflowClient, experiment_id: str, run_id: str) -> str | None:
    """The id of `run_id`'s READY serving model, left unregistered by a registration that failed after logging it."""
    models = client.search_logged_models([experiment_id], filter_string=f"source_run_id = '{run_id}' AND name = '{SERVING_ARTIFACT}'")
    ready = [m for m in models if m.status == LoggedModelStatus.READY]
    return max(ready, key=lambda m: m.creation_timestamp).model_id if ready else None


def _download_network(client: MlflowClient, run: Run, dst: str) -> str:
    """A local copy of the network the training run logged (its LoggedModel named `model`). Read through the
    client's store only: a `runs:/` URI would resolve through MLflow's global tracking URI instead."""
    run_id = run.info.run_id
    models = client.search_logged_models(
        [run.info.experiment_id], filter_string=f"source_run_id = '{run_id}' AND name = '{NETWORK_ARTIFACT}'"
    )
    ready = [m for m in models if m.status == LoggedModelStatus.READY]
    if not ready:
        raise DataError(
            f"run {run_id} ({run.info.run_name}) logged no network (`{NETWORK_ARTIFACT}`); only finished training runs can be served."
        )
    newest = max(ready, key=lambda m: m.creation_timestamp)
    return mlflow.artifacts.download_artifacts(artifact_uri=newest.artifact_location, dst_path=dst)


def log_serving_model(client: MlflowClient, run_id: str) -> str:
    """Log the run's network with its task's predictor as an RnnlabModel pyfunc into the run (a LoggedModel
    named serving_model) and return its model id. A failure marks the LoggedModel FAILED: nothing half-logged
    is ever READY."""
    run = client.get_run(run_id)
    cfg = run_config(client, run_id)
    predictor = predictor_for(cfg)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # MLflow hints, once per integer column, that integers cannot hold missing values. Twelve of them buried
        # compare's report; the predictors check their inputs themselves, with messages that name the fix.
        warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer", category=UserWarning)
        tmp = Path(tmp)
        network = _download_network(client, run, str(tmp / "download"))
        info = {"class": f"{type(predictor).__module__}.{type(predictor).__qualname__}", "task": cfg.task.name}
        info |= {"model": cfg.model.name, "run_id": run_id, "state": predictor.to_json()}
        (tmp / PREDICTOR_FILE).write_text(json.dumps(info))
        signature, example = None, None
        inputs = predictor.input_example()
        if inputs is not None:
            # The example's own prediction gives the output schema: what the model answers, checked before logging.
            net = mlflow.pytorch.load_model(network, map_location="cpu").eval()
            with torch.no_grad():
                outputs = predictor.predict(net, inputs, dict(predictor.default_params))
            params = dict(predictor.default_params) or None
            signature = infer_signature(inputs, outputs, params=params)
            example = (inputs, params) if params else inputs
        logged = client.create_logged_model(
            run.info.experiment_id, name=SERVING_ARTIFACT, source_run_id=run_id, tags={"task": cfg.task.name, "model": cfg.model.name}
        )
        try:
            mlflow.pyfunc.save_model(
                tmp / "pyfunc",
                python_model=str(code_deps.source_file(SERVING_CODE)),
                artifacts={"network": network, "predictor": str(tmp / PREDICTOR_FILE)},
                code_paths=[str(Path(rnnlab.__file__).parent)],  # the model loads where rnnlab is not installed
                signature=signature,
                input_example=example,
                pip_requirements=serving_requirements(cfg),
                mlflow_model=mlflow.models.Model(run_id=run_id, model_id=logged.model_id, artifact_path=SERVING_ARTIFACT),
            )
            client.log_model_artifacts(logged.model_id, str(tmp / "pyfunc"))
            client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
        except BaseException:
            client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
            raise
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    return logged.model_id


def register_champion(client: MlflowClient, run_id: str, registered_model: str, alias: str) -> ModelVersion:
    """Log the run's network (its `model` artifact) with the task's predictor state as an RnnlabModel
    pyfunc into the run (artifact path `serving_model`), register it as a new version of
    `registered_model`, and point `alias` at that version. Idempotent: if a version of
    registered_model already comes from run_id's serving_model, only the alias moves to it."""
    with _mlflow_settings(client.tracking_uri):
        return _register_champion(client, run_id, registered_model, alias)


@contextlib.contextmanager
def _mlflow_settings(uri: str) -> Iterator[None]:
    """For the block, MLflow's global tracking URI is `uri`: the registry resolves a `models:/<id>` source through
    it, whatever the client's own URI (mlflow/store/model_registry/sqlalchemy_store.py). And no per-file download
    bars: they would bury the caller's output (compare's report)."""
    previous = mlflow.get_tracking_uri()
    progress = os.environ.get(PROGRESS_BAR)
    mlflow.set_tracking_uri(uri)
    os.environ[PROGRESS_BAR] = "false"
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
        if progress is None:
            os.environ.pop(PROGRESS_BAR, None)
        else:
            os.environ[PROGRESS_BAR] = progress


def _register_champion(client: MlflowClient, run_id: str, registered_model: str, alias: str) -> ModelVersion:
    existing = _serving_version(client, registered_model, run_id)
    if existing is None:
        try:
            run = client.get_run(run_id)
        except MlflowException as err:
            raise DataError(f"no MLflow run {run_id} in {client.tracking_uri}.") from err
        model_id = _ready_serving_model(client, run.info.experiment_id, run_id) or log_serving_model(client, run_id)
        try:
            client.create_registered_model(registered_model)
        except MlflowException as err:  # the usual case: every training run registered its network under this name
            if err.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise
        existing = client.create_model_version(
            registered_model, f"models:/{model_id}", run_id=run_id, model_id=model_id, tags={SERVING_TAG: SERVING_ARTIFACT}
        )
    client.set_registered_model_alias(registered_model, alias, existing.version)
    return client.get_model_version(registered_model, existing.version)


def describe_registered(client: MlflowClient, registered_model: str) -> str:
    """What the registry holds under `registered_model` (versions and aliases) or, if nothing, the names it does hold."""
    try:
        model = client.get_registered_model(registered_model)
    except MlflowException:
        prefix = registered_model.rsplit("-", 1)[0]
        names = sorted(m.name for m in client.search_registered_models(f"name LIKE '{prefix}-%'"))
        held = f"registered models of this task: {', '.join(names)}" if names else "no registered model of this task"
        return f"{registered_model} is not registered ({held})"
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{registered_model}'"))
    aliases = ", ".join(f"@{alias} -> v{number}" for alias, number in sorted(model.aliases.items())) or "none"
    return f"{registered_model} has versions {', '.join(map(str, versions)) or 'none'} and aliases {aliases}"


def load_served(model_uri: str, tracking_uri: str) -> tuple[PyFuncModel, RnnlabModel]:
    """The pyfunc at `model_uri` and the RnnlabModel inside it. A missing model or alias, or a model that is
    not an rnnlab serving model, raises DataError saying what the registry holds and how to make a champion."""
    mlflow.set_tracking_uri(tracking_uri)
    try:
        model = mlflow.pyfunc.load_model(model_uri)
    except MlflowException as err:
        held = ""
        if model_uri.startswith("models:/"):
            name = model_uri.removeprefix("models:/").split("@")[0].split("/")[0]
            held = f" {describe_registered(MlflowClient(tracking_uri), name)}."
        raise DataError(
            f"cannot load {model_uri} from {tracking_uri} ({err.message.splitlines()[0]}).{held} "
            f"Make a champion with {MAKE_CHAMPION}, or name an existing version with --model-uri models:/<name>/<version>."
        ) from err
    try:
        served = model.unwrap_python_model()
    except MlflowException:
        served = None
    if not isinstance(served, RnnlabModel):
        raise DataError(
            f"{model_uri} is not an rnnlab serving model (flavors: {', '.join(model.metadata.flavors)}): it is a training run's "
            f"bare network. Serve a version made by register_champion, e.g. the champion ({MAKE_CHAMPION})."
        )
    return model, served
