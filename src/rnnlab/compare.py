"""Compare the models of each task over seeds: `python -m rnnlab.compare` (the `compare` DVC stage).

Reads the finished training runs back from MLflow (experiment rnnlab-<task>, runs tagged task, model,
seed and profile), optionally only those of some seeds, and writes under reports/:

- comparison.md and comparison.json: per model the primary test metric as mean ± std over seeds with a
  Student t-interval, parameters, seconds per epoch, latency and memory where logged, and its champion
  (the run with the best validation value of the task's monitor metric); per pair of models (and each network
  against the task's strongest baseline, or every baseline) the paired inference of rnnlab.inference on the runs'
  per-example test outputs: bootstrap interval, test, Holm's correction, equivalence verdict, power; for
  forecasts, M4's sMAPE, MASE and OWA of every model and baseline;
- comparison_metrics.json: the numbers alone, nested task -> model -> value (a DVC metrics file);
- figures/*.png: learning curves, the metric with its CI, the metric against the parameter count, the
  champions' own figures fetched from their runs (confusion matrix, forecast) and text samples;
- curves/<task>.csv: the learning curves as data (epoch, one column per model; DVC plots).

Each champion's serving model is registered with the alias `champion_alias` (rnnlab.serving), and the
report's files are logged to one run of the experiment rnnlab-compare.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import matplotlib

matplotlib.use("Agg")  # figures are files, never windows
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator
from mlflow.entities import Run
from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, ListConfig, OmegaConf
from scipy import stats

from rnnlab import inference, io, resolve, serving, tracking
from rnnlab.baselines import written_baselines
from rnnlab.config import config_dir, hydra_entry
from rnnlab.console import summary
from rnnlab.errors import ConfigError, DataError
from rnnlab.validation import is_int

# Logged by training runs (width since model.encoder.match_params, the last two by runs that measure them),
# averaged over seeds: label and format in the report.
EXTRAS = {
    "n_params": ("parameters", ",.0f"),
    "hidden_size": ("width", ".0f"),
    "seconds_per_epoch": ("s / epoch", ".1f"),
    "latency_ms_per_sequence": ("latency ms / seq", ".3g"),
    "peak_memory_mb": ("peak MB", ".0f"),
}
SEARCH_TAGS = ("optuna.trial", "optuna.study")  # a search's trials and its study's parent run are not seeds of a model
FIGURES = ("learning_curves", "metric_ci", "metric_vs_params")
RUN_FIGURES = "figures"  # where a training run logs its PNGs (tracking.save_figure)
RUN_SAMPLES = "samples"  # where a language model logs a text sample per epoch, epochNN.txt
SAMPLE = re.compile(r"epoch(\d+)\.txt")
# MLflow's own rule for alias names (mlflow.utils.validation), checked before anything is written.
ALIAS = re.compile(r"[\w-]+")
RESERVED_ALIAS = re.compile(r"latest|[vV]\d+", re.IGNORECASE)


class TaskScores(NamedTuple):
    """What compare reads from one task's test outputs (task_scores)."""

    scores: dict[str, inference.Scores]  # per model and baseline: per-unit scores of the primary metric
    horizon: int | None  # a forecast task's steps ahead
    forecast_accuracy: dict[str, dict[str, float]] | None  # a forecast task's: per model and baseline, M4's measures


def choices(group: str, requested: Any) -> list[str]:
    """The requested names of a config group (conf/<group>/), checked; all of the group's names for null."""
    known = sorted(path.stem for path in (config_dir() / group).glob("*.yaml"))
    if requested is None:
        return known
    names = _names(requested)
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ConfigError(f"unknown {group} {', '.join(map(repr, unknown))}; known: {', '.join(known)} (conf/{group}/).")
    return names


def _names(requested: Any) -> list[str]:
    return [requested] if isinstance(requested, str) else [str(name) for name in requested]


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value) if isinstance(value, ListConfig | DictConfig) else value


def check_seeds(value: Any, where: str = "seeds", null: str = "every seed") -> list[int] | None:
    """The seeds to compare, sorted: None (what `null` says), one whole number or a non-empty list of them."""
    value = _plain(value)
    if value is None:
        return None
    seeds = value if isinstance(value, list) else [value]
    if not seeds or not all(is_int(seed) for seed in seeds):
        raise ConfigError(f"{where} must be null ({null}), a whole number or a list of them, e.g. seeds=[42,43,44]; got {value!r}.")
    return sorted(set(seeds))


def _params_file(cfg: DictConfig, key: str, needs: str) -> DictConfig:
    """The YAML file that `cfg[key]` names (relative to the project root), holding the top-level keys `needs` says."""
    path = Path(cfg.paths.root, cfg[key])  # an absolute path stays as it is
    try:
        params = OmegaConf.load(path)
    except (OSError, ValueError) as err:  # missing, or not YAML (yaml's errors are ValueErrors)
        raise ConfigError(f"{key}={cfg[key]}: cannot read {path} ({err}); name a YAML file with {needs}.") from err
    if not isinstance(params, DictConfig):
        raise ConfigError(f"{key}={cfg[key]}: {path} is not a YAML mapping with {needs}.")
    return params


# Per task, the seeds whose runs are compared; None: every seed of every task.
TaskSeeds = dict[str, list[int]] | None


def requested_seeds(cfg: DictConfig, tasks: list[str]) -> TaskSeeds:
    """Per task, `seeds`; or from the YAML file `seeds_from` (the DVC stage passes params.yaml: DVC cannot put a list
    into a command line) its `seeds`, and for the tasks of its `more_seeds_tasks` and `more_seeds_tuned` its `more_seeds` too."""
    if cfg.seeds_from is None:
        seeds = check_seeds(cfg.seeds)
        return None if seeds is None else {task: seeds for task in tasks}
    if cfg.seeds is not None:
        raise ConfigError(f"give seeds or seeds_from, not both (seeds={_plain(cfg.seeds)}, seeds_from={cfg.seeds_from}).")
    params = _params_file(cfg, "seeds_from", "a `seeds` list")
    if "seeds" not in params:
        raise ConfigError(f"seeds_from={cfg.seeds_from}: it has no top-level `seeds` list, e.g. `seeds: [42, 43, 44]`.")
    seeds = check_seeds(params.seeds, f"seeds in {cfg.seeds_from}")
    more = check_seeds(params.get("more_seeds") or None, f"more_seeds in {cfg.seeds_from}", "no more seeds") or []
    more_tasks = [*_task_list(params, "more_seeds_tasks", cfg.seeds_from), *_task_list(params, "more_seeds_tuned", cfg.seeds_from)]
    return {task: sorted(set(seeds) | set(more)) if task in more_tasks else seeds for task in tasks}


def _task_list(params: DictConfig, key: str, path: str) -> list[str]:
    tasks = _plain(params.get(key)) or []
    if not isinstance(tasks, list):
        raise ConfigError(f"{key} in {path} must be a list of tasks, e.g. [speech]; got {tasks!r}.")
    return tasks


# `<task>/<model>_tuned` -> the default model it equals, or None (resolve.tuned_default).
TunedDefaults = dict[str, str | None]


