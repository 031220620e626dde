"""rnnlab's Optuna sweeper for Hydra: `python -m rnnlab.train -m hparams_search=<name>`, or any
Hydra app with `hydra/sweeper=rnnlab_optuna`.

Why rnnlab has its own: the released hydra-optuna-sweeper pins an old Optuna, cannot prune or
resume and breaks on SQLAlchemy 2 storages. This one keeps its config: the keys below up to
custom_search_space mean what they mean there, and hydra/sweeper/sampler=<preset> picks a
sampler. This package is only the Hydra shell; the search itself is rnnlab.search. Hydra
imports every module under `hydra_plugins` on each start, so nothing heavy is imported here.
"""

# No `from __future__ import annotations`: Hydra executes plugin modules outside sys.modules,
# where dataclasses cannot resolve string annotations; OmegaConf wants typing.Optional too.
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import MISSING, DictConfig


@dataclass
class RnnlabOptunaSweeperConf:
    _target_: str = "hydra_plugins.rnnlab_optuna_sweeper.RnnlabOptunaSweeper"
    _recursive_: bool = False  # the sampler is built by the search (per trial for TPE and random, with a seed per trial)
    defaults: list[Any] = field(default_factory=lambda: [{"sampler": "tpe"}])
    # hydra-optuna-sweeper's keys, with its meaning and defaults.
    sampler: Any = MISSING  # hydra/sweeper/sampler=tpe|random|cmaes|nsgaii|nsgaiii|qmc|gp|grid|bruteforce, then any of its arguments
    direction: Any = "minimize"  # or maximize, or a list of them: the task function then returns one value per direction
    storage: Optional[str] = None  # noqa: UP045  # an RDB URL, a journal file path (rnnlab), or null: in memory
    study_name: Optional[str] = None  # noqa: UP045  # null: Optuna makes up a name
    n_trials: int = 20  # trials this run launches
    n_jobs: int = 2  # trials launched together, one batch for the launcher (in parallel if the launcher runs jobs in parallel)
    max_failure_rate: float = 0.0  # the sweep stops when more than this fraction of a batch failed
    search_space: Optional[dict[str, Any]] = None  # noqa: UP045  # hydra-optuna-sweeper's deprecated form: refused, use params
    # config key -> sweep syntax: tag(log, interval(1e-4, 1e-2)), int(interval(8, 64)), range(1, 3) (1 to 3), choice(64, 128);
    # a fixed value is passed to every trial; null drops a key that the config this one extends searches (rnnlab)
    params: Optional[dict[str, Optional[str]]] = None  # noqa: UP045
    custom_search_space: Optional[str] = None  # noqa: UP045  # dotted path of a function (config, trial) -> None that suggests more
    # rnnlab's additions.
    timeout: Optional[float] = None  # noqa: UP045  # seconds; this worker launches no new trial after it
    total_trials: Optional[int] = None  # noqa: UP045  # the study's size: runs and workers stop once it holds this many trials
    enqueue_defaults: bool = False  # the first trial of a new study runs the config's own values where the space allows


ConfigStore.instance().store(group="hydra/sweeper", name="rnnlab_optuna", node=RnnlabOptunaSweeperConf, provider="rnnlab")
# hydra-optuna-sweeper's sampler presets, with Optuna's own defaults for every argument not given.
SAMPLERS = {
    "tpe": "TPESampler",
    "random": "RandomSampler",
    "cmaes": "CmaEsSampler",
    "nsgaii": "NSGAIISampler",
    "nsgaiii": "NSGAIIISampler",
    "qmc": "QMCSampler",
    "gp": "GPSampler",
    "grid": "GridSampler",
    "bruteforce": "BruteForceSampler",
}
for _name, _cls in SAMPLERS.items():
    # GridSampler takes its grid from the search space, so it is built as a partial.
    _node = {"_target_": f"optuna.samplers.{_cls}", "seed": None, **({"_partial_": True} if _name == "grid" else {})}
    ConfigStore.instance().store(group="hydra/sweeper/sampler", name=_name, node=_node, provider="rnnlab")


class RnnlabOptunaSweeper(Sweeper):
    def __init__(
        self,
        sampler: Any,
        direction: Any,
        storage: str | None,
        study_name: str | None,
        n_trials: int,
        n_jobs: int,
        max_failure_rate: float,
        search_space: Any,
        params: Any,
        custom_search_space: str | None,
        timeout: float | None,
        total_trials: int | None,
        enqueue_defaults: bool,
    ) -> None:
        self.sampler, self.direction, self.storage, self.study_name = sampler, direction, storage, study_name
        self.n_trials, self.n_jobs, self.max_failure_rate = n_trials, n_jobs, max_failure_rate
        self.search_space, self.params, self.custom_search_space = search_space, params, custom_search_space
        self.timeout, self.total_trials, self.enqueue_defaults = timeout, total_trials, enqueue_defaults

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> None:
        from rnnlab.config import exit_on_user_error
        from rnnlab.search import Search

        with exit_on_user_error():
            Search(self.config, self.launcher, self, arguments).run()
