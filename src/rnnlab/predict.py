"""Answer raw inputs with a registered model: `rnnlab-predict <task> <input>`.

    rnnlab-predict sentiment "A wonderful, moving film"
    rnnlab-predict speech clip.wav
    rnnlab-predict forecast recent.csv
    rnnlab-predict textgen "ROMEO:" --length 200 --temperature 0.8 --seed 1

loads `models:/rnnlab-<task>-<model>@<alias>` (default: the GRU's champion, which `python -m rnnlab.compare` sets;
the tuned GRU's on a task whose registry holds no default GRU) as an MLflow pyfunc from the project's store and prints
its predictions, then a summary table. The model brings its own task predictor (rnnlab.serving.RnnlabModel), which
reads the input, so nothing here depends on the task. Arguments are options, not Hydra overrides: a review or a prompt
is free text.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from hydra import compose, initialize_config_dir
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PyFuncModel
from mlflow.tracking import MlflowClient

from rnnlab.config import config_dir, exit_on_user_error
from rnnlab.console import summary
from rnnlab.errors import ConfigError, DataError
from rnnlab.serving import PROGRESS_BAR, InvalidRequest, load_served

# Sampling options of text generation; they reach the model as pyfunc params, so any model whose
# predictor declares them (TaskPredictor.default_params) takes them.
PARAM_OPTIONS = {"length": int, "temperature": float, "seed": int}


def tasks() -> list[str]:
    return sorted(path.stem for path in (config_dir() / "task").glob("*.yaml"))


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rnnlab-predict",
        description="Predict with a registered rnnlab model (by default models:/rnnlab-<task>-<model>@champion).",
        epilog="A champion is made by `dvc repro compare` or `python -m rnnlab.compare`.",
    )
    parser.add_argument("task", choices=tasks(), help="the task the model was trained for")
    parser.add_argument("input", help="sentiment: a review text; speech: a WAV file; forecast: a CSV of recent values; textgen: a prompt")
    parser.add_argument(
        "--model", help="the recurrent model (default: gru, or gru_tuned on a task whose registry holds only the tuned GRU)"
    )
    parser.add_argument("--alias", default="champion", help="the registered model's alias (default: champion)")
    parser.add_argument("--model-uri", help="any MLflow model URI, e.g. models:/rnnlab-sentiment-lstm/3 (overrides --model, --alias)")
    parser.add_argument("--tracking-uri", help="the MLflow store (default: the project's, as training uses it)")
    parser.add_argument("--length", type=int, help="textgen: characters to generate")
    parser.add_argument("--temperature", type=float, help="textgen: sampling temperature, > 0 (lower is more conservative)")
    parser.add_argument("--seed", type=int, help="textgen: the same seed gives the same text")
    return parser


def project_tracking_uri(task: str) -> str:
    """The store training writes to: `tracking.uri` of the project's composed config."""
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return str(compose(config_name="config", overrides=[f"task={task}"]).tracking.uri)


def default_model(tracking_uri: str, task: str) -> str:
    """gru, or gru_tuned where the registry holds a tuned GRU of the task and no default one: the pipeline trains only the
    tuned cells of the tasks of params.yaml's `tuned`."""
    client = MlflowClient(tracking_uri)

    def registered(model: str) -> bool:
        try:
            client.get_registered_model(f"rnnlab-{task}-{model}")
        except MlflowException:
            return False
        return True

    return "gru_tuned" if not registered("gru") and registered("gru_tuned") else "gru"


def registered_version(tracking_uri: str, model_uri: str) -> str:
    """`name vN` for a models:/<name>@<alias> or models:/<name>/<version> URI, else the URI."""
    name, _, alias = model_uri.removeprefix("models:/").partition("@")
    if not model_uri.startswith("models:/") or not alias:
        return model_uri
    try:
        return f"{name} v{MlflowClient(tracking_uri).get_model_version_by_alias(name, alias).version}"
    except MlflowException:
        return model_uri


def conform_to_signature(frame: pd.DataFrame, model: PyFuncModel, model_uri: str) -> pd.DataFrame:
    """`frame` with only the columns the model's signature declares. MLflow would drop the others with a
    warning, and refuse a frame that lacks one with a schema dump; name the missing columns instead."""
    schema = model.metadata.get_input_schema()
    if schema is None or not schema.has_input_names():
        return frame
    names = schema.input_names()
    missing = [name for name in schema.required_input_names() if name not in frame.columns]
    if missing:
        raise DataError(
            f"the input lacks the column(s) {missing} that {model_uri} takes (it has {list(map(str, frame.columns))}); "
            f"give the columns {names}."
        )
    return frame[[column for column in frame.columns if column in names]]


def check_store(tracking_uri: str, task: str) -> None:
    """Refuse a SQLite store that does not exist: opening it would create an empty MLflow database there."""
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri.removeprefix("sqlite:///")).is_file():
        raise ConfigError(
            f"there is no MLflow store at {tracking_uri}; check --tracking-uri (this project's is {project_tracking_uri(task)})."
        )


def predict(args: argparse.Namespace) -> None:
    tracking_uri = args.tracking_uri or project_tracking_uri(args.task)
    check_store(tracking_uri, args.task)
    model_uri = args.model_uri or f"models:/rnnlab-{args.task}-{args.model or default_model(tracking_uri, args.task)}@{args.alias}"
    params: dict[str, Any] = {name: getattr(args, name) for name in PARAM_OPTIONS if getattr(args, name) is not None}
    model, served = load_served(model_uri, tracking_uri)
    if served.task != args.task:
        raise ConfigError(
            f"{model_uri} is a {served.task} model (run {served.info['run_id']}), not a {args.task} one; "
            f"run `rnnlab-predict {served.task} ...` or name a {args.task} model."
        )
    predictor = served.predictor
    unknown = ", ".join(f"--{name}" for name in params if name not in predictor.default_params)
    if unknown:
        takes = ", ".join(f"--{name}" for name in predictor.default_params if name in PARAM_OPTIONS)
        held = f"they take only {takes}" if takes else f"they take none of {', '.join(f'--{name}' for name in PARAM_OPTIONS)}"
        raise ConfigError(f"{args.task} models do not take {unknown} ({held}); leave it out.")
    frame = conform_to_signature(type(predictor).read_input(args.input), model, model_uri)
    try:
        outputs = model.predict(frame, params=params or None)
    except InvalidRequest:
        raise
    except MlflowException as err:  # the signature's types: e.g. text where the model takes numbers
        raise DataError(f"{model_uri} refuses the input: {err.message.splitlines()[-1]}") from err
    print(predictor.describe(frame, outputs))
    used = {**predictor.default_params, **params}
    summary(
        f"rnnlab-predict {args.task}",
        {
            "model": registered_version(tracking_uri, model_uri),
            "URI": model_uri,
            "run": f"{served.info['run_id']} ({served.info['model']})",
            **({"params": ", ".join(f"{k}={v}" for k, v in used.items())} if used else {}),
            "predictions": len(outputs),
            "store": tracking_uri,
        },
    )


def main(argv: Sequence[str] | None = None) -> None:
    # MLflow's per-file download bars would bury the prediction.
    os.environ.setdefault(PROGRESS_BAR, "false")
    with exit_on_user_error():
        predict(parser().parse_args(argv))


if __name__ == "__main__":
    main()