def tuned_as_default(cfg: DictConfig) -> TunedDefaults | None:
    """What rnnlab.resolve found for each tuned model of the pipeline, from the YAML file `tuned_as_default_from` (the DVC
    stage passes resolved/compare.yaml); None without one. build_report composes for any tuned model it does not list."""
    if cfg.tuned_as_default_from is None:
        return None
    needs = "`tuned_as_default` mapping of <task>/<model>_tuned to the default model it equals or null"
    found = _plain(_params_file(cfg, "tuned_as_default_from", f"a {needs}").get("tuned_as_default"))
    if not isinstance(found, dict) or not all(value is None or isinstance(value, str) for value in found.values()):
        raise ConfigError(
            f"tuned_as_default_from={cfg.tuned_as_default_from}: it has no {needs} (got {found!r}); run `python -m rnnlab.resolve` "
            "(or `dvc repro resolve`) to write resolved/compare.yaml, or leave tuned_as_default_from null."
        )
    return found


# Per task, the models to compare; or one list (or None: every model with runs) for every task.
TaskModels = dict[str, list[str]] | list[str] | None


def _models_of(models: TaskModels, task: str) -> list[str] | None:
    """The models `models` asks for on `task` (None: every model)."""
    return models.get(task, []) if isinstance(models, dict) else models


def requested_models(cfg: DictConfig, tasks: list[str]) -> TaskModels:
    """`models`, or per task the models a pipeline's params file trains (`models_from`): its `models` and
    `single_seed_models` on the tasks of `default_tasks` (if it has none: of its `tasks`, or every task) and
    `<model>_tuned` of each of `models` on the tasks of `tuned`, so that metrics files of models it no longer trains
    are not compared. A task it trains nothing on is left out, or refused if `tasks` names it."""
    if cfg.models_from is None:
        return None if cfg.models is None else _names(cfg.models)
    if cfg.models is not None:
        raise ConfigError(f"give models or models_from, not both (models={_plain(cfg.models)}, models_from={cfg.models_from}).")
    params = _params_file(cfg, "models_from", "`models` (and optionally `single_seed_models`, `tuned`, `default_tasks`)")
    if "models" not in params:
        raise ConfigError(f"models_from={cfg.models_from}: it has no top-level `models` list, e.g. `models: [gru, lstm, rnn]`.")
    defaults = [*params.models, *(params.get("single_seed_models") or [])]
    listed = next((key for key in ("default_tasks", "tasks") if key in params), None)
    default_tasks = _task_list(params, listed, cfg.models_from) if listed else tasks
    tuned_tasks = _task_list(params, "tuned", cfg.models_from)
    models = {
        task: [
            *(defaults if task in default_tasks else []),
            *([f"{model}_tuned" for model in params.models] if task in tuned_tasks else []),
        ]
        for task in tasks
    }
    untrained = [task for task, names in models.items() if not names]
    if untrained and cfg.tasks is not None:
        raise ConfigError(
            f"models_from={cfg.models_from} trains no model on {', '.join(untrained)} (neither its default_tasks nor its tuned "
            "lists it): leave it out of tasks, or compare given models (models=[...])."
        )
    return {task: names for task, names in models.items() if names}


def check_alias(alias: Any) -> str | None:
    """The champion alias, refused now if MLflow would refuse it after the report was drawn."""
    if alias is None:
        return None
    if not (isinstance(alias, str) and ALIAS.fullmatch(alias)) or RESERVED_ALIAS.fullmatch(str(alias)):
        raise ConfigError(
            f"champion_alias must be null (no alias) or a registered-model alias of letters, digits, _ and -, other than "
            f"'latest' and v<number> (MLflow reserves them), e.g. champion; got {alias!r}."
        )
    return alias


def _runs(client: MlflowClient, experiment_id: str, profile: str) -> Iterator[Run]:
    token = None
    while True:
        page = client.search_runs(
            [experiment_id], f"tags.profile = '{profile}' AND attributes.status = 'FINISHED'", max_results=1000, page_token=token
        )
        yield from page
        token = page.token
        if not token:
            return


def _run_row(task: str, run: Run) -> dict[str, Any] | None:
    """The report's row of a training run; None for a run that is not a training (a search's trial or study)."""
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    if any(tag in tags for tag in SEARCH_TAGS) or "model" not in tags or "seed" not in tags:
        return None
    # The run's own config says which metrics it was judged by and which direction is better.
    metric, monitor, mode = params.get("task/primary_metric"), params.get("task/monitor"), params.get("task/monitor_mode")
    if metric not in metrics or not monitor or mode not in ("min", "max"):
        raise DataError(
            f"run {run.info.run_id} ({run.info.run_name}) has no task/primary_metric with a logged value, task/monitor "
            "and task/monitor_mode parameters; only runs of `python -m rnnlab.train` can be compared."
        )
    run_info = {"model": tags["model"], "seed": int(tags["seed"]), "run_id": run.info.run_id, "run_name": run.info.run_name}
    margin = float(params.get("task/equivalence_margin", math.nan))
    test_set = params.get("task/test_set", "")  # what the test set is (task.test_set); runs of older rnnlab lack it
    logged = {"metric": metric, "monitor": monitor, "mode": mode, "value": metrics[metric], "margin": margin, "test_set": test_set}
    extras = {key: metrics.get(key, math.nan) for key in EXTRAS}
    return {"task": task, **run_info, "start_time": run.info.start_time, **logged, **extras}


RUN_COLUMNS = [
    *("task", "model", "seed", "run_id", "run_name", "start_time", "metric", "monitor", "mode", "value", "margin", "test_set"),
    *EXTRAS,
]


def load_runs(client: MlflowClient, tasks: list[str], profile: str) -> pd.DataFrame:
    """One row per (task, model, seed): its newest FINISHED training run of `profile`, search runs left out."""
    rows = []
    for task in tasks:
        experiment = client.get_experiment_by_name(f"rnnlab-{task}")
        for run in _runs(client, experiment.experiment_id, profile) if experiment else ():
            row = _run_row(task, run)
            if row is not None:
                rows.append(row)
    newest_first = pd.DataFrame(rows, columns=RUN_COLUMNS).sort_values("start_time", ascending=False)
    return newest_first.drop_duplicates(["task", "model", "seed"]).sort_values(["task", "model", "seed"]).reset_index(drop=True)


def load_pipeline_runs(
    client: MlflowClient, tasks: list[str], profile: str, metrics_dir: Path, models: TaskModels, seeds: TaskSeeds
) -> pd.DataFrame:
    """One row per metrics file <metrics_dir>/<task>/<model>/seed<seed>.json of the task's `models` and `seeds` (None:
    every model, every seed): the MLflow run it names (`mlflow_run_id`), which must be a FINISHED training run of
    `profile`. The files are what pipelines/*/dvc.lock record, so the report and DVC agree; files of other models or
    seeds (an earlier pipeline's, which DVC leaves in place when a stage leaves the pipeline) are not this pipeline's."""
    rows = []
    for task in tasks:
        names = _models_of(models, task)
        patterns = [
            f"{model}/seed{seed}.json"
            for model in (["*"] if names is None else names)
            for seed in (["*"] if seeds is None else seeds[task])
        ]
        for path in sorted({path for pattern in patterns for path in Path(metrics_dir, task).glob(pattern)}):
            rows.append(_named_run(client, task, path, profile))
    return pd.DataFrame(rows, columns=RUN_COLUMNS).sort_values(["task", "model", "seed"]).reset_index(drop=True)


