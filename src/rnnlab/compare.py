"""Compare the models of each task over seeds: `python -m rnnlab.compare` (the `compare` DVC stage).

Reads the finished training runs back from MLflow (experiment rnnlab-<task>, runs tagged task, model,
seed and profile) and writes reports/comparison.md and .json and PNG figures under reports/figures/:
per model the primary test metric as mean ± std over seeds with a Student t-interval, parameters,
seconds per epoch, latency and memory where logged; per pair of models a paired t-test over the seeds
both share. The report and figures are also logged to one run of the experiment rnnlab-compare.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # figures are files, never windows
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf
from scipy import stats

from rnnlab import io, tracking
from rnnlab.config import config_dir, hydra_entry
from rnnlab.console import summary
from rnnlab.errors import ConfigError, DataError

# Logged by every training run (the last two by runs that measure them), averaged over seeds: label and format in the report.
EXTRAS = {
    "n_params": ("parameters", ",.0f"),
    "seconds_per_epoch": ("s / epoch", ".1f"),
    "latency_ms_per_sequence": ("latency ms / seq", ".3g"),
    "peak_memory_mb": ("peak MB", ".0f"),
}
SEARCH_TAGS = ("optuna.trial", "optuna.study")  # a search's trials and its study's parent run are not seeds of a model
FIGURES = ("learning_curves", "metric_ci", "metric_vs_params")


def choices(group: str, requested: Any) -> list[str]:
    """The requested names of a config group (conf/<group>/), checked; all of the group's names for null."""
    known = sorted(path.stem for path in (config_dir() / group).glob("*.yaml"))
    if requested is None:
        return known
    names = [requested] if isinstance(requested, str) else [str(name) for name in requested]
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ConfigError(f"unknown {group} {', '.join(map(repr, unknown))}; known: {', '.join(known)} (conf/{group}/).")
    return names


def _runs(client: MlflowClient, experiment_id: str, profile: str) -> Iterator[Run]:
    token = None
    while True:
        page = client.search_runs(
            [experiment_id], f"tags.profile = '{profile}' AND attributes.status = 'FINISHED'", max_results=1000, page_token=token
        )
        yield from page
        token = page.token
        if not token:
            return


def load_runs(client: MlflowClient, tasks: list[str], models: list[str], profile: str, uri: str) -> pd.DataFrame:
    """One row per (task, model, seed): its newest FINISHED training run of `profile`, search runs left out."""
    rows = []
    for task in tasks:
        experiment = client.get_experiment_by_name(f"rnnlab-{task}")
        for run in _runs(client, experiment.experiment_id, profile) if experiment else ():
            tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
            if any(tag in tags for tag in SEARCH_TAGS) or tags.get("model") not in models:
                continue
            # The run's own config says which metric it was judged by and which direction is better.
            metric, mode = params.get("task/primary_metric"), params.get("task/monitor_mode")
            if metric not in metrics or mode not in ("min", "max"):
                raise DataError(
                    f"run {run.info.run_id} ({run.info.run_name}) has no task/primary_metric and task/monitor_mode "
                    "parameters with a logged value; only runs of `python -m rnnlab.train` can be compared."
                )
            run_info = {"model": tags["model"], "seed": int(tags["seed"]), "run_id": run.info.run_id, "start_time": run.info.start_time}
            logged = {"metric": metric, "mode": mode, "value": metrics[metric], **{key: metrics.get(key, math.nan) for key in EXTRAS}}
            rows.append({"task": task, **run_info, **logged})
    if not rows:
        searched = ", ".join(f"rnnlab-{task}" for task in tasks)
        raise DataError(
            f"no FINISHED training runs of profile {profile!r} for models {', '.join(models)} in experiments {searched} at {uri} "
            f"(search trials are not counted). Produce them with `dvc repro`, or `python -m rnnlab.train task={tasks[0]} "
            f"model={models[0]} seed=1 profile={profile}` for each seed, or compare another profile (profile=...)."
        )
    newest_first = pd.DataFrame(rows).sort_values("start_time", ascending=False)
    return newest_first.drop_duplicates(["task", "model", "seed"]).sort_values(["task", "model", "seed"]).reset_index(drop=True)


