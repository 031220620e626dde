"""Train, test and track one (task, model, seed): `python -m rnnlab.train task=sentiment model=lstm`.

Hydra composes the run from conf/; rnnlab.training trains, tests, tracks and writes the outputs. This module is the
command only: it imports the training code (torch, Lightning and MLflow, seconds of imports) after Hydra has composed
the config, so that a misspelt override or an unknown option is answered at once.
"""

from __future__ import annotations

import sys

from omegaconf import DictConfig

from rnnlab.config import hydra_entry


@hydra_entry
def main(cfg: DictConfig) -> float | None:
    """A search trial returns its objective: a Hydra sweeper reads the task function's return value."""
    from rnnlab import training

    try:
        metrics = training.train(cfg)
    except training.RunInterrupted as stop:
        print(f"rnnlab: {stop}", file=sys.stderr)
        sys.exit(stop.exit_code)
    return metrics.get("objective") if cfg.search.trial is not None else None


def warm_up() -> None:
    """What rnnlab.warm's server runs once after importing this module: the training code and MLflow's one-off costs,
    so that each training it forks starts ready."""
    from rnnlab import tracking, training  # noqa: F401

    tracking.warm_up()


if __name__ == "__main__":
    main()