def _named_run(client: MlflowClient, task: str, path: Path, profile: str) -> dict[str, Any]:
    rerun = "rerun its training (`dvc repro`), or compare the newest runs instead (runs=newest)"
    try:
        run_id = json.loads(path.read_text()).get("mlflow_run_id")
    except (OSError, ValueError, AttributeError) as err:
        raise DataError(f"{path} is not a metrics file ({err}); {rerun}.") from None
    if not isinstance(run_id, str):
        raise DataError(f"{path} names no MLflow run (mlflow_run_id): it was written by an older rnnlab; {rerun}.")
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise DataError(f"{path} names MLflow run {run_id}, which is not in this store; {rerun}.") from None
    if run.info.status != "FINISHED" or run.data.tags.get("profile") != profile:
        raise DataError(
            f"{path} names MLflow run {run_id} ({run.info.status}, profile {run.data.tags.get('profile')}), not a FINISHED run "
            f"of profile {profile!r}: compare that profile (profile=...) or {rerun}."
        )
    row = _run_row(task, run)
    if row is None:
        raise DataError(f"{path} names MLflow run {run_id}, a search trial, not a training run; {rerun}.")
    return row


def train_command(task: str, model: str, profile: str, seed: int | None = None) -> str:
    """The command that trains one run of `model` on `task`: a tuned model trains from its experiment config."""
    chosen = f"experiment={task}_{model}" if model.endswith("_tuned") else f"task={task} model={model}"
    return f"python -m rnnlab.train {chosen}{'' if seed is None else f' seed={seed}'} profile={profile}"


def select_runs(runs: pd.DataFrame, models: TaskModels, seeds: TaskSeeds, where: str, tasks: list[str], profile: str) -> pd.DataFrame:
    """The runs of the requested models (per task or for every task; null: every model with runs) and of each task's
    seeds (null: every seed) of `tasks`; each requested model and seed must have runs. `where` says in the errors which
    profile and store were searched."""

    def train(task: str, model: str, seed: int | None = None) -> str:
        if seed is None and seeds:
            seed = seeds.get(task, [None])[0]
        return f"`dvc repro`, or `{train_command(task, model, profile, seed)}` and likewise for each missing run"

    if runs.empty:
        model = (_models_of(models, tasks[0]) or ["gru"])[0]
        raise DataError(
            f"no FINISHED training runs {where} (search trials are not counted). Produce them with {train(tasks[0], model)}, "
            "or compare another profile (profile=...)."
        )
    found = sorted(runs["model"].unique())
    if isinstance(models, list):
        known = sorted(set(choices("model", None)) | set(found))  # trained models include configured variants such as gru_tuned
        unknown = [name for name in models if name not in known]
        if unknown:
            raise ConfigError(
                f"unknown model {', '.join(map(repr, unknown))}; known: {', '.join(known)} (conf/model/ and models with runs)."
            )
        missing = [name for name in models if name not in found]
        if missing:
            raise DataError(
                f"no FINISHED training runs of model {', '.join(missing)} {where}; models with runs: {', '.join(found)}. "
                f"Produce them with {train(tasks[0], missing[0])}."
            )
        runs = runs[runs["model"].isin(models)]
    elif models is not None:
        trained = runs.groupby("task")["model"].agg(set).to_dict()
        missing = [(task, model) for task, names in models.items() for model in names if model not in trained.get(task, ())]
        if missing:
            listed = ", ".join(f"{model} on {task}" for task, model in missing)
            raise DataError(f"no FINISHED training runs of {listed} {where}. Produce them with {train(*missing[0])}.")
        runs = runs[[model in models.get(task, ()) for task, model in zip(runs["task"], runs["model"], strict=True)]]
    if seeds is not None:
        have = sorted(int(seed) for seed in runs["seed"].unique())
        absent = [seed for seed in sorted(set().union(*seeds.values())) if seed not in have]
        if absent:
            task = next(task for task, wanted in seeds.items() if absent[0] in wanted)
            model = next(iter(runs.loc[runs["task"] == task, "model"]), found[0])
            raise DataError(
                f"seed {', '.join(map(str, absent))} has no FINISHED training runs {where}; the runs there have seeds "
                f"{', '.join(map(str, have))}. Compare those (e.g. seeds=[{','.join(map(str, have))}]) or produce the missing "
                f"ones with {train(task, str(model), absent[0])}."
            )
        runs = runs[[seed in seeds.get(task, ()) for task, seed in zip(runs["task"], runs["seed"], strict=True)]]
    return runs.reset_index(drop=True)


def per_epoch(client: MlflowClient, run_id: str, key: str) -> pd.DataFrame:
    """The run's history of metric `key` as columns step, value: one value per logged step, the latest where a
    resumed run logged a step twice."""
    history = pd.DataFrame(
        [(m.step, m.timestamp, m.value) for m in client.get_metric_history(run_id, key)], columns=["step", "timestamp", "value"]
    )
    return history.sort_values(["step", "timestamp"]).drop_duplicates("step", keep="last")[["step", "value"]].reset_index(drop=True)


def best_validation(client: MlflowClient, run: pd.Series) -> tuple[float, int]:
    """The best value of the run's monitor metric over its epochs and the (0-based) epoch that had it: the checkpoint
    train.py tested and registered. Lightning logs `epoch` at every step it logs metrics at; without it, the position."""
    history = per_epoch(client, run["run_id"], run["monitor"])
    if history.empty:
        raise DataError(
            f"run {run['run_id']} ({run['run_name']}) logged no {run['monitor']} history, so its best validation epoch is unknown; "
            "only runs of `python -m rnnlab.train` (which log it every epoch) can be compared. Delete the run in MLflow or "
            "leave its seed out (seeds=[...])."
        )
    best = int(history["value"].idxmax() if run["mode"] == "max" else history["value"].idxmin())  # the first of equal values
    epochs = per_epoch(client, run["run_id"], "epoch").set_index("step")["value"]
    step = history.loc[best, "step"]
    return float(history.loc[best, "value"]), int(epochs[step]) if step in epochs.index else best


def describe(values: np.ndarray, confidence: float) -> dict[str, Any]:
    """Mean, sample std and t-interval of the mean over seeds; std and interval are undefined for one seed."""
    mean = float(np.mean(values))
    if len(values) < 2:
        return {"mean": mean, "std": None, "ci": None}
    # t-quantile times the standard error; written out so that equal values give a zero-width interval, not NaN.
    half = float(stats.t.ppf((1 + confidence) / 2, len(values) - 1) * stats.sem(values))
    return {"mean": mean, "std": float(np.std(values, ddof=1)), "ci": [mean - half, mean + half]}


def run_predictions(client: MlflowClient, run: pd.Series, scratch: Path) -> pd.DataFrame:
    """The per-example test outputs a training run logged (rnnlab.train)."""
    if tracking.PREDICTIONS_ARTIFACT not in _artifacts(client, run["run_id"], ""):
        raise DataError(
            f"run {run['run_name']} ({run['run_id']}) has no {tracking.PREDICTIONS_ARTIFACT}: it was trained by an older rnnlab, "
            "and the paired tests need its per-example test outputs. Retrain it (`dvc repro`, or python -m rnnlab.train ...)."
        )
    return pd.read_csv(_download(client, run["run_id"], tracking.PREDICTIONS_ARTIFACT, scratch))


