"""Where a training writes, and what it may delete: only what it created.

A run replaces its model and plots folders as a whole and clears the checkpoints and figures of its
run folder before it starts afresh. Pointed at the wrong place (`paths.run_dir=reports`, `.`, a home
folder, `paths.plots_dir=reports/figures`) that would delete files the run never made, so every `paths.*`
a run writes is resolved against the project root and checked here before anything is written.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from rnnlab.errors import ConfigError

# Written into a run folder by the run that created it: the (task, model, seed) that owns the folder.
MARKER = ".rnnlab-run"
# What a run writes into its run folder, and so may clear before starting afresh.
RUN_CONTENT = ("checkpoints", "figures")
# What Hydra writes into a job's folder (and its *.log), which a search's trial uses as its run folder: Hydra's, not
# foreign. Only these may be in a run folder without a marker: checkpoints or figures there are some other program's.
HYDRA_CONTENT = (".hydra",)
# The figures a run saves (tracking.save_figure refuses other names), as <name>.png: all that its plots folder holds.
FIGURES = ("confusion_matrix", "forecast")
OUTPUT_DIRS = ("run_dir", "model_dir", "plots_dir")
OUTPUT_FILES = ("metrics_file", "history_file", "predictions_file")
# The project's own folders, where no run output belongs: its sources, configs and documentation, the data, reports
# and resolved configs that other stages write, the training stages' pipeline files and locks, the study journals
# and the MLflow store.
FOREIGN = ("conf", "src", "tests", "docs", ".git", ".dvc", ".ci", "data", "reports", "resolved", "pipelines", "optuna", "mlruns")
# The folders that hold every run's outputs: a run's belong below them, never in their place.
PROTECTED = (*FOREIGN, "metrics", "models", "plots")


def resolve_paths(cfg: DictConfig) -> None:
    """Make every relative `paths.*` relative to the project root (`paths.root`), not to the working directory."""
    root = Path(cfg.paths.root)
    with open_dict(cfg.paths):
        for key in ("raw", "processed", *OUTPUT_DIRS, *OUTPUT_FILES):
            value = Path(cfg.paths[key]).expanduser()
            if not value.is_absolute():
                cfg.paths[key] = str(root / value)


def check_outputs(cfg: DictConfig) -> None:
    """Refuse an output path that would replace or clear a folder of the project, its root, or a folder above it, or
    write into the project's sources, data or reports; and a model or plots folder that another run (or no run) made."""
    root = Path(cfg.paths.root).resolve()
    for key in (*OUTPUT_DIRS, *OUTPUT_FILES):
        path = Path(cfg.paths[key]).resolve()
        folder = path if key in OUTPUT_DIRS else path.parent
        top_level = folder.parent == root and folder.name in PROTECTED
        inside_foreign = any(folder.is_relative_to(root / name) for name in FOREIGN)
        if folder == root or root.is_relative_to(folder) or top_level or inside_foreign:
            raise ConfigError(
                f"paths.{key}={cfg.paths[key]} would {'replace' if key in OUTPUT_DIRS else 'write into'} {folder}, a folder of "
                f"the project (or above it) that this run did not create; give the run a folder of its own, e.g. the default "
                f"paths.{key} under {_default_area(key)}."
            )
    for key, ours in (("model_dir", _is_model_dir_of), ("plots_dir", _is_plots_dir)):  # replaced as a whole when it publishes
        folder = Path(cfg.paths[key])
        if folder.is_dir() and any(folder.iterdir()) and not ours(folder, cfg):
            raise ConfigError(
                f"paths.{key}={cfg.paths[key]} holds files that no earlier run of {run_owner(cfg)} wrote there, and a run replaces "
                f"its {key} as a whole: point paths.{key} at a new or empty folder (the default is under {_default_area(key)})."
            )


def run_owner(cfg: DictConfig) -> str:
    """The (task, model, seed) a run's folders belong to, as its run folder's marker names it."""
    return f"{cfg.task.name}/{cfg.model.name}/seed{cfg.seed}"


def _is_model_dir_of(folder: Path, cfg: DictConfig) -> bool:
    """A model folder that a run of this (task, model, seed) wrote: its model.ckpt and the config.yaml naming the run
    (no marker file: the folder is a DVC output that a checkout restores as it was written)."""
    if not {p.name for p in folder.iterdir()} <= {"config.yaml", "model.ckpt"}:
        return False
    try:
        written = OmegaConf.load(folder / "config.yaml")
        return (written.task.name, written.model.name, written.seed) == (cfg.task.name, cfg.model.name, cfg.seed)
    except (OSError, ValueError, AttributeError, yaml.YAMLError, OmegaConfBaseException):  # missing, not YAML, not a run's
        return False


def _is_plots_dir(folder: Path, cfg: DictConfig) -> bool:
    """A plots folder holds the figures a run saves and nothing else (DVC renders every file of it, so no marker)."""
    return all(p.is_file() and p.suffix == ".png" and p.stem in FIGURES for p in folder.iterdir())


def _claimed(folder: Path) -> str | None:
    """The run a folder's marker names; None if it has none, or an empty one (cut short by a full disk)."""
    marker = folder / MARKER
    return (marker.read_text().strip() or None) if marker.is_file() else None


def claim_run_dir(cfg: DictConfig) -> None:
    """Take the run folder for this (task, model, seed), refusing one that holds anything else or belongs to another run."""
    run_dir, owner = Path(cfg.paths.run_dir), run_owner(cfg)
    claimed = _claimed(run_dir)
    if claimed:
        if claimed != owner:
            raise ConfigError(
                f"paths.run_dir={run_dir} belongs to run {claimed}, not {owner}: give this run its own folder "
                "(the default is logs/runs/<task>-<model>-seed<seed>)."
            )
    elif run_dir.is_dir():
        foreign = sorted(
            p.name for p in run_dir.iterdir() if p.name not in (*HYDRA_CONTENT, MARKER) and not (p.is_file() and p.suffix == ".log")
        )
        if foreign:
            shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
            raise ConfigError(
                f"paths.run_dir={run_dir} already holds files no rnnlab run made ({shown}); a run clears its checkpoints and "
                "figures there, so point paths.run_dir at a new or empty folder (the default is logs/runs/<task>-<model>-seed<seed>)."
            )
    if claimed == owner:  # its own: rewriting the marker could only lose it (emptied by a full disk)
        return
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / MARKER).write_text(owner + "\n")
    except OSError as err:  # a read-only or full folder, or a path through a file
        raise ConfigError(
            f"cannot write into paths.run_dir={run_dir} ({err.strerror or err}); point it at a writable folder with free space."
        ) from err


def clear_run_dir(cfg: DictConfig) -> None:
    """Remove what an earlier run of this (task, model, seed) left in its run folder: a fresh run must not pick up
    its checkpoints or figures. Call after claim_run_dir, which made sure the folder is this run's."""
    for stale in RUN_CONTENT:
        shutil.rmtree(Path(cfg.paths.run_dir, stale), ignore_errors=True)


def _default_area(key: str) -> str:
    return {"run_dir": "logs/runs/", "model_dir": "models/", "plots_dir": "plots/"}.get(key, "metrics/")
