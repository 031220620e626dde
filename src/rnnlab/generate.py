"""Sample text from a trained character-level language model.

`python -m rnnlab.generate model=gru prompt="Once upon a time" length=500 temperature=0.8 seed=1`
loads the model registered in MLflow as rnnlab-textgen-<model> (`model_uri`, by default its newest version;
`model_uri='models:/rnnlab-textgen-gru@champion'` for the champion that rnnlab-predict uses), or
`checkpoint=path/to/model.ckpt`, and prints the prompt followed by the sampled continuation.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import mlflow.models
import mlflow.pytorch
import torch
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig

from rnnlab.config import hydra_entry
from rnnlab.errors import ConfigError, DataError
from rnnlab.models.language_model import CharLanguageNet, LanguageModel, check_prompt, check_sampling, generate
from rnnlab.serving import load_served


def resolve_checkpoint(path: str | Path, root: str | Path) -> Path:
    """`path` as given if it is absolute or exists from the current directory, else under the project root,
    so checkpoint=models/textgen/gru/model.ckpt works from anywhere, like every other path of the project."""
    path = Path(path)
    return path if path.is_absolute() or path.exists() else Path(root) / path


def load_from_checkpoint(path: str | Path) -> CharLanguageNet:
    """The network of a textgen Lightning checkpoint, loaded with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"checkpoint={path} does not exist; train first (`python -m rnnlab.train task=textgen`) or fix the path.")
    fix = "pass the model.ckpt that training wrote, e.g. models/textgen/gru/model.ckpt"
    # torch.load fails in many ways on other files (UnpicklingError, RuntimeError, EOFError, KeyError, ...).
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise DataError(f"checkpoint={path} is not a Lightning checkpoint ({type(err).__name__} reading it); {fix}.") from err
    if not isinstance(checkpoint, dict):
        raise DataError(f"checkpoint={path} is not a Lightning checkpoint (it holds a {type(checkpoint).__name__}); {fix}.")
    hparams = checkpoint.get("hyper_parameters", {})
    if "vocabulary" not in hparams:
        raise ConfigError(f"checkpoint={path} is not a textgen language model (it has no vocabulary).")
    return LanguageModel.load_from_checkpoint(path, map_location="cpu", weights_only=True).net


def load_registered(tracking_uri: str, model_uri: str) -> CharLanguageNet:
    """The network registered in MLflow at `model_uri` (e.g. models:/rnnlab-textgen-gru/latest): a training run's
    PyTorch model, or the serving pyfunc that `python -m rnnlab.compare` registers as the champion (and which is
    then the newest version), the same model `rnnlab-predict textgen` loads."""
    mlflow.set_tracking_uri(tracking_uri)
    try:
        flavors = mlflow.models.get_model_info(model_uri).flavors
    except MlflowException as err:
        raise DataError(
            f"No model at {model_uri} in {tracking_uri} ({err.message.splitlines()[0]}); "
            "train one first (`python -m rnnlab.train task=textgen model=...`) or pass checkpoint=<path>."
        ) from err
    # A serving pyfunc has no pytorch flavor of its own: its network is inside the RnnlabModel.
    pytorch = "pytorch" in flavors
    net = mlflow.pytorch.load_model(model_uri, map_location="cpu") if pytorch else load_served(model_uri, tracking_uri)[1].net
    if not isinstance(net, CharLanguageNet):
        raise ConfigError(f"{model_uri} is a {type(net).__name__}, not a textgen language model.")
    return net


def sample(cfg: DictConfig) -> str:
    """The prompt and its sampled continuation, as the config asks."""
    check_prompt(cfg.prompt)  # before loading anything
    check_sampling(cfg.length, cfg.temperature, cfg.top_k)
    if cfg.checkpoint:
        net = load_from_checkpoint(resolve_checkpoint(str(cfg.checkpoint), cfg.paths.root))
    else:
        net = load_registered(cfg.tracking.uri, cfg.model_uri)
    return cfg.prompt + generate(net, cfg.prompt, cfg.length, cfg.temperature, cfg.top_k, cfg.seed)


@hydra_entry(config_name="generate")
def main(cfg: DictConfig) -> None:
    print(sample(cfg))


if __name__ == "__main__":
    main()