def forecast_accuracy(predictions: pd.DataFrame, scale: float) -> dict[str, float]:
    """M4's accuracy measures of the forecasts over every test origin and step ahead: sMAPE (in percent),
    MASE (`scale`: the series' MASE scale), and the MAE one step ahead (where persistence is hardest to beat)."""
    errors = (predictions["prediction"] - predictions["target"]).abs()
    # M4's sMAPE: 200 |error| / (|actual| + |forecast|), averaged; a 0/0 term (both zero) counts as 0.
    smape = (200 * errors / (predictions["target"].abs() + predictions["prediction"].abs())).fillna(0.0)
    first = predictions["horizon"] == 1
    return {"smape": float(smape.mean()), "mase": float(errors.mean() / scale), "mae_1": float(errors[first].mean())}


def with_owa(accuracy: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """`accuracy` with M4's overall weighted average, OWA = (sMAPE / Naive2's + MASE / Naive2's) / 2, where a naive2
    baseline was scored (below 1: better than Naive2)."""
    naive2 = accuracy.get("naive2")
    if naive2 is None:
        return accuracy
    return {
        name: {**values, "owa": (values["smape"] / naive2["smape"] + values["mase"] / naive2["mase"]) / 2}
        for name, values in accuracy.items()
    }


def task_scores(client: MlflowClient, task_runs: pd.DataFrame, baselines_dir: Path) -> TaskScores:
    """Per model of one task, and per baseline its baseline stage wrote to `baselines_dir` (the `<name>_predictions.csv`
    its manifest lists), its per-unit scores of the primary metric over its seeds, units sorted by name (for forecasts
    and text: time or text order); for a forecast task, the horizon and M4's accuracy measures of every model (means
    over seeds) and baseline."""
    metric, per_model, units, horizon, targets, scale = task_runs["metric"].iloc[0], {}, None, None, None, 1.0
    accuracy: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as scratch, _quiet_downloads():
        for model, group in task_runs.sort_values("seed").groupby("model"):
            rows = []
            for _, run in group.iterrows():
                predictions = run_predictions(client, run, Path(scratch))
                # MASE's scale is the series' (the same for every run): the run's own MAE over its MASE.
                scale = (predictions["prediction"] - predictions["target"]).abs().mean() / run["value"] if metric == "test_mase" else 1.0
                scored = inference.unit_scores(predictions, metric, scale).sort_values("unit", kind="stable")
                if metric == "test_mase":
                    accuracy.setdefault(model, []).append(forecast_accuracy(predictions, scale))
                if units is None:
                    units = scored[["unit", "group", "weight"]].reset_index(drop=True)
                    targets = _unit_targets(predictions)
                    horizon = int(predictions["horizon"].max()) if "horizon" in predictions else None
                elif not units.equals(scored[["unit", "group", "weight"]].reset_index(drop=True)):
                    raise DataError(
                        f"{run['run_name']} ({run['run_id']}) was tested on other test examples than {task_runs['run_name'].iloc[0]}: "
                        "the runs of a task must share their test set (same processed data and task.data.limit_test). Retrain them."
                    )
                rows.append(scored["score"].to_numpy())
            per_model[model] = (np.stack(rows), tuple(int(seed) for seed in group["seed"]))
    baselines = {}
    for name in written_baselines(baselines_dir):
        path = baselines_dir / f"{name}_predictions.csv"
        if not path.is_file():
            raise DataError(
                f"{path} is missing though {baselines_dir / 'baselines.json'} lists it: rerun the task's baseline stage (`dvc repro`)."
            )
        predictions = pd.read_csv(path)
        scored = inference.unit_scores(predictions, metric, scale).sort_values("unit", kind="stable")
        same_units = units.equals(scored[["unit", "group", "weight"]].reset_index(drop=True))
        if not (same_units and (targets is None or targets.equals(_unit_targets(predictions)))):
            what = "the same test examples with other targets" if same_units else "other test examples"
            raise DataError(
                f"{path} scores {what} than the runs of {task_runs['task'].iloc[0]} (other processed data or "
                "task.data.limit_test): rerun its baseline stage with the runs' profile (`dvc repro`)."
            )
        baselines[name] = scored["score"]
        if metric == "test_mase":
            accuracy[name] = [forecast_accuracy(predictions, scale)]
    weights, groups = units["weight"].to_numpy(), units["group"].to_numpy()
    independent = metric in inference.INDEPENDENT_UNITS
    scores = {model: inference.Scores(values, weights, groups, seeds, independent) for model, (values, seeds) in per_model.items()}
    all_seeds = tuple(sorted({int(seed) for seed in task_runs["seed"]}))
    for name, values in baselines.items():  # a baseline does not depend on the seed: the same scores for every seed
        scores[name] = inference.Scores(np.tile(values.to_numpy(), (len(all_seeds), 1)), weights, groups, all_seeds, independent)
    means = {name: {key: float(np.mean([seed[key] for seed in seeds])) for key in seeds[0]} for name, seeds in accuracy.items()}
    return TaskScores(scores, horizon, with_owa(means) if means else None)


def _unit_targets(predictions: pd.DataFrame) -> pd.Series | None:
    """Each test unit's target, in unit order, for outputs with one row per unit and a target (classifiers): a baseline
    must be scored against the runs' labels, not only on their units. None for other outputs."""
    if "target" not in predictions or "horizon" in predictions:
        return None
    return predictions.sort_values("unit", kind="stable")["target"].reset_index(drop=True)


def champion(group: pd.DataFrame) -> dict[str, Any]:
    """The run of one task x model (rows sorted by seed) with the best validation value; the lowest seed among equals."""
    best = group["best_val"].idxmax() if group["mode"].iloc[0] == "max" else group["best_val"].idxmin()
    run = group.loc[best]
    return {
        "run_id": run["run_id"],
        "run_name": run["run_name"],
        "seed": int(run["seed"]),
        "monitor": run["monitor"],
        "best_value": float(run["best_val"]),
        "epoch": int(run["best_epoch"]),
        "test_value": float(run["value"]),
    }


def _json_safe(value: Any) -> Any:
    """NaN (a metric no run logged, a test of identical values) as None: JSON has no NaN."""
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_safe(item) for item in value]
    return None if isinstance(value, float) and math.isnan(value) else value


def _pairs(models: list[str], pairs: list[list[str]], baselines: list[str]) -> list[tuple[str, str]]:
    """The configured pairs whose models both have runs, then every model with runs against each of `baselines` (a model
    in no pair too: `models=[gru]` still answers "is it better than the simple bar?")."""
    tested = [(a, b) for a, b in pairs if a in models and b in models]
    return tested + [(model, baseline) for model in models for baseline in baselines]


def baselines_to_test(baselines: dict[str, float], mode: str, which: str) -> list[str]:
    """The baselines the networks are tested against: `all`, or `strongest`, the one with the best primary metric (the
    hardest bar; the others' scores are still reported, without tests that would dilute Holm's correction)."""
    if which == "all" or not baselines:
        return list(baselines)
    return [(max if mode == "max" else min)(baselines, key=baselines.__getitem__)]


def test_pair(
    first: inference.Scores, second: inference.Scores, margin: float, settings: dict[str, Any], horizon: int | None
) -> dict[str, Any]:
    """The paired inference of rnnlab.inference where both share two seeds or more; else the point estimate alone."""
    shared = [seed for seed in first.seeds if seed in second.seeds]
    if not shared:
        return {"shared_seeds": [], "effect": None, "margin": margin, "p_value": None, "verdict": "no shared seeds"}
    if len(shared) < 2:
        a = first.values[[first.seeds.index(s) for s in shared]].mean(axis=0)
        b = second.values[[second.seeds.index(s) for s in shared]].mean(axis=0)
        effect = float(np.sum((a - b) * first.weights) / first.weights.sum())
        return {"shared_seeds": shared, "effect": effect, "margin": margin, "p_value": None, "verdict": "not enough seeds"}
    return inference.compare_pair(first, second, margin, horizon=horizon, **settings)


