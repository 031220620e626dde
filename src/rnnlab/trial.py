"""The trial side of a search: what a training job needs to run one Optuna trial of a study.

`rnnlab.train` opens its trial here, records its MLflow run on it and returns its objective;
the sweeper's side (the study, its workers, reports and plots) is `rnnlab.search`. Kept apart
so that a change to how studies run or report stales no training stage (`python -m rnnlab.resolve`
hashes the code a training imports).
"""

from __future__ import annotations

import contextlib
import math
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import optuna
from hydra.utils import instantiate
from omegaconf import DictConfig
from optuna.trial import FrozenTrial

# The trial's user attribute that names its MLflow child run.
RUN_ID_ATTR = "mlflow_run_id"
# In an RDB storage a running trial records a heartbeat this often (seconds); a trial silent for twice as long is
# failed by the sweeper (optuna.storages.fail_stale_trials) and run again: its worker, on any machine, died.
HEARTBEAT_SECONDS = 60

StaleCallback = Callable[[optuna.Study, FrozenTrial], None]


def open_storage(spec: str | None, on_stale: StaleCallback | None = None) -> optuna.storages.BaseStorage:
    """An RDB URL (postgresql://..., sqlite:///...) as Optuna's RDBStorage with heartbeats (`on_stale` runs for each
    trial found stale); null in memory (one process only, as in hydra-optuna-sweeper); anything else is a journal
    file path (local workers only: the sweeper finds a dead one by its process id)."""
    if spec is None:
        return optuna.storages.InMemoryStorage()
    if "://" in spec:
        with heartbeat_api():
            return optuna.storages.RDBStorage(
                spec, heartbeat_interval=HEARTBEAT_SECONDS, grace_period=2 * HEARTBEAT_SECONDS, heartbeat_stale_trial_callback=on_stale
            )
    path = Path(spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    return JournalStorage(JournalFileBackend(str(path)))


@contextlib.contextmanager
def heartbeat_api() -> Iterator[None]:
    """Optuna's heartbeat (RDBStorage's heartbeat_* arguments, fail_stale_trials, RetryHeartbeatStaleTrialCallback) is
    its documented way to retry a dead worker's trial, but marked experimental since 2.8: a warning a user can do
    nothing about, so silenced where rnnlab calls it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def trial_id(storage: optuna.storages.BaseStorage, study_name: str, number: int) -> int:
    """The storage's id of a study's trial `number`."""
    # Optuna has no public way from a trial number to its Trial: the storage's own (public) methods
    # give the id that optuna.Trial's constructor and the storage's setters take.
    return storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study_name), number)


def open_trial(cfg: DictConfig, scope: contextlib.ExitStack) -> optuna.Trial | None:
    """Inside a training job: the Optuna trial it runs, or None outside a search. In an RDB storage the trial's
    heartbeat is recorded until `scope` closes."""
    search = cfg.search
    if search.trial is None:
        return None
    pruner = instantiate(search.pruner) if search.pruner else optuna.pruners.NopPruner()
    storage = open_storage(search.storage)
    study = optuna.load_study(study_name=search.study, storage=storage, pruner=pruner)
    tid = trial_id(storage, study.study_name, int(search.trial))
    if isinstance(storage, optuna.storages.RDBStorage):
        scope.enter_context(_heartbeat(storage, tid))
    return optuna.Trial(study, tid)


@contextlib.contextmanager
def _heartbeat(storage: optuna.storages.RDBStorage, trial: int) -> Iterator[None]:
    """Record the trial's heartbeat now and every HEARTBEAT_SECONDS until the block ends. Optuna's own heartbeat
    thread runs only inside study.optimize, which a sweeper launching Hydra jobs does not call."""
    stopped = threading.Event()

    def beat() -> None:
        while True:
            storage.record_heartbeat(trial)
            if stopped.wait(HEARTBEAT_SECONDS):
                return

    thread = threading.Thread(target=beat, name=f"optuna-heartbeat-{trial}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stopped.set()
        thread.join()


def best_reported(trial: FrozenTrial, direction: str) -> float | None:
    """A trial's objective: the best of the values it reported after each epoch."""
    values = [v for v in trial.intermediate_values.values() if math.isfinite(v)]
    if not values:
        return None
    return max(values) if direction == "maximize" else min(values)


# The second objectives a trial can return beside its validation value (search.cost), each a number the run records.
COSTS = ("n_params",)


def best_in_history(rows: list[dict[str, float]], metric: str, direction: str) -> float:
    """The best per-epoch value of `metric` in a run's history (nan if none was finite): a two-objective trial's first
    value, as Optuna cannot take per-epoch reports (nor prune) in a study of several objectives."""
    values = [row[metric] for row in rows if metric in row and math.isfinite(row[metric])]
    if not values:
        return math.nan
    return max(values) if direction == "maximize" else min(values)


def trial_objective(trial: optuna.Trial) -> float:
    """What a training job returns to the sweeper: the best validation value it reported (nan if none was finite)."""
    frozen = trial.study.get_trials(deepcopy=False)[trial.number]
    value = best_reported(frozen, trial.study.direction.name.lower())
    return math.nan if value is None else value
