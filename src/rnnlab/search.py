"""Hyperparameter search: an Optuna study run through Hydra multirun.

    python -m rnnlab.train -m hparams_search=sentiment_gru

rnnlab has its own small Hydra sweeper (hydra_plugins/rnnlab_optuna_sweeper) because the
released hydra-optuna-sweeper (1.3.0) pins optuna<3, cannot prune, cannot resume and breaks
on SQLAlchemy 2 storages. The plugin is a thin shell around `Search` below; the trial side
(`open_trial`) runs inside `rnnlab.train`, wherever the Hydra launcher put the job.

- The study lives in a journal file (optuna/<search>.log) or an RDB URL, so re-running the
  command resumes it and several workers, on one machine or many, can share it.
- Every trial reports its validation metric each epoch; the configured pruner stops bad
  trials (optuna-integration's Lightning callback). The objective is the best value reported.
- A trial whose process died (killed, power cut) is marked FAIL and its parameters are
  enqueued again, so a re-run finishes it; finished trials are never repeated.
- MLflow: one parent run per study, a nested child run per trial; at the end the parent
  holds the best value and parameters, the trial table, fANOVA importances and plots, and
  the best parameters become conf/experiment/<task>_<model>_tuned.yaml.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
from hydra.errors import HydraException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from optuna.trial import FrozenTrial, TrialState

from rnnlab import io, tracking
from rnnlab.console import console, summary
from rnnlab.errors import ConfigError
from rnnlab.validation import is_number

SYNTAX_HELP = "write e.g. tag(log, interval(1e-4, 1e-2)), interval(0.0, 0.5), range(1, 4) or choice(64, 128, 256)"
# Trial attributes: which process runs the trial, its MLflow run, and whether it was cut short.
WORKER_ATTR, RUN_ID_ATTR, INTERRUPTED_ATTR, PARENT_RUN_ATTR = "worker", "mlflow_run_id", "interrupted", "mlflow_parent_run_id"

optuna.logging.set_verbosity(optuna.logging.WARNING)
# Optuna flags its matplotlib plots experimental; the report uses them knowingly.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


# ---------------------------------------------------------------------------- search space


@dataclass(frozen=True)
class Param:
    """One searched config key and its Optuna distribution; `add` for a `+key` not in the config."""

    name: str
    distribution: optuna.distributions.BaseDistribution
    add: bool = False

    def override(self, value: Any) -> str:
        shown = json.dumps(value) if value is None or isinstance(value, bool) else value  # null, true, false
        return f"{'+' if self.add else ''}{self.name}={shown}"


def parse_search_space(params: Mapping[str, str], config: DictConfig) -> list[Param]:
    """The search space from Hydra's sweep syntax, checked before any trial runs. An entry set to
    null is not searched: a search config narrows the space of the one it extends that way."""
    params = {key: spec for key, spec in params.items() if spec is not None}
    if not params:
        raise ConfigError("The search space (hydra.sweeper.params) is empty; list the config keys to tune, " + SYNTAX_HELP + ".")
    parser = OverridesParser.create()
    space = []
    for key, spec in params.items():
        where = f"search space entry `{key}: {spec}`"
        try:
            value = parser.parse_override(f"{key}={spec}").value()
        except HydraException as err:
            raise ConfigError(f"{where} is not valid sweep syntax ({err}); {SYNTAX_HELP}.") from None
        name, add = key.lstrip("+"), key.startswith("+")
        if not add and OmegaConf.select(config, name, default=_ABSENT, throw_on_resolution_failure=False) is _ABSENT:
            raise ConfigError(f"{where}: `{name}` is not a key of the config; check its spelling, or write `+{name}` to add a new key.")
        space.append(Param(name, _distribution(where, value), add))
    return space


_ABSENT = object()


def _distribution(where: str, value: Any) -> optuna.distributions.BaseDistribution:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if isinstance(value, ChoiceSweep):
        if not value.list:
            raise ConfigError(f"{where} has no choices; {SYNTAX_HELP}.")
        return CategoricalDistribution(list(value.list))
    if isinstance(value, RangeSweep):
        if not all(isinstance(x, int) for x in (value.start, value.stop, value.step)):
            raise ConfigError(f"{where}: range() takes integers; for a float range use interval(low, high).")
        values = list(range(value.start, value.stop, value.step))
        if not values:
            raise ConfigError(f"{where} is empty (the stop of a range is excluded); write e.g. range(1, 4) for 1, 2, 3.")
        return IntDistribution(values[0], values[-1], step=abs(value.step)) if value.step > 0 else CategoricalDistribution(values)
    if isinstance(value, IntervalSweep):
        low, high, log = value.start, value.end, "log" in value.tags
        if not low < high:
            raise ConfigError(
                f"{where}: the low end {low} is not below the high end {high}; write interval({min(low, high)}, {max(low, high)})."
            )
        if log and low <= 0:
            raise ConfigError(f"{where}: a log-scaled interval needs a positive low end, not {low}.")
        return FloatDistribution(low, high, log=log)
    raise ConfigError(f"{where} is a fixed value, not a range to search; {SYNTAX_HELP} (fixed overrides go on the command line).")


def default_params(space: list[Param], config: DictConfig) -> dict[str, Any]:
    """The config's own values of the searched keys that lie in the space: enqueued as the first
    trial, so that a search starts from the default and its best is never worse on validation."""
    values = {param.name: OmegaConf.select(config, param.name, default=None) for param in space}
    return {param.name: values[param.name] for param in space if _in_space(param.distribution, values[param.name])}


def _in_space(distribution: optuna.distributions.BaseDistribution, value: Any) -> bool:
    if isinstance(distribution, optuna.distributions.CategoricalDistribution):
        return value in distribution.choices
    return is_number(value) and distribution.low <= value <= distribution.high


def fixed_overrides(arguments: Sequence[str]) -> list[str]:
    """The command line's overrides, passed to every trial; sweeps belong in the search space."""
    parser = OverridesParser.create()
    try:
        overrides = parser.parse_overrides(list(arguments))
    except HydraException as err:
        raise ConfigError(f"Cannot parse the command line ({err}).") from None
    for override in overrides:
        if override.is_sweep_override():
            raise ConfigError(
                f"`{override.input_line}` is a sweep; a search runs one study, so give fixed values on the command line "
                "and list searched keys under hydra.sweeper.params of the hparams_search config."
            )
    return list(arguments)


