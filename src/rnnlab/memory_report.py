"""The memory tasks' lag sweep as a table and figures: `python -m rnnlab.memory_report` (the `memory_report` DVC stage).

Reads the metrics files of the sweep's runs (pipelines/lags/dvc.yaml's `train_lag`: metrics/lags/<task>/<model>_lag<L>/seed<seed>.json)
of the memory tasks, models and lags that params.yaml lists, with its first seed, and writes under reports/:

- memory_lags.md and memory_lags.json: per task, each model's primary test metric at every lag, the chance level (the
  score of a guess that ignores the inputs) and the first lag from which the model stays at chance;
- memory_lags/<task>.png: the primary metric against the lag, one line per model, the chance level dashed.

A model is at chance at a lag when it closes less than `at_chance` of the gap between the chance level and a perfect
score (an MSE of 0, an accuracy of 1).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # figures are files, never windows
from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf

from rnnlab import io
from rnnlab.config import hydra_entry, pipeline_param
from rnnlab.console import summary
from rnnlab.data.memory import chance_level, is_int
from rnnlab.errors import ConfigError, DataError
from rnnlab.resolve import compose_run

FIGURES = "memory_lags"
LABELS = {"test_mse": "test MSE (lower is better)", "test_acc": "test accuracy per recalled symbol (higher is better)"}


def _names(value: Any, key: str) -> list:
    value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    if not isinstance(value, list):
        raise ConfigError(f"{key} must be a list, e.g. {key}=[...], got {value!r}.")
    return value


def task_settings(cfg: DictConfig) -> dict[str, Any]:
    """What the report reads of a memory task's composed config: its primary metric, that metric's direction
    (monitor_mode, as compare reads it) and its chance level."""
    task = cfg.task
    if "problem" not in task.fetch:
        raise ConfigError(f"task {task.name} is not a memory task (its fetch has no `problem`); list only memory tasks in memory_tasks.")
    chance = chance_level(task.fetch.problem, task.fetch.get("alphabet"))
    if task.primary_metric not in chance:
        raise ConfigError(
            f"task {task.name}: the report knows the chance level of {list(chance)}, not of its primary_metric {task.primary_metric}."
        )
    return {"metric": task.primary_metric, "mode": task.monitor_mode, "chance": chance[task.primary_metric]}


def skill(value: float, chance: float, mode: str) -> float:
    """The share of the gap between the chance level and a perfect score (0 for `min`, 1 for `max`) that `value` closes."""
    perfect = 1.0 if mode == "max" else 0.0
    return (value - chance) / (perfect - chance)


def sweep_metrics(metrics_dir: Path, task: str, model: str, lag: int, seed: int) -> dict[str, float]:
    """The test metrics of one run of the sweep."""
    path = metrics_dir / task / f"{model}_lag{lag}" / f"seed{seed}.json"
    stage = f"pipelines/lags/dvc.yaml:train_lag@{task}-{model}-{lag}"
    if not path.is_file():
        raise DataError(f"{path} is missing: train it with `dvc repro {stage}`, or drop lag {lag} from memory_lags.")
    try:
        metrics = json.loads(path.read_text())
    except ValueError as err:
        raise DataError(f"{path} is not a metrics file ({err}); train it again (`dvc repro {stage}`).") from None
    return {key: float(value) for key, value in metrics.items() if key.startswith("test_")}


def task_report(
    metrics_dir: Path, task: str, settings: dict[str, Any], models: list[str], lags: list[int], seed: int, at_chance: float
) -> dict:
    """One task's sweep: per model, the test metrics at every lag and the first lag from which it stays at chance."""
    result: dict[str, Any] = {**settings, "lags": lags, "models": {}}
    for model in models:
        metrics = {lag: sweep_metrics(metrics_dir, task, model, lag, seed) for lag in lags}
        for lag, values in metrics.items():
            if settings["metric"] not in values:
                raise DataError(f"the run of {task} x {model} at lag {lag} logged no {settings['metric']}: train it again.")
        values = {lag: metrics[lag][settings["metric"]] for lag in lags}
        at = [skill(values[lag], settings["chance"], settings["mode"]) < at_chance for lag in lags]
        # The first lag of the longest run of lags at chance that reaches the longest lag: a model that fails once and
        # recovers at a longer lag is not "at chance from" there.
        first = next((lags[i] for i in range(len(lags)) if all(at[i:])), None)
        result["models"][model] = {"values": values, "at_chance_from": first, "metrics": metrics}
    return result


