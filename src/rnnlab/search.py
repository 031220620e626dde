"""Hyperparameter search: an Optuna study run through Hydra multirun.

    python -m rnnlab.train -m hparams_search=sentiment_gru
    python my_app.py -m hydra/sweeper=rnnlab_optuna 'x=interval(-5.0, 5.0)' 'y=range(0, 10)'

rnnlab has its own Hydra sweeper (hydra_plugins/rnnlab_optuna_sweeper) because the released
hydra-optuna-sweeper pins an old Optuna, cannot prune, cannot resume and breaks on SQLAlchemy 2
storages. It keeps hydra-optuna-sweeper's config: the same keys under hydra.sweeper, the same
sampler presets (hydra/sweeper/sampler=...), the same mapping of sweep syntax to Optuna
distributions, and the objective is the task function's return value (a float, or a list of
floats for several directions), so any Hydra app can use it. The plugin is a thin shell around
`Search` below; the trial side (`open_trial`) runs inside `rnnlab.train`, wherever the Hydra
launcher put the job.

What it adds, for any app: a journal-file storage (optuna/<search>.log) so re-running the command
resumes the study and several workers can share it; `total_trials`, the size of the study all
runs and workers fill together; a trial whose process died (killed, power cut) is marked FAIL
and its parameters run again; finished trials are never repeated. For rnnlab.train (a config
with a `search` node), also: every trial reports its validation metric each epoch and the
configured pruner stops bad trials (optuna-integration's Lightning callback); the trial returns
the best value it reported; MLflow holds one parent run per study and a nested child run per
trial; at the end the parent holds the best value and parameters, the trial table, fANOVA
importances and plots, and the best parameters become conf/experiment/<task>_<model>_tuned.yaml.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep, Transformer
from hydra.errors import HydraException
from hydra.utils import get_method, instantiate
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode
from omegaconf import DictConfig, ListConfig, OmegaConf
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from rnnlab import io, tracking
from rnnlab.console import console, summary
from rnnlab.errors import ConfigError, RnnlabError
from rnnlab.trial import COSTS, RUN_ID_ATTR, heartbeat_api, open_storage, trial_id
from rnnlab.validation import is_number

SYNTAX_HELP = (
    "write e.g. tag(log, interval(1e-4, 1e-2)), interval(0.0, 0.5), int(interval(8, 64)), "
    "range(1, 3) (1, 2 and 3: the stop is included) or choice(64, 128, 256)"
)
DIRECTIONS = ("minimize", "maximize")
# Trial attributes: which process runs the trial and whether it was cut short (its MLflow run: trial.RUN_ID_ATTR).
WORKER_ATTR, INTERRUPTED_ATTR, PARENT_RUN_ATTR = "worker", "interrupted", "mlflow_parent_run_id"
GRID_SAMPLER = "optuna.samplers.GridSampler"
# Samplers whose only state across trials is their random generator: reseeded per trial, so that
# parallel workers draw distinct values. Others keep state of their own and are built once per worker.
RESEEDABLE = ("optuna.samplers.TPESampler", "optuna.samplers.RandomSampler")
# Of the others, the ones whose generator draws new values: built with the seed plus the trials the study already holds
# when a run resumes it, or they would draw the first run's values again (NSGA-II's first generation). Grid and QMC
# samplers keep their seed: it orders the grid, or scrambles the one sequence the study continues.
RESEEDED_ON_RESUME = (
    "optuna.samplers.NSGAIISampler",
    "optuna.samplers.NSGAIIISampler",
    "optuna.samplers.CmaEsSampler",
    "optuna.samplers.GPSampler",
)

optuna.logging.set_verbosity(optuna.logging.WARNING)
# Optuna flags its matplotlib plots experimental; the report uses them knowingly.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


class SweepFailed(RnnlabError):
    """More trials of a batch failed than hydra.sweeper.max_failure_rate allows."""


# ---------------------------------------------------------------------------- search space


@dataclass(frozen=True)
class Param:
    """One searched config key and its Optuna distribution; `add` for a `+key` not in the config."""

    name: str
    distribution: BaseDistribution
    add: bool = False

    def override(self, value: Any) -> str:
        shown = json.dumps(value) if value is None or isinstance(value, bool) else value  # null, true, false
        return f"{'+' if self.add else ''}{self.name}={shown}"


@dataclass(frozen=True)
class Space:
    """The searched keys, and the fixed overrides every trial gets (fixed values of hydra.sweeper.params
    and the command line's non-sweep overrides), as hydra-optuna-sweeper splits them."""

    params: list[Param]
    fixed: list[str] = field(default_factory=list)

    def distributions(self) -> dict[str, BaseDistribution]:
        return {param.name: param.distribution for param in self.params}


def parse_search_space(
    params: Mapping[str, str | None] | None, config: DictConfig, arguments: Sequence[str] = (), *, allow_empty: bool = False
) -> Space:
    """The search space from hydra.sweeper.params and the command line, in Hydra's sweep syntax,
    checked before any trial runs. As in hydra-optuna-sweeper, the command line comes after the
    params (a sweep there adds to the space or replaces an entry) and a key given a fixed value
    anywhere is not searched. An entry set to null is not searched either: a search config narrows
    the space of the one it extends that way."""
    parser = OverridesParser.create()
    searched: dict[str, Param] = {}
    fixed: dict[str, str] = {}
    for key, spec in (params or {}).items():
        if spec is None:
            continue
        try:
            override = parser.parse_override(f"{key}={spec}")
        except HydraException as err:
            raise ConfigError(f"search space entry `{key}: {spec}` is not valid sweep syntax ({err}); {SYNTAX_HELP}.") from None
        _add(override, f"search space entry `{key}: {spec}`", f"{key}={spec}", config, searched, fixed)
    try:
        overrides = parser.parse_overrides(list(arguments))
    except HydraException as err:
        raise ConfigError(f"Cannot parse the command line ({err}).") from None
    for override in overrides:
        _add(override, f"command-line sweep `{override.input_line}`", str(override.input_line), config, searched, fixed)
    for name in fixed:
        searched.pop(name, None)
    if not searched and not allow_empty:
        raise ConfigError(
            "The search space is empty; list the config keys to tune under hydra.sweeper.params or as sweeps on the command line, "
            + SYNTAX_HELP
            + "."
        )
    return Space(list(searched.values()), list(fixed.values()))


def _add(override: Override, where: str, line: str, config: DictConfig, searched: dict[str, Param], fixed: dict[str, str]) -> None:
    # The key without its +, ++ or ~ (get_key_element keeps them): `+x` and `x` name one key.
    name = override.key_or_group if override.package is None else f"{override.key_or_group}@{override.package}"
    if not override.is_sweep_override():
        searched.pop(name, None)
        fixed[name] = line
        return
    add = override.is_add() or override.is_force_add()
    # A config group (model=gru,lstm; encoder_shape, whose package is model.encoder) need not be a key of the composed
    # config; Hydra checks its options in the trial.
    if not add and "/" not in name and name not in group_choices(config) and not _is_key(config, name):
        raise ConfigError(f"{where}: `{name}` is not a key of the config; check its spelling, or write `+{name}` to add a new key.")
    fixed.pop(name, None)
    searched[name] = Param(name, distribution_of(override, where), add)


_ABSENT = object()


def _is_key(config: DictConfig, name: str) -> bool:
    if OmegaConf.select(config, name, default=_ABSENT, throw_on_resolution_failure=False) is not _ABSENT:
        return True
    # `x: ???`, a key still without its value, which a sweep may set as Hydra lets it (not a key under a missing parent).
    parent, _, leaf = name.rpartition(".")
    node = OmegaConf.select(config, parent, default=None, throw_on_resolution_failure=False) if parent else config
    # `in` on a DictConfig is False for a missing value; its keys() hold every key.
    return isinstance(node, DictConfig) and leaf in node.keys() and OmegaConf.is_missing(node, leaf)  # noqa: SIM118


def distribution_of(override: Override, where: str = "") -> BaseDistribution:
    """The Optuna distribution of one sweep override, as hydra-optuna-sweeper maps it:

    - choice(a, b, ...) and shuffle(range(...)): CategoricalDistribution of the values;
    - range(start, stop, step): IntDistribution(start, stop, step), the stop included, or a
      FloatDistribution with that step if any of the three is a float;
    - interval(low, high): FloatDistribution(low, high), or IntDistribution when both ends are
      ints (int(interval(...))); tag(log, ...) makes either log-scaled.

    What hydra-optuna-sweeper would fail on with an assertion or Optuna's error, or read silently
    differently from what was written (tag(log, ...) on a range), is refused here with the fix."""
    where = where or f"`{override.input_line}`"
    value = override.value()
    if isinstance(value, ChoiceSweep) or (isinstance(value, RangeSweep) and value.shuffle):
        choices = list(override.sweep_iterator(transformer=Transformer.encode))
        if not choices:
            raise ConfigError(f"{where} has no choices; {SYNTAX_HELP}.")
        for choice in choices:
            if not isinstance(choice, str | int | float | bool):
                raise ConfigError(f"{where}: a choice must be a string, number or boolean, not {choice!r}; {SYNTAX_HELP}.")
        return CategoricalDistribution(choices)
    if isinstance(value, RangeSweep):
        start, stop, step = value.start, value.stop, value.step
        if "log" in value.tags:
            raise ConfigError(
                f"{where}: a range cannot be log-scaled; write tag(log, int(interval({start}, {stop}))) for a log-scaled integer."
            )
        if step <= 0:
            raise ConfigError(
                f"{where}: the step must be positive (the stop is included); "
                f"write range({min(start, stop)}, {max(start, stop)}, {abs(step) or 1})."
            )
        if stop < start:
            raise ConfigError(
                f"{where} is empty: the start {start} is above the stop {stop}; write range({stop}, {start}) (the stop is included)."
            )
        if any(isinstance(x, float) for x in (start, stop, step)):
            return FloatDistribution(start, stop, step=step)
        return IntDistribution(int(start), int(stop), step=int(step))
    if isinstance(value, IntervalSweep):
        low, high, log = value.start, value.end, "log" in value.tags
        if low > high:
            raise ConfigError(f"{where}: the low end {low} is not below the high end {high}; write interval({high}, {low}).")
        if log and low <= 0:
            raise ConfigError(f"{where}: a log-scaled interval needs a positive low end, not {low}.")
        if isinstance(low, int) and isinstance(high, int):
            return IntDistribution(low, high, log=log)
        return FloatDistribution(low, high, log=log)
    raise ConfigError(f"{where} is a sweep the Optuna sweeper cannot search; {SYNTAX_HELP}.")


def group_choices(config: DictConfig) -> dict[str, Any]:
    """The option of each config group the run composed (hydra.runtime.choices, e.g. scheduler: cosine); empty for a
    config composed without Hydra's own node."""
    choices = OmegaConf.select(config, "hydra.runtime.choices", default=None)
    return dict(choices) if choices is not None else {}


def default_params(space: Space, config: DictConfig) -> dict[str, Any]:
    """The config's own values of the searched keys that lie in the space (a searched config group's: the option it
    composed): enqueued as the first trial (enqueue_defaults), so that a search starts from the default and its best is
    never worse on validation."""
    groups = group_choices(config)
    values = {p.name: groups[p.name] if p.name in groups else OmegaConf.select(config, p.name, default=None) for p in space.params}
    return {param.name: values[param.name] for param in space.params if _in_space(param.distribution, values[param.name])}


def _in_space(distribution: BaseDistribution, value: Any) -> bool:
    if isinstance(distribution, CategoricalDistribution):
        return value in distribution.choices
    if not (is_number(value) and distribution.low <= value <= distribution.high):
        return False
    if isinstance(distribution, IntDistribution):
        return float(value).is_integer() and (int(value) - distribution.low) % distribution.step == 0
    step = getattr(distribution, "step", None)
    return step is None or math.isclose(round((value - distribution.low) / step) * step, value - distribution.low, abs_tol=1e-9)


def directions_of(direction: Any) -> list[str]:
    """hydra.sweeper.direction as Optuna's list of directions: a name, an Enum such as
    hydra-optuna-sweeper's Direction, or a list of them for several objectives."""
    values = list(direction) if isinstance(direction, list | tuple | ListConfig) else [direction]
    names = [str(getattr(value, "name", value)) for value in values]
    if not names or any(name not in DIRECTIONS for name in names):
        raise ConfigError(
            f"hydra.sweeper.direction is {direction!r}; write minimize or maximize, "
            "or a list such as [minimize, maximize] for several objectives."
        )
    return names


def grid_choices(distribution: BaseDistribution, name: str) -> list[Any]:
    """The values GridSampler walks for one searched key: every value the distribution holds, a range's stop included
    (hydra-optuna-sweeper's grid stops one step short of it, unlike its other samplers: deliberately not copied)."""
    if isinstance(distribution, CategoricalDistribution):
        return list(distribution.choices)
    if isinstance(distribution, IntDistribution) and not distribution.log:
        return list(range(distribution.low, distribution.high + 1, distribution.step))
    if isinstance(distribution, FloatDistribution) and distribution.step is not None:
        n = round((distribution.high - distribution.low) / distribution.step)
        return [distribution.low + i * distribution.step for i in range(n + 1)]
    raise ConfigError(
        f"hydra/sweeper/sampler=grid needs a finite set of values, but `{name}` is {distribution}; "
        "write choice(...) or range(...) for it, or pick another sampler."
    )


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


def is_rnnlab_app(config: DictConfig) -> bool:
    """rnnlab.train's config (its `search` node): trials prune, report to MLflow and open the study themselves."""
    return OmegaConf.select(config, "search.parent_run_id", default=_ABSENT, throw_on_resolution_failure=False) is not _ABSENT


def _quoted(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


class Search:
    """The sweeper's side of a study: ask for trials, launch them as Hydra jobs, tell Optuna their return values."""

    def __init__(self, config: DictConfig, launcher: Any, sweeper: Any, arguments: Sequence[str] = ()) -> None:
        self.config, self.launcher, self.sweeper = config, launcher, sweeper
        self.rnnlab = is_rnnlab_app(config)
        self.directions = directions_of(sweeper.direction)
        self.n_trials, self.timeout, self.n_jobs = sweeper.n_trials, sweeper.timeout, sweeper.n_jobs
        self.total_trials, self.max_failure_rate = sweeper.total_trials, sweeper.max_failure_rate
        self._check_numbers()
        if sweeper.search_space:
            raise ConfigError(
                "hydra.sweeper.search_space is hydra-optuna-sweeper's deprecated form; write the space under hydra.sweeper.params "
                "in sweep syntax instead, e.g. lr: tag(log, interval(1e-4, 1e-2))."
            )
        self.extender = self._extender(sweeper.custom_search_space)
        self.space = parse_search_space(sweeper.params, config, arguments, allow_empty=self.extender is not None)
        self.name: str | None = sweeper.study_name
        self.storage_label = "in memory" if sweeper.storage is None else str(sweeper.storage)
        if self.rnnlab:
            self.metric = str(config.search.get("metric"))
            self._check_rnnlab()
            self.client = tracking.open_store(config.tracking.uri)
            self.report_dir = Path(config.search.report_dir)
        self.sampler_cfg = sweeper.sampler
        self.grid = self.sampler_cfg.get("_target_") == GRID_SAMPLER
        if self.grid:
            grid = {p.name: grid_choices(p.distribution, p.name) for p in self.space.params}
            self.n_trials = min(self.n_trials, math.prod(len(values) for values in grid.values()))
            self._grid = grid
        self.sampler = self._build_sampler(0)  # built now, so that a bad sampler setting fails before any trial
        self.storage = open_storage(sweeper.storage, on_stale=self._retry_stale)
        self.study, self.parent_run_id = self._open_study()
        self.name = self.study.study_name

    # -- setup

    def _check_numbers(self) -> None:
        if self.n_trials < 1 or (self.timeout is not None and self.timeout <= 0):
            raise ConfigError(
                f"hydra.sweeper needs n_trials >= 1 and a positive timeout in seconds or null (got {self.n_trials}, {self.timeout})."
            )
        if self.n_jobs < 1:
            raise ConfigError(f"hydra.sweeper.n_jobs is {self.n_jobs}; write the number of trials to launch at once, 1 or more.")
        if not 0.0 <= self.max_failure_rate <= 1.0:
            raise ConfigError(
                f"hydra.sweeper.max_failure_rate is {self.max_failure_rate}; "
                "write a fraction from 0.0 (stop at the first failure) to 1.0 (never stop)."
            )
        if self.total_trials is not None and self.total_trials < 1:
            raise ConfigError(f"hydra.sweeper.total_trials is {self.total_trials}; write the size of the study (1 or more) or null.")

    def _check_rnnlab(self) -> None:
        cost, direction = self.config.search.get("cost"), str(self.config.search.get("direction"))
        two = [direction, "minimize"]
        if cost is not None and cost not in COSTS:
            raise ConfigError(f"search.cost={cost} is not a cost a trial records; write one of {', '.join(COSTS)}, or null.")
        if cost is not None and self.directions != two:
            raise ConfigError(
                f"search.cost={cost} makes the study two-objective ({self.metric} and {cost}), but hydra.sweeper.direction "
                f"is {self.directions}; write hydra.sweeper.direction=[{','.join(two)}] (and hydra/sweeper/sampler=nsgaii)."
            )
        if cost is None and len(self.directions) != 1:
            raise ConfigError(
                f"hydra.sweeper.direction lists {len(self.directions)} objectives, but rnnlab.train returns one (the best search.metric) "
                f"unless search.cost names the second; write one direction, or add search.cost={COSTS[0]}."
            )
        if self.sweeper.storage is None:
            raise ConfigError(
                "hydra.sweeper.storage is null, but rnnlab.train's trials open the study from its storage; "
                "write a journal file path or an RDB URL (the hparams_search configs use search.storage)."
            )
        if not self.name:
            raise ConfigError(
                "hydra.sweeper.study_name (search.study) is not set; "
                "run a search through a config in conf/hparams_search/ (hparams_search=<name>)."
            )

    @staticmethod
    def _extender(path: str | None) -> Callable[[DictConfig, optuna.Trial], None] | None:
        if not path:
            return None
        try:
            return get_method(path)
        except Exception as err:
            raise ConfigError(
                f"hydra.sweeper.custom_search_space={path} is not a function that can be imported ({' '.join(str(err).split())}); "
                "write the dotted path of a function (config, trial) -> None."
            ) from None

    def _build_sampler(self, offset: int) -> optuna.samplers.BaseSampler:
        seed = self.sampler_cfg.get("seed")
        target = self.sampler_cfg.get("_target_")
        if target == "optuna.samplers.MOTPESampler":
            raise ConfigError(
                "hydra.sweeper.sampler is MOTPESampler (hydra-optuna-sweeper's motpe), which Optuna removed in version 4: "
                "its TPESampler searches several objectives too; write _target_: optuna.samplers.TPESampler in the sampler's config "
                "(or hydra.sweeper.sampler._target_=optuna.samplers.TPESampler on the command line)."
            )
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32):
            raise ConfigError(
                f"hydra.sweeper.sampler.seed must be a whole number from 0 to 2**32 - 1, got {seed!r}; "
                "write e.g. hydra.sweeper.sampler.seed=42."
            )
        reseed = {"seed": (seed + offset) % 2**32} if seed is not None and offset else {}  # numpy's seeds stop at 2**32 - 1
        try:
            sampler = instantiate(self.sampler_cfg, **reseed)
            return sampler(self._grid) if self.grid else sampler
        except Exception as err:
            raise ConfigError(
                f"hydra.sweeper.sampler ({target}) cannot be built: {' '.join(str(err).split())}; remove the settings it does not take "
                "(~hydra.sweeper.sampler.<key> on the command line) or pick another preset (hydra/sweeper/sampler=tpe, random, cmaes, ...)."
            ) from None

    def _open_study(self) -> tuple[optuna.Study, str | None]:
        """Create the study (and for rnnlab.train its MLflow parent run), or join the ones a previous run or another worker made."""
        try:
            study = optuna.create_study(study_name=self.name, storage=self.storage, sampler=self.sampler, directions=self.directions)
        except optuna.exceptions.DuplicatedStudyError:
            study = optuna.load_study(study_name=self.name, storage=self.storage, sampler=self.sampler)
            existing = [d.name.lower() for d in study.directions]
            if existing != self.directions:
                raise ConfigError(
                    f"The study {self.name!r} in {self.storage_label} was created to {', '.join(existing)}, "
                    f"not {', '.join(self.directions)}; delete that study or give this search another name."
                ) from None
            if self.sampler_cfg.get("_target_") in RESEEDED_ON_RESUME:
                study.sampler = self._build_sampler(len(study.get_trials(deepcopy=False)))
            return study, (self._parent_run_here(study) if self.rnnlab else None)
        run_id = None
        if self.rnnlab:
            run_id = self._create_parent_run(study.study_name)
            study.set_user_attr(PARENT_RUN_ATTR, run_id)
        if self.sweeper.enqueue_defaults:
            study.enqueue_trial(default_params(self.space, self.config))
        return study, run_id

    def _create_parent_run(self, name: str, tags: dict[str, str] | None = None) -> str:
        experiment_id = tracking.ensure_experiment(self.config.tracking)
        run = self.client.create_run(
            experiment_id,
            run_name=f"{name}-study",
            tags={
                "optuna.study": name,
                "optuna.storage": self.storage_label,
                "task": self.config.task.name,
                "model": self.config.model.name,
                **(tags or {}),
            },
        )
        for param in self.space.params:
            self.client.log_param(run.info.run_id, f"space.{param.name}", repr(param.distribution))
        self.client.log_param(run.info.run_id, "metric", self.metric)
        self.client.log_param(run.info.run_id, "direction", self.directions[0])
        return run.info.run_id

    def _parent_run_here(self, study: optuna.Study) -> str:
        """The study's MLflow parent run, in this MLflow store. A study resumed away from the store that holds its
        parent run (a committed journal on a fresh clone, a deleted mlruns/) gets a new parent run, recorded in the
        study for its other workers; the new run keeps the old id in its tag `optuna.previous_parent_run`."""
        recorded = self._await_parent_run(study)
        if self._in_store(recorded):
            return recorded
        run_id = self._create_parent_run(study.study_name, {"optuna.previous_parent_run": recorded})
        study.set_user_attr(PARENT_RUN_ATTR, run_id)
        adopted = study.user_attrs[PARENT_RUN_ATTR]
        if adopted != run_id and self._in_store(adopted):  # another worker, resuming at the same instant, recorded its own
            self.client.delete_run(run_id)
            return adopted
        console.print(
            f"{study.study_name}: its MLflow parent run {recorded} is not in {self.config.tracking.uri} (the study was started "
            f"with another MLflow store); its trials from now on are children of a new parent run, {run_id}.",
            soft_wrap=True,
        )
        return run_id

    def _in_store(self, run_id: str) -> bool:
        try:
            self.client.get_run(run_id)
        except MlflowException as err:
            if err.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
                raise
            return False
        return True

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

    def run(self) -> None:
        """Launch batches of n_jobs trials until this run launched n_trials (or the study holds total_trials,
        or the timeout passed), telling Optuna each trial's return value."""
        started, launched = time.monotonic(), 0
        if self.rnnlab:
            self.client.update_run(self.parent_run_id, status="RUNNING")
        pending: list[optuna.Trial] = []
        try:
            while True:
                self._recover_dead_trials()
                with heartbeat_api():  # RDB storages: trials whose heartbeat stopped, on any host
                    optuna.storages.fail_stale_trials(self.study)
                missing = self.n_trials - launched
                if self.total_trials is not None:
                    missing = min(missing, self.total_trials - self._counted())
                if missing <= 0 or (self.timeout is not None and time.monotonic() - started > self.timeout):
                    break
                for _ in range(min(self.n_jobs, missing)):
                    pending.append(self._ask())
                batch = [[*self.space.fixed, *self._trial_overrides(trial)] for trial in pending]
                self.sweeper.validate_batch_is_legal(batch)
                results = self.launcher.launch(batch, initial_job_idx=pending[0].number)
                launched += len(pending)
                failed = [error for trial, result in zip(pending, results, strict=True) if (error := self._tell(trial, result))]
                pending = []
                if failed and len(failed) / len(results) > self.max_failure_rate:
                    raise SweepFailed(
                        f"{len(failed)} of {len(results)} trials failed ({failed[0]}), more than hydra.sweeper.max_failure_rate="
                        f"{self.max_failure_rate} allows; fix the task, or raise max_failure_rate (1.0 never stops)."
                    )
        except BaseException as err:
            for trial in pending:
                self._interrupt(trial.number)
            if self.rnnlab:
                self.client.set_terminated(self.parent_run_id, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
            raise
        self.finish()

    def _counted(self) -> int:
        """Trials that count towards total_trials: finished ones (not interrupted nor retried ones) and those running now."""
        trials = self.study.get_trials(deepcopy=False)
        retried = {RetryHeartbeatStaleTrialCallback.retried_trial_number(t) for t in trials}
        return sum(
            1
            for t in trials
            if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
            or (t.state == TrialState.FAIL and not t.user_attrs.get(INTERRUPTED_ATTR) and t.number not in retried)
        )

    def _ask(self) -> optuna.Trial:
        trial = self.study.ask()
        if self.sampler_cfg.get("_target_") in RESEEDABLE:
            # Reseeded by the trial's number, which the storage gives each trial once: reproducible for one worker, and
            # distinct draws for workers that ask at the same instant (a count of the trials read before asking is not).
            self.study.sampler = self._build_sampler(trial.number)
        for name, distribution in self.space.distributions().items():  # what study.ask(distributions) does after asking
            _suggest(trial, name, distribution)
        trial.set_user_attr(WORKER_ATTR, _this_worker())
        if self.extender is not None:
            try:
                self.extender(self.config, trial)
            except BaseException:
                self.study.tell(trial, state=TrialState.FAIL)
                raise
        return trial

    def _trial_overrides(self, trial: optuna.Trial) -> list[str]:
        searched = {param.name: param for param in self.space.params}
        overrides = [searched[name].override(value) if name in searched else f"{name}={value}" for name, value in trial.params.items()]
        if self.rnnlab:
            overrides += [f"search.trial={trial.number}", f"search.parent_run_id={self.parent_run_id}"]
            # The trial opens the study the sweeper runs, also when hydra.sweeper names another than search.*.
            if self.name != self.config.search.study:
                overrides.append(f"search.study={_quoted(str(self.name))}")
            if self.storage_label != str(self.config.search.storage):
                overrides.append(f"search.storage={_quoted(self.storage_label)}")
        return overrides

    def _objective(self, returned: Any) -> list[float]:
        """The task function's return value as Optuna's values: a float, or one per direction."""
        if len(self.directions) == 1:
            try:
                values = [float(returned)]
            except (TypeError, ValueError):
                raise ValueError(f"Return value must be float-castable. Got {returned!r}.") from None
        else:
            try:
                values = [float(v) for v in returned]
            except (TypeError, ValueError):
                raise ValueError(f"Return value must be a list or tuple of float-castable values. Got {returned!r}.") from None
            if len(values) != len(self.directions):
                raise ValueError(f"The task returned {len(values)} values for {len(self.directions)} directions (hydra.sweeper.direction).")
        if not all(math.isfinite(v) for v in values):
            hint = "; check search.metric names a logged validation metric" if self.rnnlab else ""
            raise ValueError(f"the task returned {returned!r}, not a finite objective{hint}")
        return values

    def _tell(self, trial: optuna.Trial, result: Any) -> str | None:
        """Tell Optuna how the trial ended; its error if it failed."""
        values, state, error = None, TrialState.COMPLETE, None
        try:
            values = self._objective(result.return_value)  # re-raises the job's exception
        except optuna.TrialPruned:
            state = TrialState.PRUNED
        except Exception as err:
            state, error = TrialState.FAIL, f"{type(err).__name__}: {err}"
        if error:
            trial.set_user_attr("error", error)
        try:
            self.study.tell(trial, values, state=state)
        except RuntimeError as err:
            # GridSampler stops the study when its grid is done, which Optuna refuses outside optimize().
            if not (self.grid and "Study.stop" in str(err)):
                raise
        if self.rnnlab:
            self._mark_child_run(self.storage.get_trial(trial_id(self.storage, str(self.name), trial.number)), state)
        self._print_trial(trial.number, state, values, error)
        return error

    def _mark_child_run(self, trial: FrozenTrial, state: TrialState) -> None:
        run_id = trial.user_attrs.get(RUN_ID_ATTR)
        if run_id:
            self.client.set_tag(run_id, "optuna.state", state.name)
            if state != TrialState.COMPLETE:
                self.client.set_terminated(run_id, "KILLED" if state == TrialState.PRUNED else "FAILED")

    def _print_trial(self, number: int, state: TrialState, values: list[float] | None, error: str | None) -> None:
        label = f"best {self.metric}" if self.rnnlab else "value"
        shown = "no value" if values is None else f"{label} " + ", ".join(f"{v:.4f}" for v in values)
        line = f"[bold]{self.name}[/] trial {number}: {state.name} ({shown})"
        if self.total_trials is not None:
            line += f"; {self._counted()}/{self.total_trials} trials"
        if len(self.directions) == 1:
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
            self.storage.set_trial_user_attr(trial_id(self.storage, str(self.name), number), INTERRUPTED_ATTR, True)
            self.study.tell(number, state=TrialState.FAIL)
        except (RuntimeError, ValueError):
            return  # finished meanwhile, or another worker recovered it first
        self.study.enqueue_trial(frozen.params)
        run_id = frozen.user_attrs.get(RUN_ID_ATTR)
        if run_id and self.rnnlab and self._in_store(run_id):  # a trial run elsewhere has its run in another store
            self.client.set_tag(run_id, "optuna.state", "INTERRUPTED")
            self.client.set_terminated(run_id, "KILLED")

    def _retry_stale(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """A trial whose heartbeat stopped (its worker died, on any machine) runs again with its parameters; its
        MLflow run, if in this store, is marked as an interrupted trial's."""
        console.print(f"{self.name}: trial {trial.number}'s heartbeat stopped (a dead worker); its parameters run again.", soft_wrap=True)
        with heartbeat_api():
            RetryHeartbeatStaleTrialCallback()(study, trial)
        run_id = trial.user_attrs.get(RUN_ID_ATTR)
        if run_id and self.rnnlab and self._in_store(run_id):
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
        """Write optimization_results.yaml (as hydra-optuna-sweeper does) and, for rnnlab.train, the
        study's report and best config, logged to the parent run."""
        trials = self.study.get_trials(deepcopy=False)
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        rows: dict[str, object] = {
            "trials": ", ".join(f"{n} {s.name.lower()}" for s, n in _state_counts(trials).items()),
            "storage": self.storage_label,
        }
        if complete:
            results = self._write_results()
            rows["results"] = results
            if len(self.directions) > 1:
                rows["best trials (Pareto front)"] = ", ".join(str(t.number) for t in self.study.best_trials)
        if not self.rnnlab:
            if complete and len(self.directions) == 1:
                best = self.study.best_trial
                rows |= {"best value": f"{best.value:.6g} (trial {best.number})", **best.params}
            summary(f"hyperparameter search {self.name}", rows)
            return
        self.report_dir.mkdir(parents=True, exist_ok=True)
        self.study.trials_dataframe().to_csv(self.report_dir / "trials.csv", index=False)
        if complete and len(self.directions) > 1:  # a front has no single best configuration to write
            cost = str(self.config.search.cost)
            front = [{"trial": t.number, self.metric: t.values[0], cost: t.values[1], "params": t.params} for t in self.study.best_trials]
            io.write_json(self.report_dir / "pareto_front.json", sorted(front, key=lambda point: point[cost]))
            rows["Pareto front"] = ", ".join(f"{p[self.metric]:.4f} at {p[cost]:,.0f} (trial {p['trial']})" for p in front)
        elif complete:
            best = self.study.best_trial
            self.client.log_metric(self.parent_run_id, f"best_{self.metric}", best.value)
            for key, value in {"best_trial": best.number, **{f"best.{k}": v for k, v in best.params.items()}}.items():
                shared_tag(self.client, self.parent_run_id, key, str(value))
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
        if not running and self._counted() >= (self.total_trials or self.n_trials):
            self.client.set_terminated(self.parent_run_id, "FINISHED")
        summary(f"hyperparameter search {self.name}", rows)

    def _write_results(self) -> Path:
        """<sweep dir>/optimization_results.yaml, with hydra-optuna-sweeper's keys."""
        if len(self.directions) == 1:
            best = self.study.best_trial
            results: dict[str, Any] = {"name": "optuna", "best_params": best.params, "best_value": best.value}
        else:
            front = [{"params": t.params, "values": t.values} for t in self.study.best_trials]
            results = {"name": "optuna", "solutions": front}
        path = Path(self.config.hydra.sweep.dir) / "optimization_results.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(results), path)
        return path

    def _plots(self, complete: list[FrozenTrial]) -> None:
        from optuna.visualization import matplotlib as vis

        if len(self.directions) > 1:  # the history, reports and importances are single-objective views
            figures = {"pareto_front": lambda: vis.plot_pareto_front(self.study, target_names=[self.metric, str(self.config.search.cost)])}
            self._save(figures)
            return
        figures = {"optimization_history": lambda: vis.plot_optimization_history(self.study, target_name=self.metric)}
        figures["intermediate_values"] = lambda: vis.plot_intermediate_values(self.study)
        varied = {k for t in complete for k in t.params if len({str(u.params.get(k)) for u in complete}) > 1}
        if len(complete) >= 2 and varied:
            evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
            importances = optuna.importance.get_param_importances(self.study, evaluator=evaluator)
            io.write_json(self.report_dir / "importances.json", importances)
            figures["param_importances"] = lambda: vis.plot_param_importances(self.study, evaluator=evaluator, target_name=self.metric)
        self._save(figures)

    def _save(self, figures: dict[str, Callable[[], Any]]) -> None:
        for name, draw in figures.items():
            axes = draw()
            axes.figure.savefig(self.report_dir / f"{name}.png", dpi=120, bbox_inches="tight")
            plt.close(axes.figure)

    def write_experiment(self, best: FrozenTrial) -> Path:
        """conf/experiment/<task>_<model>_tuned.yaml: the default config with the best trial's searched values."""
        task, model = self.config.task.name, self.config.model.name
        path = Path(self.config.search.experiment_file)
        # A searched config group (scheduler: choice(cosine, plateau)) is an option of the defaults list, not a value.
        groups = group_choices(self.config)
        chosen = {key: value for key, value in best.params.items() if key in groups}
        values = OmegaConf.from_dotlist(
            [Param(k, CategoricalDistribution([v])).override(v) for k, v in best.params.items() if k not in chosen]
        )
        values.model = OmegaConf.merge(values.get("model", {}), {"name": f"{model}_tuned"})
        header = (
            "# @package _global_\n"
            f"# Written by the hyperparameter search {self.name!r} on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC:\n"
            f"# trial {best.number}, best {self.metric} {best.value:.4f} (validation; the test set was not looked at).\n"
            f"# Train it with: python -m rnnlab.train experiment={path.stem}\n"
            "# The search's fixed overrides (shorter budgets, say) are not part of it.\n"
        )
        overrides = {"task": task, "model": model, **chosen}
        defaults = OmegaConf.create({"defaults": [{f"override /{group}": option} for group, option in overrides.items()]})
        io.write_text(path, header + OmegaConf.to_yaml(defaults) + OmegaConf.to_yaml(values))
        return path


def shared_tag(client: Any, run_id: str, key: str, value: str, attempts: int = 3) -> None:
    """Set a tag of a run that other workers of the study write too: two workers that finish together insert the same
    new tag at once, and SQLite refuses the second insert (UNIQUE constraint); tried again, it updates the tag."""
    for attempt in range(attempts):
        try:
            client.set_tag(run_id, key, value)
            return
        except MlflowException as err:
            if "UNIQUE constraint failed" not in str(err) or attempt == attempts - 1:
                raise
            time.sleep(0.1 * (attempt + 1))


def _suggest(trial: optuna.Trial, name: str, distribution: BaseDistribution) -> None:
    """What study.ask(fixed_distributions) does for one parameter, through the trial's public suggest methods."""
    if isinstance(distribution, CategoricalDistribution):
        trial.suggest_categorical(name, distribution.choices)
    elif isinstance(distribution, IntDistribution):
        trial.suggest_int(name, distribution.low, distribution.high, step=distribution.step, log=distribution.log)
    else:
        trial.suggest_float(name, distribution.low, distribution.high, step=distribution.step, log=distribution.log)


def _state_counts(trials: list[FrozenTrial]) -> dict[TrialState, int]:
    counts: dict[TrialState, int] = {}
    for trial in trials:
        counts[trial.state] = counts.get(trial.state, 0) + 1
    return counts
