"""Strong simple baselines on the networks' splits and test units: `python -m rnnlab.baselines task=<task>`.

A baseline answers "is this score good?": the comparison puts it in the task's table and tests every network
against it on the same test examples. A task's baseline is the function its config's `baselines:` names
(`_target_`, with its settings), one module of this package per task family, which returns each baseline's
per-example test outputs (the columns of a training's) and metrics:

- sentiment (rnnlab.baselines.sentiment): TF-IDF + logistic regression;
- textgen (rnnlab.baselines.textgen): interpolated Kneser-Ney character n-grams;
- speech (rnnlab.baselines.speech): log-mel statistics + logistic regression;
- memory tasks (rnnlab.baselines.memory): the training targets' best blind guess;
- forecast tasks (rnnlab.baselines.forecast): persistence, seasonal naives, M4's Naive2, automatic ARIMA and ETS. Their
  fits (scipy's optimisers) differ in the last digits between CPUs: stage outputs, as a network's metrics, not data.

Per baseline it writes, into `paths.baselines_dir` (metrics/<task>/baselines/), `<name>.json` and
`<name>_predictions.csv`, then the list of them, `baselines.json`, which compare reads. This module imports none of
the baselines: a stage's code (rnnlab.resolve) is this command and its task's baseline module only.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import pkgutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.utils import get_method, instantiate
from omegaconf import DictConfig, OmegaConf

from rnnlab import io
from rnnlab.config import hydra_entry
from rnnlab.console import summary
from rnnlab.errors import ConfigError, DataError

# The list of the baselines a stage wrote, in paths.baselines_dir.
MANIFEST = "baselines.json"


def written_baselines(baselines_dir: Path) -> list[str]:
    """The baselines the task's baseline stage last wrote to `baselines_dir`, in its order (none without the stage)."""
    manifest = baselines_dir / MANIFEST
    if not manifest.is_file():
        return []
    try:
        return list(json.loads(manifest.read_text())["baselines"])
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(f"{manifest} is unreadable ({err}): rerun the task's baseline stage (`dvc repro`).") from err


def run(cfg: DictConfig) -> dict[str, dict[str, Any]]:
    """Fit the task's baselines and write each one's metrics and per-example test outputs, all or none."""
    fit, settings = _baseline(cfg.task)
    results = fit(Path(cfg.paths.raw), instantiate(cfg.task.data, task=cfg.task.name), **settings)
    out = Path(cfg.paths.baselines_dir)
    with contextlib.ExitStack() as stack:
        for name, (outputs, metrics) in results.items():
            outputs.to_csv(stack.enter_context(io.atomic_path(out / f"{name}_predictions.csv")), index=False, float_format="%.6g")
            stack.enter_context(io.atomic_path(out / f"{name}.json")).write_text(io.json_text(metrics))
    # Written last, and what compare reads: a baseline dropped from the settings since an earlier run is not listed.
    io.write_json(out / MANIFEST, {"task": cfg.task.name, "baselines": list(results)})
    for name, (_, metrics) in results.items():
        shown = {key: f"{value:.4g}" for key, value in metrics.items() if isinstance(value, int | float)}
        summary(f"baseline {name} on {cfg.task.name}", {**shown, "written": out})
    return {name: metrics for name, (_, metrics) in results.items()}


def baseline_node(task: DictConfig) -> DictConfig | None:
    """A task config's `baselines:` where it names the function that fits them (`_target_`), else None."""
    baselines = task.get("baselines")
    return baselines if isinstance(baselines, DictConfig) and "_target_" in baselines else None


def _baseline(task: DictConfig) -> tuple[Callable[..., Any], dict[str, Any]]:
    """The function task.baselines names and its settings, checked against the function's parameters. Called
    directly rather than through hydra's `call`, which would wrap the baseline's own one-line errors in its exception."""
    baselines = baseline_node(task)
    if baselines is None:
        raise ConfigError(
            f"task {task.name} has no baseline: its config needs `baselines:` with the `_target_` function that fits it "
            "(one of rnnlab.baselines' modules) and its settings; see docs/development.md, Adding a task."
        )
    settings = OmegaConf.to_container(baselines, resolve=True)
    target = settings.pop("_target_")
    try:
        fit = get_method(target)
    except (ImportError, ValueError) as err:
        raise ConfigError(
            f"task.baselines._target_={target!r} is not a function that can be imported ({str(err).splitlines()[0]})."
        ) from err
    parameters = {name: p for name, p in inspect.signature(fit).parameters.items() if name not in ("raw_dir", "data")}
    unknown = sorted(set(settings) - set(parameters))
    if unknown:
        raise ConfigError(f"task.baselines.{unknown[0]} is not a setting of {target}; its settings are {', '.join(parameters) or 'none'}.")
    missing = [name for name, p in parameters.items() if p.default is inspect.Parameter.empty and name not in settings]
    if missing:
        raise ConfigError(
            f"task.baselines.{missing[0]} is missing: {target} needs {', '.join(missing)}; set it in conf/task/{task.name}.yaml."
        )
    return fit, settings


@hydra_entry(config_name="baselines")
def main(cfg: DictConfig) -> None:
    run(cfg)


def warm_up() -> None:
    """What rnnlab.warm's server imports once before it forks a stage: every baseline module (with the data modules
    and torch they import) and the libraries they import on first use, so that no stage pays for them."""
    import pmdarima  # noqa: F401
    import statsmodels.tsa.arima.model
    import statsmodels.tsa.holtwinters  # noqa: F401

    for module in pkgutil.iter_modules(__path__):
        if module.name != "__main__":  # the command itself
            importlib.import_module(f"{__name__}.{module.name}")