def figure(task: str, report: dict[str, Any], seed: int, profile: str) -> Figure:
    """The primary metric against the lag (log scale), one line per model, the chance level dashed."""
    fig = Figure(figsize=(7, 4.5), layout="tight")  # no pyplot: no global figure state
    axes = fig.subplots()
    lags = report["lags"]
    for model, entry in report["models"].items():
        axes.plot(lags, [entry["values"][lag] for lag in lags], marker="o", label=model)
    axes.axhline(report["chance"], color="grey", linestyle="--", label=f"chance ({report['chance']:.3g})")
    # From a perfect score to past chance, so that a line's height reads as the share of the gap it closed.
    highest = max([report["chance"], *(value for entry in report["models"].values() for value in entry["values"].values())])
    axes.set_ylim(0, 1.02 if report["mode"] == "max" else 1.05 * highest)
    axes.set_xscale("log")
    axes.set_xticks(lags, [str(lag) for lag in lags])
    axes.minorticks_off()
    axes.set_xlabel("time lag (steps)")
    axes.set_ylabel(LABELS.get(report["metric"], report["metric"]))
    axes.set_title(f"{task}: {report['metric']} against the lag (seed {seed}, profile {profile})")
    axes.legend()
    return fig


def markdown(reports: dict[str, dict[str, Any]], seed: int, profile: str, at_chance: float) -> str:
    lines = [
        "# Memory tasks: the primary metric against the time lag",
        "",
        f"The lag sweep (`pipelines/lags/dvc.yaml`'s `train_lag`, profile {profile}, seed {seed}): every model trained once at",
        "each lag with its task's settings. Chance: the score of a guess that ignores the inputs. At chance from: the first lag from which",
        f"the model closes less than {at_chance:.0%} of the gap between chance and a perfect score, up to the longest lag.",
        "Written by `python -m rnnlab.memory_report`.",
    ]
    if not reports:
        lines += ["", "No memory task is swept (`memory_tasks` of params.yaml is empty)."]
    for task, report in reports.items():
        models = list(report["models"])
        better = "lower" if report["mode"] == "min" else "higher"
        lines += ["", f"## {task} ({report['metric']}, {better} is better; chance {report['chance']:.4f})", ""]
        lines += ["| lag | " + " | ".join(models) + " |", "| --- |" + " --- |" * len(models)]
        for lag in report["lags"]:
            lines.append(f"| {lag} | " + " | ".join(f"{report['models'][m]['values'][lag]:.4f}" for m in models) + " |")
        firsts = [report["models"][m]["at_chance_from"] for m in models]
        lines.append("| at chance from | " + " | ".join("—" if lag is None else str(lag) for lag in firsts) + " |")
        lines += ["", f"![{task}]({FIGURES}/{task}.png)"]
    return "\n".join(lines) + "\n"


def first_seed(seed: Any) -> int:
    """`seed`, or the first of params.yaml's seeds (the one the sweep trains) when null."""
    if seed is None:
        seeds = pipeline_param("seeds")
        seed = seeds[0] if isinstance(seeds, list) and seeds else seeds
    if not is_int(seed):
        raise ConfigError(f"seed must be null (params.yaml's first seed) or a whole number, got {seed!r}.")
    return seed


def write_report(cfg: DictConfig) -> dict[str, Any]:
    tasks = _names(cfg.tasks, "tasks")  # none: an empty report (params.yaml's memory_tasks=[] sweeps nothing)
    models, lags = (_names(cfg.models, "models"), sorted(_names(cfg.lags, "lags"))) if tasks else ([], [])
    if tasks and not (models and lags and all(is_int(lag) and lag > 0 for lag in lags)):
        raise ConfigError(f"models and lags must be non-empty lists, lags of positive whole numbers; got models={models}, lags={lags}.")
    if not (isinstance(cfg.at_chance, float) and 0 < cfg.at_chance < 1):
        raise ConfigError(f"at_chance must be a number in (0, 1), got {cfg.at_chance!r}.")
    seed, profile = first_seed(cfg.seed) if tasks else None, cfg.profile_name
    metrics_dir, output_dir = Path(cfg.metrics_dir), Path(cfg.output_dir)
    reports = {}
    for task in tasks:
        settings = task_settings(compose_run([f"task={task}", f"profile={profile}"]))
        reports[task] = task_report(metrics_dir, task, settings, models, lags, seed, cfg.at_chance)
    with io.atomic_dir(output_dir / FIGURES) as tmp:
        for task, report in reports.items():
            figure(task, report, seed, profile).savefig(tmp / f"{task}.png", dpi=120)
    io.write_text(output_dir / f"{FIGURES}.md", markdown(reports, seed, profile, cfg.at_chance))
    io.write_json(output_dir / f"{FIGURES}.json", {"profile": profile, "seed": seed, "at_chance": cfg.at_chance, "tasks": reports})
    return reports


@hydra_entry(config_name="memory_report")
def main(cfg: DictConfig) -> None:
    reports = write_report(cfg)
    rows = {}
    for task, report in reports.items():
        for model, entry in report["models"].items():
            first = entry["at_chance_from"]
            shown = ", ".join(f"{lag}: {value:.3g}" for lag, value in entry["values"].items())
            rows[f"{task} {model}"] = f"{shown}" + ("" if first is None else f" (at chance from {first})")
    summary("memory lags: the primary metric by lag", {**rows, "report": Path(cfg.output_dir) / f"{FIGURES}.md"})


if __name__ == "__main__":
    main()