def describe(values: np.ndarray, confidence: float) -> dict[str, Any]:
    """Mean, sample std and t-interval of the mean over seeds; std and interval are undefined for one seed."""
    mean = float(np.mean(values))
    if len(values) < 2:
        return {"mean": mean, "std": None, "ci": None}
    # t-quantile times the standard error; written out so that equal values give a zero-width interval, not NaN.
    half = float(stats.t.ppf((1 + confidence) / 2, len(values) - 1) * stats.sem(values))
    return {"mean": mean, "std": float(np.std(values, ddof=1)), "ci": [mean - half, mean + half]}


def paired(first: pd.Series, second: pd.Series, mode: str, confidence: float, alpha: float) -> dict[str, Any]:
    """Paired t-test of first - second (Series indexed by seed) over the seeds both have, and its verdict."""
    shared = first.index.intersection(second.index)
    difference = first[shared] - second[shared]
    result = {"shared_seeds": [int(s) for s in shared], "mean_difference": float(difference.mean()), "ci": None, "p_value": None}
    if len(shared) < 2:
        return {**result, "winner": None, "verdict": "not enough seeds"}
    test = stats.ttest_rel(first[shared], second[shared])
    interval = test.confidence_interval(confidence)
    result |= {"ci": [float(interval.low), float(interval.high)], "p_value": float(test.pvalue)}
    if not test.pvalue < alpha:  # also when p is NaN (identical values on every seed)
        return {**result, "winner": None, "verdict": "no significant difference"}
    winner = first.name if (difference.mean() > 0) == (mode == "max") else second.name
    return {**result, "winner": winner, "verdict": f"{winner} better"}


def _json_safe(value: Any) -> Any:
    """NaN (a metric no run logged, a test of identical values) as None: JSON has no NaN."""
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_safe(item) for item in value]
    return None if isinstance(value, float) and math.isnan(value) else value


def build_report(runs: pd.DataFrame, pairs: list[list[str]], confidence: float, alpha: float, profile: str) -> dict[str, Any]:
    tasks = {}
    for task, task_runs in runs.groupby("task"):
        newest = task_runs.loc[task_runs["start_time"].idxmax()]  # its config decides the task's metric and direction
        by_model = {model: group.set_index("seed") for model, group in task_runs.groupby("model")}
        models = {
            model: {
                "seeds": group.index.tolist(),
                "run_ids": group["run_id"].tolist(),
                **describe(group["value"].to_numpy(), confidence),
                **{key: float(group[key].mean()) for key in EXTRAS},  # None (shown "—") where no run logged it
            }
            for model, group in by_model.items()
        }
        series = {model: group["value"].rename(model) for model, group in by_model.items()}
        tested = [
            {"first": a, "second": b, **paired(series[a], series[b], newest["mode"], confidence, alpha)}
            for a, b in pairs
            if a in series and b in series
        ]
        tasks[task] = {"metric": newest["metric"], "mode": newest["mode"], "models": models, "pairs": tested}
    report = {"profile": profile, "confidence": confidence, "alpha": alpha, "interval": "Student t over seeds", "test": "paired t"}
    return _json_safe(report | {"tasks": tasks})


def learning_curve(client: MlflowClient, run_ids: list[str]) -> pd.Series:
    """Mean over runs of val_loss per epoch (from 1); a run that stopped early counts only for its epochs."""
    curves = []
    for run_id in run_ids:
        history = pd.DataFrame(
            [(m.step, m.timestamp, m.value) for m in client.get_metric_history(run_id, "val_loss")], columns=["step", "timestamp", "value"]
        )
        # One value per validation epoch; a resumed run may have logged an epoch twice: its latest counts.
        per_epoch = history.sort_values(["step", "timestamp"]).drop_duplicates("step", keep="last")["value"]
        curves.append(per_epoch.reset_index(drop=True))
    mean = pd.concat(curves, axis=1).mean(axis=1)
    mean.index = mean.index + 1
    return mean