def _test_set(task: str, runs: pd.DataFrame) -> str:
    """What the task's runs say their test set is ("" if none says); runs tested on different sets are not comparable."""
    said = sorted({value for value in runs["test_set"] if value})
    if len(said) > 1:
        raise DataError(
            f"the runs of {task} were tested on different test sets ({'; '.join(said)}): compare the runs of one split "
            "(seeds=[...], models=[...]) or retrain them with the same split settings."
        )
    return said[0] if said else ""


def _metric_value(scores: inference.Scores) -> float:
    """The primary metric of a baseline, whose scores are the same on every seed: the weighted mean of its unit scores."""
    return float(np.sum(scores.values[0] * scores.weights) / scores.weights.sum())


def build_report(
    runs: pd.DataFrame,
    scores: dict[str, TaskScores],
    pairs: list[list[str]],
    settings: dict[str, Any],
    profile: str,
    seeds: TaskSeeds = None,
    baseline_tests: str = "strongest",
    tuned_as_default: TunedDefaults | None = None,
) -> dict[str, Any]:
    """The comparison as JSON-ready data. `runs` carry best_val and best_epoch (best_validation) besides load_runs' columns;
    `scores` are task_scores' per task; `settings` are compare_pair's confidence, alpha, resamples and seed;
    `baseline_tests` which baselines the networks are tested against (baselines_to_test). A `<model>_tuned` whose study
    found nothing better than the default records that default as `same_as_default`: as `tuned_as_default` (compare's
    tuned_as_default_from) says for `<task>/<model>`, or as resolve.tuned_default composes it where that does not say."""
    tasks = {}
    for task, task_runs in runs.groupby("task"):
        newest = task_runs.loc[task_runs["start_time"].idxmax()]  # its config decides the task's metrics, direction and margin
        by_model = {model: group.sort_values("seed") for model, group in task_runs.groupby("model")}
        models = {
            model: {
                "seeds": [int(seed) for seed in group["seed"]],
                "run_ids": group["run_id"].tolist(),
                **describe(group["value"].to_numpy(), settings["confidence"]),
                **{key: float(group[key].mean()) for key in EXTRAS},  # None (shown "—") where no run logged it
                "champion": champion(group.reset_index(drop=True)),
                "same_as_default": _same_as_default(str(task), model, tuned_as_default or {}),
            }
            for model, group in by_model.items()
        }
        task_scores_, horizon = scores[task].scores, scores[task].horizon
        baselines = {name: _metric_value(task_scores_[name]) for name in task_scores_ if name not in models}
        against = baselines_to_test(baselines, newest["mode"], baseline_tests)
        tested = [
            {"first": a, "second": b, **test_pair(task_scores_[a], task_scores_[b], float(newest["margin"]), settings, horizon)}
            for a, b in _pairs(list(models), pairs, against)
        ]
        tasks[task] = {
            "metric": newest["metric"],
            "monitor": newest["monitor"],
            "mode": newest["mode"],
            "margin": float(newest["margin"]),
            "test_set": _test_set(str(task), task_runs),
            "baselines": baselines,
            "forecast_accuracy": scores[task].forecast_accuracy,
            "models": models,
            "pairs": tested,
        }
    tested = [(task, pair) for task, result in tasks.items() for pair in result["pairs"] if pair["p_value"] is not None]
    for (task, pair), adjusted in zip(tested, inference.holm([pair["p_value"] for _, pair in tested]), strict=True):
        pair["p_holm"] = adjusted
        pair["verdict"] = inference.verdict(pair, pair["first"], pair["second"], tasks[task]["mode"], settings["alpha"])
    seeds = None if seeds is None else {task: seeds[task] for task in tasks}
    report = {"profile": profile, "seeds": seeds, **settings, "baseline_tests": baseline_tests, "tests": len(tested)}
    report["champion_alias"] = None
    return _json_safe(report | {"tasks": tasks})


def _same_as_default(task: str, model: str, known: TunedDefaults) -> str | None:
    name = f"{task}/{model}"
    return known[name] if name in known else resolve.tuned_default(task, model)


def learning_curve(client: MlflowClient, run_ids: list[str]) -> pd.Series:
    """Mean over runs of val_loss per epoch (from 0, as in the runs' history files); a run that stopped early counts
    only for its epochs."""
    curves = [per_epoch(client, run_id, "val_loss")["value"] for run_id in run_ids]
    mean = pd.concat(curves, axis=1).mean(axis=1)
    mean.index.name = "epoch"
    return mean


def curves_table(curves: dict[str, pd.Series]) -> pd.DataFrame:
    """The learning curves of one task as columns epoch and one per model (empty where a model had stopped)."""
    table = pd.DataFrame(curves)
    table.index.name = "epoch"
    return table.reset_index()


@contextmanager
def _figure(path: Path, title: str, xlabel: str, ylabel: str) -> Iterator[plt.Axes]:
    figure, ax = plt.subplots(figsize=(6.4, 4.2))
    try:
        yield ax
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        figure.savefig(path, dpi=120, bbox_inches="tight")
    finally:
        plt.close(figure)


def draw_figures(report: dict[str, Any], curves: dict[str, dict[str, pd.Series]], out: Path) -> None:
    """Per task, the FIGURES as out/<task>_<figure>.png."""
    for task, result in report["tasks"].items():
        metric, models = result["metric"], result["models"]
        names, means = list(models), [m["mean"] for m in models.values()]
        learning_curves, metric_ci, metric_vs_params = (out / f"{task}_{name}.png" for name in FIGURES)
        with _figure(learning_curves, f"{task}: validation loss, mean over seeds", "epoch", "val_loss") as ax:
            for model, curve in curves[task].items():
                ax.plot(curve.index, curve.to_numpy(), marker="o", label=model)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        with _figure(metric_ci, f"{task}: {metric}, mean and {report['confidence']:.0%} CI over seeds", "model", metric) as ax:
            # A model with one seed has no interval: its point is drawn without error bars.
            errors = np.array([[m["mean"] - m["ci"][0], m["ci"][1] - m["mean"]] if m["ci"] else [0.0, 0.0] for m in models.values()])
            ax.errorbar(names, means, yerr=errors.T, fmt="o", capsize=5)
        with _figure(metric_vs_params, f"{task}: {metric} against model size", "parameters", metric) as ax:
            ax.scatter([m["n_params"] for m in models.values()], means)
            for name, model in models.items():
                ax.annotate(name, (model["n_params"], model["mean"]), textcoords="offset points", xytext=(5, 5))


def _artifacts(client: MlflowClient, run_id: str, path: str) -> list[str]:
    return sorted(info.path for info in client.list_artifacts(run_id, path) if not info.is_dir)


def _download(client: MlflowClient, run_id: str, artifact: str, scratch: Path) -> Path:
    try:
        return Path(client.download_artifacts(run_id, artifact, str(scratch)))
    except (MlflowException, OSError) as err:
        raise DataError(
            f"cannot read the artifact {artifact} of run {run_id} from {client.tracking_uri}'s artifact store ({err})."
        ) from err


