"""Turn a task's raw data into tensors in data/processed/<task>/: `python -m rnnlab.preprocess task=sentiment`."""

from hydra.utils import instantiate
from omegaconf import DictConfig

from rnnlab.config import hydra_entry


@hydra_entry
def main(cfg: DictConfig) -> None:
    instantiate(cfg.task.preprocess)


if __name__ == "__main__":
    main()