# ---------------------------------------------------------------------------- storage


def open_storage(spec: str) -> optuna.storages.BaseStorage | str:
    """An RDB URL (postgresql://..., sqlite:///...) as is; anything else is a journal file path."""
    if "://" in spec:
        return spec
    path = Path(spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    return JournalStorage(JournalFileBackend(str(path)))


def open_trial(cfg: DictConfig) -> optuna.Trial | None:
    """Inside a training job: the Optuna trial it runs, or None outside a search."""
    search = cfg.search
    if search.trial is None:
        return None
    pruner = instantiate(search.pruner) if search.pruner else optuna.pruners.NopPruner()
    study = optuna.load_study(study_name=search.study, storage=open_storage(search.storage), pruner=pruner)
    trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, int(search.trial))
    return optuna.Trial(study, trial_id)


# ---------------------------------------------------------------------------- the study


def _this_worker() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _is_dead(worker: str | None) -> bool:
    """True for a worker process of this machine that no longer exists."""
    if not worker:
        return False
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname():
        return False  # another machine's worker: it cannot be checked from here
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def best_reported(trial: FrozenTrial, direction: str) -> float | None:
    """A trial's objective: the best of the values it reported after each epoch."""
    values = [v for v in trial.intermediate_values.values() if math.isfinite(v)]
    if not values:
        return None
    return max(values) if direction == "maximize" else min(values)


