"""What the studies teach, per task: `python -m rnnlab.study_report` (the `study_report` DVC stage).

Every cell of a task is searched in the same space with the same number of trials (`hparams_search=<task>
model=<cell>`, study `<task>_<cell>`, journal `optuna/<task>_<cell>.log`). From those journals this writes, per
task, `reports/studies/<task>.md` and `<task>.json`:

- per cell: its trials (complete, pruned, failed), the best validation value, and how easy the cell is to tune,
  in the spirit of Greff et al. (2017, "LSTM: A Search Space Odyssey"): the median and the top decile of the
  trials' validation values. A trial's value is the best it reported, so a pruned trial counts with what it
  reached before Hyperband stopped it (a failed one does not count);
- per hyperparameter: its fANOVA importance for each cell side by side (Optuna's evaluator, seeded, on the
  complete trials);
- `reports/studies/<task>_trials.png`: every trial's value per cell, with the median and the top decile.

The test set plays no part: how the tuned cells of a task of `tuned` compare on it is `reports/comparison.md`'s
`<cell>_tuned` rows (a task of `studied` alone has none: the pipeline does not train its tuned cells).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.importance import FanovaImportanceEvaluator, get_param_importances
from optuna.trial import TrialState

from rnnlab import io
from rnnlab.config import exit_on_user_error, project_root
from rnnlab.errors import ConfigError
from rnnlab.resolve import pipeline_params, studied_metric, study_command
from rnnlab.trial import best_reported, open_storage

COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)


def cell_summary(study: optuna.Study) -> dict[str, Any]:
    """A study's trials as counts, the best validation value, the median and top decile of the trials' values
    (each trial's best reported value; top decile: the value that 10% of the trials reach or beat), and every value."""
    direction = study.direction.name.lower()
    trials = study.get_trials(deepcopy=False)
    values = [v for t in trials if t.state in COUNTED and (v := best_reported(t, direction)) is not None]
    counts = {state.name.lower(): sum(t.state == state for t in trials) for state in (*COUNTED, TrialState.FAIL)}
    if not values:
        return {"trials": counts, "best": None, "median": None, "top_decile": None, "values": []}
    return {
        "trials": counts,
        "best": float(min(values) if direction == "minimize" else max(values)),
        "median": float(np.median(values)),
        "top_decile": float(np.quantile(values, 0.1 if direction == "minimize" else 0.9)),
        "values": [float(v) for v in values],
    }


def importances(study: optuna.Study) -> dict[str, float] | None:
    """fANOVA importance of each searched hyperparameter (seeded: the same journal gives the same numbers), or None
    while fewer than two trials are complete."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 2:
        return None
    found = get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0))
    return {name: round(float(value), 4) for name, value in sorted(found.items())}


def task_report(studies_dir: Path, task: str, models: Sequence[str]) -> dict[str, Any] | None:
    """The summary and importances of every cell of `task` that has a study; None if none has."""
    cells = {}
    for model in models:
        path = studies_dir / f"{task}_{model}.log"
        if not path.is_file():
            continue
        study = optuna.load_study(study_name=f"{task}_{model}", storage=open_storage(str(path)))
        cells[model] = {**cell_summary(study), "importances": importances(study), "direction": study.direction.name.lower()}
    if not cells:
        return None
    return {"metric": studied_metric(task), "cells": cells}


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def markdown(task: str, result: dict[str, Any], *, pipeline_trains_tuned: bool) -> str:
    """The report; pipeline_trains_tuned: the task is in `tuned`, so comparison.md holds its tuned cells' test scores."""
    cells = result["cells"]
    test_scores = (
        "the tuned cells' test scores and verdicts are the `*_tuned` rows of [comparison.md](../comparison.md)."
        if pipeline_trains_tuned
        else f"{task} is not in `tuned` of params.yaml, so the pipeline does not train its tuned cells "
        f"(conf/experiment/{task}_<cell>_tuned.yaml) and [comparison.md](../comparison.md) has no test scores of them."
    )
    lines = [
        f"# What the studies teach: {task} ({result['metric']})",
        "",
        f"Written by `python -m rnnlab.study_report --tasks {task}` from the study journals `optuna/{task}_<cell>.log` (every",
        "cell searched in the same space with the same number of trials; [docs/search.md](../../docs/search.md)). Validation",
        f"values only: {test_scores}",
        "A trial's value is the best it reported (a trial Hyperband pruned counts with what it reached); top decile: the",
        "value that 10% of the trials reach or beat.",
        "",
        "| cell | complete | pruned | failed | best | median | top decile |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for model, cell in cells.items():
        t = cell["trials"]
        row = [model, t["complete"], t["pruned"], t["fail"], _fmt(cell["best"]), _fmt(cell["median"]), _fmt(cell["top_decile"])]
        lines.append("| " + " | ".join(map(str, row)) + " |")
    names = sorted({name for cell in cells.values() for name in (cell["importances"] or {})})
    if names:
        lines += ["", "fANOVA importance of each hyperparameter (Optuna's evaluator on the complete trials; a column sums to 1):", ""]
        lines += ["| hyperparameter | " + " | ".join(cells) + " |", "| --- |" + " --- |" * len(cells)]
        for name in names:
            lines.append(f"| `{name}` | " + " | ".join(_fmt((cell["importances"] or {}).get(name)) for cell in cells.values()) + " |")
    lines += ["", f"![{task}: every trial per cell]({task}_trials.png)"]
    return "\n".join(lines) + "\n"


def figure(task: str, result: dict[str, Any], path: Path) -> None:
    """Every trial's value per cell (jittered), with each cell's median (line) and top decile (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = result["cells"]
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(cells), 4))
    jitter = np.random.default_rng(0)
    for x, cell in enumerate(cells.values()):
        values = np.asarray(cell["values"])
        ax.scatter(x + jitter.uniform(-0.15, 0.15, len(values)), values, s=14, alpha=0.6)
        for key, style in (("median", "-"), ("top_decile", "--")):
            if cell[key] is not None:
                ax.hlines(cell[key], x - 0.3, x + 0.3, colors="black", linestyles=style)
    ax.set_xticks(range(len(cells)), list(cells))
    ax.set_ylabel(f"{result['metric']} (best per trial)")
    ax.set_title(f"{task}: trials per cell (line: median, dashed: top decile)")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def write(root: Path, task: str, models: Sequence[str], *, pipeline_trains_tuned: bool) -> Path:
    """reports/studies/<task>.md, .json and _trials.png from the task's study journals; the markdown file."""
    result = task_report(root / "optuna", task, models)
    if result is None:
        journals = ", ".join(f"optuna/{task}_{model}.log" for model in models)
        raise ConfigError(f"none of the study journals {journals} exists: run a study first, e.g. {study_command(task, models[0])}.")
    out = root / "reports" / "studies"
    out.mkdir(parents=True, exist_ok=True)
    figure(task, result, out / f"{task}_trials.png")
    io.write_json(out / f"{task}.json", result)
    io.write_text(out / f"{task}.md", markdown(task, result, pipeline_trains_tuned=pipeline_trains_tuned))
    return out / f"{task}.md"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rnnlab.study_report", description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", help="tasks to report (default: `studied` of params.yaml)")
    parser.add_argument("--models", nargs="+", help="cells to report (default: `models` of params.yaml)")
    args = parser.parse_args(argv)
    with exit_on_user_error():
        root = project_root()
        params = pipeline_params(root / "params.yaml")
        tasks, models = args.tasks or params["studied"], args.models or params["models"]
        if not tasks:
            raise ConfigError("no task to report: `studied` in params.yaml is empty; name tasks with --tasks, e.g. --tasks forecast.")
        for task in tasks:
            report = write(root, task, models, pipeline_trains_tuned=task in params["tuned"])
            print(f"{task}: {report.relative_to(root)}")


if __name__ == "__main__":
    main()
