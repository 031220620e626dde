"""Sample text from a trained character-level language model.

`python -m rnnlab.generate model=gru prompt="Once upon a time" length=500 temperature=0.8 seed=1`
loads the model registered in MLflow as rnnlab-textgen-<model> (or `checkpoint=path/to/model.ckpt`)
and prints the prompt followed by the sampled continuation.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import mlflow.pytorch
import torch
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig

from rnnlab.config import hydra_entry
from rnnlab.errors import ConfigError, DataError
from rnnlab.models.language_model import CharLanguageNet, LanguageModel, check_sampling, generate


def load_from_checkpoint(path: str | Path) -> CharLanguageNet:
    """The network of a textgen Lightning checkpoint, loaded with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"checkpoint={path} does not exist; train first (`python -m rnnlab.train task=textgen`) or fix the path.")
    hparams = torch.load(path, map_location="cpu", weights_only=True).get("hyper_parameters", {})
    if "vocabulary" not in hparams:
        raise ConfigError(f"checkpoint={path} is not a textgen language model (it has no vocabulary).")
    return LanguageModel.load_from_checkpoint(path, map_location="cpu", weights_only=True).net


def load_registered(tracking_uri: str, model_uri: str) -> CharLanguageNet:
    """The network registered in MLflow at `model_uri` (e.g. models:/rnnlab-textgen-gru/latest)."""
    mlflow.set_tracking_uri(tracking_uri)
    try:
        net = mlflow.pytorch.load_model(model_uri, map_location="cpu")
    except MlflowException as err:
        raise DataError(
            f"No model at {model_uri} in {tracking_uri} ({err.message.splitlines()[0]}); "
            "train one first (`python -m rnnlab.train task=textgen model=...`) or pass checkpoint=<path>."
        ) from err
    if not isinstance(net, CharLanguageNet):
        raise ConfigError(f"{model_uri} is a {type(net).__name__}, not a textgen language model.")
    return net


def sample(cfg: DictConfig) -> str:
    """The prompt and its sampled continuation, as the config asks."""
    check_sampling(cfg.length, cfg.temperature, cfg.top_k)  # before loading anything
    net = load_from_checkpoint(cfg.checkpoint) if cfg.checkpoint else load_registered(cfg.tracking.uri, cfg.model_uri)
    return cfg.prompt + generate(net, cfg.prompt, cfg.length, cfg.temperature, cfg.top_k, cfg.seed)


@hydra_entry(config_name="generate")
def main(cfg: DictConfig) -> None:
    print(sample(cfg))


if __name__ == "__main__":
    main()