class Search:
    """The sweeper's side of a study: ask for trials, launch them as Hydra jobs, tell the results."""

    def __init__(self, config: DictConfig, launcher: Any, sweeper: Any) -> None:
        search = config.search
        if not search.study:
            raise ConfigError("search.study is not set; run a search through a config in conf/hparams_search/ (hparams_search=<name>).")
        if search.direction not in ("maximize", "minimize"):
            raise ConfigError(f"search.direction is {search.direction!r}; write maximize or minimize.")
        n_trials, timeout = sweeper.n_trials, sweeper.timeout
        if n_trials < 1 or (timeout is not None and timeout <= 0):
            raise ConfigError(f"hydra.sweeper needs n_trials >= 1 and a positive timeout in seconds or null (got {n_trials}, {timeout}).")
        self.config, self.launcher, self.sweeper = config, launcher, sweeper
        self.n_trials, self.timeout = n_trials, timeout
        self.name, self.metric, self.direction = str(search.study), str(search.metric), str(search.direction)
        self.space = parse_search_space(sweeper.params, config)
        self.sampler_cfg = sweeper.sampler
        self.storage_label = str(search.storage)
        self.storage = open_storage(self.storage_label)
        self.client = tracking.open_store(config.tracking.uri)
        self.report_dir = Path(search.report_dir)
        self.study, self.parent_run_id = self._open_study()

    # -- setup

    def _open_study(self) -> tuple[optuna.Study, str]:
        """Create the study and its MLflow parent run, or join the ones a previous run or another worker made."""
        try:
            study = optuna.create_study(study_name=self.name, storage=self.storage, direction=self.direction)
        except optuna.exceptions.DuplicatedStudyError:
            study = optuna.load_study(study_name=self.name, storage=self.storage)
            if study.direction.name.lower() != self.direction:
                raise ConfigError(
                    f"The study {self.name!r} in {self.storage_label} was created to {study.direction.name.lower()}, "
                    f"not {self.direction}; delete that study or give this search another name."
                ) from None
            return study, self._await_parent_run(study)
        run_id = self._create_parent_run()
        study.set_user_attr(PARENT_RUN_ATTR, run_id)
        if self.sweeper.enqueue_defaults:
            study.enqueue_trial(default_params(self.space, self.config))
        return study, run_id

    def _create_parent_run(self) -> str:
        experiment_id = tracking.ensure_experiment(self.config.tracking)
        run = self.client.create_run(
            experiment_id,
            run_name=f"{self.name}-study",
            tags={
                "optuna.study": self.name,
                "optuna.storage": self.storage_label,
                "task": self.config.task.name,
                "model": self.config.model.name,
            },
        )
        for param in self.space:
            self.client.log_param(run.info.run_id, f"space.{param.name}", repr(param.distribution))
        self.client.log_param(run.info.run_id, "metric", self.metric)
        self.client.log_param(run.info.run_id, "direction", self.direction)
        return run.info.run_id

    @staticmethod
    def _await_parent_run(study: optuna.Study, wait: float = 60.0) -> str:
        """The parent run id, which the worker that created the study records right after it."""
        deadline = time.monotonic() + wait
        while PARENT_RUN_ATTR not in study.user_attrs:
            if time.monotonic() > deadline:
                raise ConfigError(
                    f"The study {study.study_name!r} has no MLflow parent run recorded; delete the study and start the search again."
                )
            time.sleep(1.0)
        return study.user_attrs[PARENT_RUN_ATTR]

    # -- the loop

    def run(self, fixed_overrides: Sequence[str]) -> None:
        started = time.monotonic()
        self.client.update_run(self.parent_run_id, status="RUNNING")
        trial = None
        try:
            while True:
                self._recover_dead_trials()
                missing = self.n_trials - self._counted()
                if missing <= 0 or (self.timeout is not None and time.monotonic() - started > self.timeout):
                    break
                trial = self._ask()
                batch = [[*fixed_overrides, *self._trial_overrides(trial)]]
                self.sweeper.validate_batch_is_legal(batch)
                (result,) = self.launcher.launch(batch, initial_job_idx=trial.number)
                self._tell(trial, result)
                trial = None
        except BaseException:
            if trial is not None:
                self._interrupt(trial.number)
            self.client.set_terminated(self.parent_run_id, "KILLED")
            raise
        self.finish()

    def _counted(self) -> int:
        """Trials that count towards n_trials: finished ones (not interrupted ones) and those running now."""
        return sum(
            1
            for t in self.study.get_trials(deepcopy=False)
            if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
            or (t.state == TrialState.FAIL and not t.user_attrs.get(INTERRUPTED_ATTR))
        )

    def _ask(self) -> optuna.Trial:
        # Reseeded per trial: reproducible for one worker, distinct draws for parallel workers.
        seed = self.sampler_cfg.get("seed")
        offset = len(self.study.get_trials(deepcopy=False))
        self.study.sampler = instantiate(self.sampler_cfg, **({"seed": seed + offset} if seed is not None else {}))
        trial = self.study.ask({param.name: param.distribution for param in self.space})
        trial.set_user_attr(WORKER_ATTR, _this_worker())
        return trial

    def _trial_overrides(self, trial: optuna.Trial) -> list[str]:
        return [
            *(param.override(trial.params[param.name]) for param in self.space),
            f"search.trial={trial.number}",
            f"search.parent_run_id={self.parent_run_id}",
        ]

    def _tell(self, trial: optuna.Trial, result: Any) -> None:
        error = None
        try:
            result.return_value  # noqa: B018 -- re-raises the job's exception
            state = TrialState.COMPLETE
        except optuna.TrialPruned:
            state = TrialState.PRUNED
        except Exception as err:
            state, error = TrialState.FAIL, f"{type(err).__name__}: {err}"
        frozen = self.study._storage.get_trial(trial._trial_id)
        value = best_reported(frozen, self.direction)
        if state == TrialState.COMPLETE and value is None:
            state, error = TrialState.FAIL, f"no finite {self.metric} was reported; check search.metric names a logged validation metric"
        if error:
            trial.set_user_attr("error", error)
        self.study.tell(trial, value if state == TrialState.COMPLETE else None, state=state)
        self._mark_child_run(frozen, state)
        self._print_trial(trial.number, state, value, error)

    def _mark_child_run(self, trial: FrozenTrial, state: TrialState) -> None:
        run_id = trial.user_attrs.get(RUN_ID_ATTR)
        if run_id:
            self.client.set_tag(run_id, "optuna.state", state.name)
            if state != TrialState.COMPLETE:
                self.client.set_terminated(run_id, "KILLED" if state == TrialState.PRUNED else "FAILED")

    def _print_trial(self, number: int, state: TrialState, value: float | None, error: str | None) -> None:
        done = self._counted()
        shown = f"best {self.metric} {value:.4f}" if value is not None else "no value"
        line = f"[bold]{self.name}[/] trial {number}: {state.name} ({shown}); {done}/{self.n_trials} trials"
        try:
            best = self.study.best_trial
            line += f"; study best {best.value:.4f} (trial {best.number})"
        except ValueError:
            pass
        console.print(line + (f"\n  [red]{error}[/]" if error else ""), soft_wrap=True)

    # -- dead and interrupted trials

    def _interrupt(self, number: int) -> None:
        """Mark an unfinished trial FAIL (interrupted) and enqueue its parameters for the next run."""
        frozen = self.study.get_trials(deepcopy=False)[number]
        try:
            self.study._storage.set_trial_user_attr(frozen._trial_id, INTERRUPTED_ATTR, True)
            self.study.tell(number, state=TrialState.FAIL)
        except (RuntimeError, ValueError):
            return  # finished meanwhile, or another worker recovered it first
        self.study.enqueue_trial(frozen.params)
        run_id = frozen.user_attrs.get(RUN_ID_ATTR)
        if run_id:
            self.client.set_tag(run_id, "optuna.state", "INTERRUPTED")
            self.client.set_terminated(run_id, "KILLED")

    def _recover_dead_trials(self) -> None:
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if _is_dead(trial.user_attrs.get(WORKER_ATTR)):
                console.print(
                    f"{self.name}: trial {trial.number} was cut short by a dead worker; its parameters run again.", soft_wrap=True
                )
                self._interrupt(trial.number)

    # -- the report

    def finish(self) -> None:
        """Write the study's report and best config, and log them to the parent run."""
        trials = self.study.get_trials(deepcopy=False)
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        self.report_dir.mkdir(parents=True, exist_ok=True)
        self.study.trials_dataframe().to_csv(self.report_dir / "trials.csv", index=False)
        rows: dict[str, object] = {
            "trials": ", ".join(f"{n} {s.name.lower()}" for s, n in _state_counts(trials).items()),
            "storage": self.storage_label,
        }
        if complete:
            best = self.study.best_trial
            self.client.log_metric(self.parent_run_id, f"best_{self.metric}", best.value)
            self.client.set_tag(self.parent_run_id, "best_trial", str(best.number))
            for key, value in best.params.items():
                self.client.set_tag(self.parent_run_id, f"best.{key}", str(value))
            io.write_json(self.report_dir / "best.json", {"trial": best.number, self.metric: best.value, "params": best.params})
            experiment = self.write_experiment(best)
            rows |= {f"best {self.metric}": f"{best.value:.4f} (trial {best.number})", **{k: v for k, v in best.params.items()}}
            rows["best config"] = f"{experiment} (python -m rnnlab.train experiment={experiment.stem})"
        self._plots(complete)
        for path in sorted(self.report_dir.iterdir()):
            self.client.log_artifact(self.parent_run_id, str(path))
        rows["report"] = self.report_dir
        rows["MLflow parent run"] = f"{self.config.tracking.experiment} / {self.name}-study ({self.parent_run_id})"
        running = any(t.state == TrialState.RUNNING for t in trials)
        if not running and self._counted() >= self.n_trials:
            self.client.set_terminated(self.parent_run_id, "FINISHED")
        summary(f"hyperparameter search {self.name}", rows)

    def _plots(self, complete: list[FrozenTrial]) -> None:
        from optuna.visualization import matplotlib as vis

        figures = {"optimization_history": lambda: vis.plot_optimization_history(self.study, target_name=self.metric)}
        figures["intermediate_values"] = lambda: vis.plot_intermediate_values(self.study)
        varied = {k for t in complete for k in t.params if len({str(u.params.get(k)) for u in complete}) > 1}
        if len(complete) >= 2 and varied:
            evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
            importances = optuna.importance.get_param_importances(self.study, evaluator=evaluator)
            io.write_json(self.report_dir / "importances.json", importances)
            figures["param_importances"] = lambda: vis.plot_param_importances(self.study, evaluator=evaluator, target_name=self.metric)
        for name, draw in figures.items():
            axes = draw()
            axes.figure.savefig(self.report_dir / f"{name}.png", dpi=120, bbox_inches="tight")
            plt.close(axes.figure)

    def write_experiment(self, best: FrozenTrial) -> Path:
        """conf/experiment/<task>_<model>_tuned.yaml: the default config with the best trial's searched values."""
        task, model = self.config.task.name, self.config.model.name
        path = Path(self.config.search.experiment_file)
        values = OmegaConf.from_dotlist([Param(k, None).override(v) for k, v in best.params.items()])
        values.model = OmegaConf.merge(values.get("model", {}), {"name": f"{model}_tuned"})
        header = (
            "# @package _global_\n"
            f"# Written by the hyperparameter search {self.name!r} on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC:\n"
            f"# trial {best.number}, best {self.metric} {best.value:.4f} (validation; the test set was not looked at).\n"
            f"# Train it with: python -m rnnlab.train experiment={path.stem}\n"
            "# The search's fixed overrides (shorter budgets, say) are not part of it.\n"
        )
        defaults = OmegaConf.create({"defaults": [{"override /task": task}, {"override /model": model}]})
        io.write_text(path, header + OmegaConf.to_yaml(defaults) + OmegaConf.to_yaml(values))
        return path


def _state_counts(trials: list[FrozenTrial]) -> dict[TrialState, int]:
    counts: dict[TrialState, int] = {}
    for trial in trials:
        counts[trial.state] = counts.get(trial.state, 0) + 1
    return counts