@contextmanager
def _quiet_downloads() -> Iterator[None]:
    """MLflow draws a progress bar for every download: two lines of noise per small figure in the stage's log."""
    name, previous = MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name, os.environ.get(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name)
    os.environ[name] = "false"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def fetch_champion_artifacts(client: MlflowClient, report: dict[str, Any], out: Path) -> None:
    """Copy every champion's own figures (figures/*.png of its run) to out/<task>_<model>_<name>.png and read its text
    sample (samples/epochNN.txt) into the report: the sample of the epoch it was tested at, else its last one."""
    with tempfile.TemporaryDirectory() as scratch, _quiet_downloads():
        for task, result in report["tasks"].items():
            for model, entry in result["models"].items():
                best = entry["champion"]
                run_id, best["figures"], best["sample"] = best["run_id"], [], None
                for artifact in _artifacts(client, run_id, RUN_FIGURES):
                    if artifact.endswith(".png"):
                        name = f"{task}_{model}_{Path(artifact).stem}.png"
                        shutil.copyfile(_download(client, run_id, artifact, Path(scratch)), out / name)
                        best["figures"].append(name)
                samples = {
                    int(match[1]): path for path in _artifacts(client, run_id, RUN_SAMPLES) if (match := SAMPLE.fullmatch(Path(path).name))
                }
                if samples:
                    epoch = best["epoch"] if best["epoch"] in samples else max(samples)
                    text = _download(client, run_id, samples[epoch], Path(scratch)).read_text(encoding="utf-8")
                    best["sample"] = {"epoch": epoch, "artifact": samples[epoch], "text": text}


def draw_samples(report: dict[str, Any], out: Path, width: int = 90, max_lines: int = 14) -> None:
    """Per task whose champions logged text samples, out/<task>_samples.png: each model's sample in monospace, one
    panel per model, wrapped at `width` characters and cut after `max_lines` lines."""
    for task, result in report["tasks"].items():
        sampled = {model: m["champion"] for model, m in result["models"].items() if m["champion"]["sample"]}
        if not sampled:
            continue
        blocks = []
        for model, best in sampled.items():
            lines = [part for line in best["sample"]["text"].splitlines() for part in textwrap.wrap(line, width) or [""]]
            shown = lines[:max_lines] + (["[...]"] if len(lines) > max_lines else [])
            blocks.append((f"{task}: {model} champion (seed {best['seed']}, epoch {best['sample']['epoch']})", shown))
        rows = [len(lines) + 2.5 for _, lines in blocks]  # the text's lines, the panel title and a gap
        figure, axes = plt.subplots(len(blocks), 1, figsize=(0.075 * width + 0.4, 0.165 * sum(rows)), height_ratios=rows, squeeze=False)
        try:
            for ax, (title, lines) in zip(axes[:, 0], blocks, strict=True):
                ax.set_axis_off()
                ax.set_title(title, loc="left", fontsize=10, fontweight="bold")
                # parse_math=False: a `$` in generated text is a character, not the start of a formula.
                ax.text(0, 1, "\n".join(lines), transform=ax.transAxes, family="monospace", fontsize=9, va="top", parse_math=False)
            figure.subplots_adjust(left=0.01, right=0.99, top=0.97, bottom=0.01, hspace=0.05)
            figure.savefig(out / f"{task}_samples.png", dpi=120, bbox_inches="tight")
        finally:
            plt.close(figure)


def list_figures(report: dict[str, Any], out: Path) -> None:
    """Record in the report, per task, the figure files drawn and fetched for it, in the order the markdown shows them."""
    for task, result in report["tasks"].items():
        fetched = [name for m in result["models"].values() for name in m["champion"]["figures"]]
        samples = [f"{task}_samples.png"] if (out / f"{task}_samples.png").exists() else []
        result["figures"] = [f"{task}_{name}.png" for name in FIGURES] + fetched + samples


def register_champions(client: MlflowClient, report: dict[str, Any], alias: str) -> None:
    """Point `alias` of rnnlab-<task>-<model> at each champion's serving model (registered by rnnlab.serving if new)."""
    report["champion_alias"] = alias
    with _quiet_downloads():
        for task, result in report["tasks"].items():
            for model, entry in result["models"].items():
                best, name = entry["champion"], f"rnnlab-{task}-{model}"
                version = serving.register_champion(client, best["run_id"], name, alias)
                best |= {"registered_model": name, "version": int(version.version), "alias": alias}


def metrics_summary(report: dict[str, Any]) -> dict[str, Any]:
    """The report's numbers alone, task -> model (or <first>_vs_<second>) -> value, for `dvc metrics show/diff`:
    no strings, lists or nulls, which DVC would show as columns or drop."""
    summary_ = {}
    for task, result in report["tasks"].items():
        metric, entries = result["metric"], {}
        for model, m in result["models"].items():
            ci = dict(zip(("ci_low", "ci_high"), m["ci"], strict=True)) if m["ci"] else {}
            values = {f"{metric}_mean": m["mean"], f"{metric}_std": m["std"], **ci, "seeds": len(m["seeds"])}
            values |= {key: m[key] for key in EXTRAS} | {f"champion_{m['champion']['monitor']}": m["champion"]["best_value"]}
            entries[model] = {key: value for key, value in values.items() if value is not None}
        entries |= {f"baseline_{name}": {metric: value} for name, value in result["baselines"].items()}
        for name, measures in (result.get("forecast_accuracy") or {}).items():  # M4's sMAPE and OWA beside the primary metric
            entry = entries[name if name in result["models"] else f"baseline_{name}"]
            entry |= {f"test_{key}": value for key, value in measures.items() if key in ("smape", "owa") and value is not None}
        for p in (p for p in result["pairs"] if p["effect"] is not None):
            values = {"effect": p["effect"], "shared_seeds": len(p["shared_seeds"])}
            if p["p_value"] is not None:
                values |= {"ci_low": p["ci"][0], "ci_high": p["ci"][1], "p_value": p["p_value"], "p_holm": p["p_holm"], "mde": p["mde"]}
            entries[f"{p['first']}_vs_{p['second']}"] = values
        summary_[task] = entries
    return summary_


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _interval(ci: list[float] | None, spec: str, undefined: str) -> str:
    return f"[{ci[0]:{spec}}, {ci[1]:{spec}}]" if ci else undefined


def _seeds_text(seeds: TaskSeeds) -> str:
    """`seeds 1, 2, 3` where every task has those; else each list with its tasks, `seeds 1, 2 (a, b); seeds 1, 2, 3 (c)`."""
    if seeds is None:
        return "every seed"
    tasks_of: dict[tuple[int, ...], list[str]] = {}
    for task, task_seeds in seeds.items():
        tasks_of.setdefault(tuple(task_seeds), []).append(task)
    texts = {group: f"seeds {', '.join(map(str, group))}" for group in tasks_of}
    if len(texts) == 1:
        return next(iter(texts.values()))
    return "; ".join(f"{texts[group]} ({', '.join(tasks)})" for group, tasks in sorted(tasks_of.items(), key=lambda item: len(item[0])))


def _fenced(text: str) -> list[str]:
    """`text` as a fenced block whose fence is longer than any run of backticks in it."""
    fence = "`" * max(3, 1 + max((len(run) for run in re.findall(r"`+", text)), default=0))
    return [fence + "text", *text.rstrip("\n").splitlines(), fence]