@contextmanager
def _figure(path: Path, title: str, xlabel: str, ylabel: str) -> Iterator[plt.Axes]:
    figure, ax = plt.subplots(figsize=(6.4, 4.2))
    try:
        yield ax
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        figure.savefig(path, dpi=120, bbox_inches="tight")
    finally:
        plt.close(figure)


def draw_figures(report: dict[str, Any], curves: dict[str, dict[str, pd.Series]], out: Path) -> None:
    """Per task, the FIGURES as out/<task>_<figure>.png."""
    for task, result in report["tasks"].items():
        metric, models = result["metric"], result["models"]
        names, means = list(models), [m["mean"] for m in models.values()]
        learning_curves, metric_ci, metric_vs_params = (out / f"{task}_{name}.png" for name in FIGURES)
        with _figure(learning_curves, f"{task}: validation loss, mean over seeds", "epoch", "val_loss") as ax:
            for model, curve in curves[task].items():
                ax.plot(curve.index, curve.to_numpy(), marker="o", label=model)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        with _figure(metric_ci, f"{task}: {metric}, mean and {report['confidence']:.0%} CI over seeds", "model", metric) as ax:
            # A model with one seed has no interval: its point is drawn without error bars.
            errors = np.array([[m["mean"] - m["ci"][0], m["ci"][1] - m["mean"]] if m["ci"] else [0.0, 0.0] for m in models.values()])
            ax.errorbar(names, means, yerr=errors.T, fmt="o", capsize=5)
        with _figure(metric_vs_params, f"{task}: {metric} against model size", "parameters", metric) as ax:
            ax.scatter([m["n_params"] for m in models.values()], means)
            for name, model in models.items():
                ax.annotate(name, (model["n_params"], model["mean"]), textcoords="offset points", xytext=(5, 5))


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _interval(ci: list[float] | None, spec: str, undefined: str) -> str:
    return f"[{ci[0]:{spec}}, {ci[1]:{spec}}]" if ci else undefined


def markdown(report: dict[str, Any]) -> str:
    level = f"{report['confidence']:.0%}"
    lines = [
        f"# GRU vs LSTM vs RNN over seeds (profile `{report['profile']}`)",
        "",
        f"Per model: the task's primary test metric over seeds as mean ± sample standard deviation, and a {level} confidence "
        "interval for the mean, a Student t-interval over seeds (mean ± t·s/√n); with one seed both are undefined. "
        "Pairs: paired t-test (scipy.stats.ttest_rel) of first - second over the seeds both models share, with the "
        f"{level} interval of the mean difference; a winner is named only where p < {report['alpha']}. "
        "Parameters, seconds per epoch, latency and memory are means over seeds; — means the runs did not log it.",
    ]
    for task, result in report["tasks"].items():
        metric, better = result["metric"], "higher" if result["mode"] == "max" else "lower"
        lines += ["", f"## {task}: {metric} ({better} is better)", ""]
        lines += [
            f"| model | {metric} mean ± std | {level} CI | seeds | {' | '.join(label for label, _ in EXTRAS.values())} |",
            "|---" * (4 + len(EXTRAS)) + "|",
        ]
        for model, m in result["models"].items():
            extras = [_fmt(m[key], spec) for key, (_, spec) in EXTRAS.items()]
            ci = _interval(m["ci"], ".4f", "undefined (one seed)")
            lines.append(f"| {model} | {m['mean']:.4f} ± {_fmt(m['std'], '.4f')} | {ci} | {len(m['seeds'])} | {' | '.join(extras)} |")
        if result["pairs"]:
            lines += [
                "",
                f"| pair | shared seeds | mean difference (first - second) | {level} CI | p (paired t) | verdict |",
                "|---" * 6 + "|",
            ]
        for p in result["pairs"]:
            verdict = f"**{p['winner']}** better" if p["winner"] else p["verdict"]
            lines.append(
                f"| {p['first']} vs {p['second']} | {len(p['shared_seeds'])} | {_fmt(p['mean_difference'], '+.4f')} "
                f"| {_interval(p['ci'], '+.4f', '—')} | {_fmt(p['p_value'], '.3g')} | {verdict} |"
            )
        lines += [""] + [f"![{task} {name}](figures/{task}_{name}.png)" for name in FIGURES]
    return "\n".join(lines) + "\n"


