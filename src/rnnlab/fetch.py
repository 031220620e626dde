"""Fetch a task's raw data into data/raw/<task>/: `python -m rnnlab.fetch task=sentiment`."""

from hydra.utils import instantiate
from omegaconf import DictConfig

import rnnlab.data.base  # noqa: F401  torch, Lightning, pandas: imported once by rnnlab.warm's server, not per task
from rnnlab.config import hydra_entry


@hydra_entry
def main(cfg: DictConfig) -> None:
    instantiate(cfg.task.fetch)


if __name__ == "__main__":
    main()