def _registered(best: dict[str, Any]) -> str:
    return (
        f"{best['registered_model']} v{best['version']} @{best['alias']}" if best.get("alias") else "not registered (champion_alias: null)"
    )


def markdown(report: dict[str, Any]) -> str:
    level, alpha = f"{report['confidence']:.0%}", report["alpha"]
    lines = [
        f"# GRU vs LSTM vs RNN over seeds (profile `{report['profile']}`, {_seeds_text(report['seeds'])})",
        "",
        "How to read this report. The models of a task ran with the same settings (the task's and profile's configs: one "
        "learning rate, width and epoch budget for every cell; only `*_tuned` models had a search, each cell with the same budget, "
        "and a tuned model equal to its default is marked so), and seed s of every model "
        "drew its batches, augmentations and dropout from the same random streams (common random numbers), so models are "
        "compared seed by seed and test example by test example.",
        "",
        f"- Per model: the task's primary test metric over seeds as mean ± sample standard deviation, and a {level} Student "
        "t-interval of the mean over seeds; with one seed both are undefined. Parameters, seconds per epoch, latency and "
        "memory are means over seeds; — means the runs did not log it.",
        f"- Per pair (effect = first - second, in the metric's units): a {level} interval from a two-level bootstrap "
        f"({report['resamples']:,} resamples, seed {report['seed']}) over the seeds both share and over groups of test units "
        "(reviews, held-out voices or speakers, works, blocks of forecast origins, memory sequences); a p-value from a test on the "
        "test units, each unit's score averaged over the shared seeds: for classifiers and memory sequences a paired t-test with "
        "variance clustered by those groups, "
        "Diebold-Mariano for forecasts (uniform-kernel variance at lag horizon - 1, Harvey-Leybourne-Newbold correction), "
        "a t-test with Newey-West variance for per-chunk text losses; Holm's correction over all "
        f"{report['tests']} tests of the report. Each network is also tested against "
        + (
            "every baseline of its task."
            if report["baseline_tests"] == "all"
            else "its task's strongest baseline (the best test score: the hardest bar); the other baselines are scored, not tested."
        ),
        f"- Verdict: *<model> better* where Holm's p < {alpha} (and the interval excludes 0); *equivalent within ±δ* where "
        f"two one-sided tests at {alpha} reject (the {1 - 2 * alpha:.0%} bootstrap interval lies inside ±δ, the task's "
        "smallest effect of interest, fixed in its config before any result); otherwise *inconclusive*. One shared seed: "
        "the point estimate only.",
        f"- MDE: the smallest effect this design detects with 80% power in a test at {alpha} (2.8 bootstrap standard errors; "
        "Holm's correction asks for more); seeds to halve it: how many seeds would, with this test set (— where the test "
        "set's own sampling error forbids it). Intervals resample groups of test units: few groups (textgen's works) make "
        "them rough.",
        "- A model's champion is its run with the best validation value of the task's monitor metric over its epochs: the "
        "checkpoint that run was tested with, chosen without looking at the test set.",
    ]
    for task, result in report["tasks"].items():
        metric, better = result["metric"], "higher" if result["mode"] == "max" else "lower"
        lines += ["", f"## {task}: {metric} ({better} is better)", ""]
        if result["test_set"]:
            lines += [f"Test set: {result['test_set']}.", ""]
        lines += [
            f"| model | {metric} mean ± std | {level} CI | seeds | {' | '.join(label for label, _ in EXTRAS.values())} |",
            "|---" * (4 + len(EXTRAS)) + "|",
        ]
        for model, m in result["models"].items():
            extras = [_fmt(m[key], spec) for key, (_, spec) in EXTRAS.items()]
            ci = _interval(m["ci"], ".4f", "undefined (one seed)")
            label = _model_label(model, m)
            lines.append(f"| {label} | {m['mean']:.4f} ± {_fmt(m['std'], '.4f')} | {ci} | {len(m['seeds'])} | {' | '.join(extras)} |")
        for name, value in result["baselines"].items():
            lines.append(f"| {name} (baseline) | {value:.4f} | — | — | {' | '.join('—' for _ in EXTRAS)} |")
        lines += [
            f"\n{model} is {m['same_as_default']}'s default configuration: its study found nothing better "
            f"(conf/experiment/{task}_{model}.yaml), so it enters the tuned comparison with the default settings."
            for model, m in result["models"].items()
            if m["same_as_default"]
        ]
        if result.get("forecast_accuracy"):
            lines += ["", *_accuracy_table(result["forecast_accuracy"], set(result["baselines"]))]
        if result["pairs"]:
            lines += [
                "",
                f"Pairs (δ = {result['margin']:g}):",
                "",
                f"| pair | seeds | effect | {level} CI | test | p | p (Holm) | verdict | MDE | seeds to halve MDE |",
                "|---" * 10 + "|",
            ]
        for p in result["pairs"]:
            tested = p["p_value"] is not None
            lines.append(
                f"| {p['first']} vs {p['second']} | {len(p['shared_seeds'])} | {_fmt(p['effect'], '+.4f')} "
                f"| {_interval(p.get('ci'), '+.4f', '—')} | {p.get('test') or '—'} | {_fmt(p['p_value'], '.3g')} "
                f"| {_fmt(p.get('p_holm'), '.3g')} | {_bold_verdict(p['verdict'])} | {_fmt(p.get('mde') if tested else None, '.4f')} "
                f"| {_fmt(p.get('seeds_to_halve_mde'), 'd')} |"
            )
        monitor = result["monitor"]
        lines += ["", f"Champions (best validation {monitor}):", ""]
        lines += [f"| model | run | seed | best {monitor} (epoch) | {metric} | registered |", "|---" * 6 + "|"]
        for model, m in result["models"].items():
            best = m["champion"]
            lines.append(
                f"| {model} | {best['run_name']} (`{best['run_id']}`) | {best['seed']} | {best['best_value']:.4f} ({best['epoch']}) "
                f"| {best['test_value']:.4f} | {_registered(best)} |"
            )
        for model, m in result["models"].items():
            sample = m["champion"]["sample"]
            if sample:
                lines += [
                    "",
                    f"{model} champion's sample (seed {m['champion']['seed']}, epoch {sample['epoch']}):",
                    "",
                    *_fenced(sample["text"]),
                ]
        lines += ["", f"Learning curves as data: [curves/{task}.csv](curves/{task}.csv).", ""]
        lines += [f"![{task} {Path(name).stem.removeprefix(task + '_')}](figures/{name})" for name in result["figures"]]
    return "\n".join(lines) + "\n"


def _model_label(model: str, result: dict[str, Any]) -> str:
    return f"{model} (= {result['same_as_default']}'s default)" if result["same_as_default"] else model


def _accuracy_table(accuracy: dict[str, dict[str, float]], baselines: set[str]) -> list[str]:
    """A forecast task's M4 measures, one row per model (means over seeds) and baseline."""
    lines = [
        "M4's accuracy measures (sMAPE in percent; MASE as above; OWA relative to Naive2, below 1 is better; MAE one step "
        "ahead in the series' units):",
        "",
        "| model | sMAPE | MASE | OWA | MAE 1 step ahead |",
        "|---|---|---|---|---|",
    ]
    for name, values in accuracy.items():
        label = f"{name} (baseline)" if name in baselines else name
        lines.append(
            f"| {label} | {values['smape']:.3f} | {values['mase']:.4f} | {_fmt(values.get('owa'), '.4f')} | {values['mae_1']:.4g} |"
        )
    return lines