def log_report(cfg: DictConfig, client: MlflowClient, files: list[Path], figures: Path) -> str:
    """Log the report files and figures to a new run of the comparison experiment."""
    experiment_id = tracking.ensure_experiment(cfg.tracking)
    tags = {"profile": cfg.profile, "git_commit": tracking.git_commit(cfg.paths.root)}
    run_id = client.create_run(experiment_id, run_name=cfg.tracking.run_name, tags=tags).info.run_id
    try:
        for path in files:
            client.log_artifact(run_id, str(path))
        client.log_artifacts(run_id, str(figures), "figures")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id)
    return run_id


def _verdict(pair: dict[str, Any]) -> str:
    p_value = "" if pair["p_value"] is None else f" (p = {pair['p_value']:.2g})"
    return f"{pair['first']} vs {pair['second']}: {pair['verdict']}{p_value}"


def compare(cfg: DictConfig) -> dict[str, Any]:
    """Read the runs, write the report, its JSON and figures (each atomically), log them to MLflow; return the report."""
    if not (0 < cfg.alpha < 1 and 0 < cfg.confidence < 1):
        raise ConfigError(f"alpha and confidence must be in (0, 1), got alpha={cfg.alpha}, confidence={cfg.confidence}.")
    pairs = OmegaConf.to_container(cfg.pairs, resolve=True)
    if not all(isinstance(pair, list) and len(pair) == 2 for pair in pairs):
        raise ConfigError(f"pairs must be a list of [model, model], e.g. [[gru, lstm], [gru, rnn]], got {pairs}.")
    tasks, models = choices("task", cfg.tasks), choices("model", cfg.models)
    client = tracking.open_store(cfg.tracking.uri)
    runs = load_runs(client, tasks, models, cfg.profile, cfg.tracking.uri)
    report = build_report(runs, pairs, cfg.confidence, cfg.alpha, cfg.profile)
    curves = {
        task: {model: learning_curve(client, m["run_ids"]) for model, m in result["models"].items()}
        for task, result in report["tasks"].items()
    }
    out = Path(cfg.output_dir)
    with io.atomic_dir(out / "figures") as tmp:  # all figures or none: drawn before any report file is written
        draw_figures(report, curves, tmp)
        n_figures = len(list(tmp.glob("*.png")))
    io.write_json(out / "comparison.json", report)
    io.write_text(out / "comparison.md", markdown(report))
    run_id = log_report(cfg, client, [out / "comparison.md", out / "comparison.json"], out / "figures")
    verdicts = {task: "; ".join(map(_verdict, result["pairs"])) or "no pairs to test" for task, result in report["tasks"].items()}
    summary(
        f"Comparison of {len(runs)} runs (profile {cfg.profile})",
        {
            **verdicts,
            "report": out / "comparison.md",
            "JSON": out / "comparison.json",
            "figures": f"{out / 'figures'} ({n_figures} PNG)",
            "MLflow run": f"{cfg.tracking.experiment} / {cfg.tracking.run_name} ({run_id})",
        },
    )
    return report


@hydra_entry(config_name="compare")
def main(cfg: DictConfig) -> None:
    compare(cfg)


if __name__ == "__main__":
    main()
