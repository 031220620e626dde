"""rnnlab's Optuna sweeper for Hydra: `python -m rnnlab.train -m hparams_search=<name>`.

Why rnnlab has its own: the released hydra-optuna-sweeper (1.3.0) pins optuna<3, cannot
prune or resume and breaks on SQLAlchemy 2 storages. This package is only the Hydra shell;
the search itself is rnnlab.search. Hydra imports every module under `hydra_plugins` on each
start, so nothing heavy is imported here.
"""

# No `from __future__ import annotations`: Hydra executes plugin modules outside sys.modules,
# where dataclasses cannot resolve string annotations; OmegaConf wants typing.Optional too.
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


@dataclass
class RnnlabOptunaSweeperConf:
    _target_: str = "hydra_plugins.rnnlab_optuna_sweeper.RnnlabOptunaSweeper"
    _recursive_: bool = False  # the sampler is built per trial, with a seed per trial
    n_trials: int = 20  # finished trials (complete, pruned or failed) the study should hold
    timeout: Optional[float] = None  # noqa: UP045  # seconds; this worker asks for no new trial after it
    sampler: Any = field(default_factory=lambda: {"_target_": "optuna.samplers.TPESampler", "seed": 42})
    enqueue_defaults: bool = True  # the first trial of a new study runs the config's own values where the space allows
    # config key -> Hydra sweep syntax: tag(log, interval(1e-4, 1e-2)), range(1, 4), choice(64, 128);
    # null drops a key that the config this one extends searches
    params: dict[str, Optional[str]] = field(default_factory=dict)  # noqa: UP045


ConfigStore.instance().store(group="hydra/sweeper", name="rnnlab_optuna", node=RnnlabOptunaSweeperConf, provider="rnnlab")


class RnnlabOptunaSweeper(Sweeper):
    def __init__(self, n_trials: int, timeout: float | None, sampler: Any, enqueue_defaults: bool, params: dict[str, str | None]) -> None:
        self.n_trials, self.timeout, self.sampler, self.enqueue_defaults, self.params = n_trials, timeout, sampler, enqueue_defaults, params

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> None:
        from rnnlab.config import exit_on_user_error
        from rnnlab.search import Search, fixed_overrides

        with exit_on_user_error():
            Search(self.config, self.launcher, self).run(fixed_overrides(arguments))