def log_report(cfg: DictConfig, client: MlflowClient, files: list[Path], folders: list[Path], seeds: TaskSeeds) -> str:
    """Log the report files and the figure and curve folders to a new run of the comparison experiment."""
    experiment_id = tracking.ensure_experiment(cfg.tracking)
    tags = {"profile": cfg.profile, "seeds": "all" if seeds is None else _seeds_text(seeds).removeprefix("seeds ")}
    tags["git_commit"] = tracking.git_commit(cfg.paths.root)
    run_id = client.create_run(experiment_id, run_name=cfg.tracking.run_name, tags=tags).info.run_id
    try:
        for path in files:
            client.log_artifact(run_id, str(path))
        for folder in folders:
            client.log_artifacts(run_id, str(folder), folder.name)
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id)
    return run_id


def _bold_verdict(verdict: str) -> str:
    """A winner's name in bold (`**gru** better`), other verdicts as they are."""
    return f"**{verdict.removesuffix(' better')}** better" if verdict.endswith(" better") else verdict


def _verdict(pair: dict[str, Any]) -> str:
    p_value = "" if pair["p_value"] is None else f" (Holm p = {pair['p_holm']:.2g})"
    return f"{pair['first']} vs {pair['second']}: {pair['verdict']}{p_value}"


def _champions(result: dict[str, Any]) -> str:
    def one(model: str, best: dict[str, Any]) -> str:
        return f"{model} seed {best['seed']}" + (f" (v{best['version']})" if best.get("version") else "")

    return ", ".join(one(model, m["champion"]) for model, m in result["models"].items())


def compare(cfg: DictConfig) -> dict[str, Any]:
    """Read the runs, write the reports, figures and curves (each atomically), set the champion aliases and log the
    reports to MLflow; return the report. Every setting is checked before anything is read or written."""
    if not (0 < cfg.alpha < 0.5 and 0 < cfg.confidence < 1):
        raise ConfigError(f"alpha must be in (0, 0.5) and confidence in (0, 1), got alpha={cfg.alpha}, confidence={cfg.confidence}.")
    if not (is_int(cfg.resamples) and cfg.resamples >= 100 and is_int(cfg.bootstrap_seed)):
        raise ConfigError(
            f"resamples must be an integer >= 100 (default 2000) and bootstrap_seed an integer, got {cfg.resamples!r}, "
            f"{cfg.bootstrap_seed!r}."
        )
    if cfg.baseline_tests not in ("strongest", "all"):
        raise ConfigError(f"baseline_tests must be strongest (the best baseline of a task) or all, got {cfg.baseline_tests!r}.")
    pairs = OmegaConf.to_container(cfg.pairs, resolve=True)
    if not all(isinstance(pair, list) and len(pair) == 2 for pair in pairs):
        raise ConfigError(f"pairs must be a list of [model, model], e.g. [[gru, lstm], [gru, rnn]], got {pairs}.")
    alias, tasks = check_alias(cfg.champion_alias), choices("task", cfg.tasks)
    seeds, tuned_defaults = requested_seeds(cfg, tasks), tuned_as_default(cfg)
    client = tracking.open_store(cfg.tracking.uri)
    where = f"of profile {cfg.profile!r} in experiments {', '.join(f'rnnlab-{task}' for task in tasks)} at {cfg.tracking.uri}"
    if cfg.runs not in ("pipeline", "newest"):
        raise ConfigError(f"runs must be pipeline (the runs the metrics files name) or newest (the newest in MLflow), got {cfg.runs!r}.")
    models = requested_models(cfg, tasks)
    if cfg.runs == "pipeline":
        found = load_pipeline_runs(client, tasks, cfg.profile, Path(cfg.metrics_dir), models, seeds)
        where = f"named by {cfg.metrics_dir}/<task>/<model>/seed<seed>.json for tasks {', '.join(tasks)}"
    else:
        found = load_runs(client, tasks, cfg.profile)
    runs = select_runs(found, models, seeds, where, tasks, cfg.profile)
    best = [best_validation(client, run) for _, run in runs.iterrows()]
    runs = runs.assign(best_val=[value for value, _ in best], best_epoch=[epoch for _, epoch in best])
    unmargined = runs.loc[runs["margin"].isna(), "run_name"].tolist()
    if unmargined:
        raise DataError(
            f"{', '.join(unmargined[:3])}{' ...' if len(unmargined) > 3 else ''} record no task/equivalence_margin: trained by an "
            "older rnnlab, they cannot enter the equivalence tests. Retrain them (`dvc repro`)."
        )
    # Baseline stages write beside the runs' metrics files (conf/baselines.yaml: paths.baselines_dir).
    scores = {task: task_scores(client, task_runs, Path(cfg.metrics_dir, task, "baselines")) for task, task_runs in runs.groupby("task")}
    settings = {"confidence": cfg.confidence, "alpha": cfg.alpha, "resamples": cfg.resamples, "seed": cfg.bootstrap_seed}
    report = build_report(runs, scores, pairs, settings, cfg.profile, seeds, cfg.baseline_tests, tuned_defaults)
    curves = {
        task: {model: learning_curve(client, m["run_ids"]) for model, m in result["models"].items()}
        for task, result in report["tasks"].items()
    }
    out = Path(cfg.output_dir)
    new_out = not out.exists()
    try:
        # All figures and curves or none, and the aliases set, before any report file is written: a failure leaves the old outputs.
        with io.atomic_dir(out / "figures") as figures, io.atomic_dir(out / "curves") as curve_dir:
            draw_figures(report, curves, figures)
            fetch_champion_artifacts(client, report, figures)
            draw_samples(report, figures)
            list_figures(report, figures)
            for task, task_curves in curves.items():
                curves_table(task_curves).to_csv(curve_dir / f"{task}.csv", index=False, float_format="%.6g")
            if alias is not None:
                register_champions(client, report, alias)
            n_figures = len(list(figures.glob("*.png")))
    except BaseException:
        if new_out:  # atomic_dir made it for its temporary folders, now gone
            shutil.rmtree(out, ignore_errors=True)
        raise
    files = [out / "comparison.md", out / "comparison.json", out / "comparison_metrics.json"]
    io.write_json(files[1], report)
    io.write_json(files[2], metrics_summary(report))
    io.write_text(files[0], markdown(report))
    run_id = log_report(cfg, client, files, [out / "figures", out / "curves"], seeds)
    rows = {}
    for task, result in report["tasks"].items():
        rows[task] = "; ".join(map(_verdict, result["pairs"])) or "no pairs to test"
        rows[f"{task} champions"] = _champions(result)
    summary(
        f"Comparison of {len(runs)} runs (profile {cfg.profile}, {_seeds_text(seeds)})",
        {
            **rows,
            "champion alias": f"@{alias} on rnnlab-<task>-<model>" if alias else "none set (champion_alias: null)",
            "report": files[0],
            "JSON": f"{files[1]}, {files[2].name} (DVC metrics)",
            "figures": f"{out / 'figures'} ({n_figures} PNG)",
            "curves": f"{out / 'curves'} ({len(curves)} CSV)",
            "MLflow run": f"{cfg.tracking.experiment} / {cfg.tracking.run_name} ({run_id})",
        },
    )
    return report


@hydra_entry(config_name="compare")
def main(cfg: DictConfig) -> None:
    compare(cfg)


if __name__ == "__main__":
    main()
