"""Where a training writes, and what it may delete: only what it created.

A run replaces its model and plots folders as a whole and clears the checkpoints and figures of its
run folder before it starts afresh. Pointed at the wrong place (`paths.run_dir=reports`, `.`, a home
folder) that would delete files the run never made, so every `paths.*` a run writes is resolved
against the project root and checked here before anything is written.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from omegaconf import DictConfig, open_dict

from rnnlab.errors import ConfigError

# Written into a run folder by the run that created it: the (task, model, seed) that owns the folder.
MARKER = ".rnnlab-run"
# What a run writes into its run folder, and so may clear before starting afresh.
RUN_CONTENT = ("checkpoints", "figures")
# What Hydra writes into a job's folder, which a search's trial uses as its run folder: Hydra's, not foreign.
HYDRA_CONTENT = (".hydra",)
OUTPUT_DIRS = ("run_dir", "model_dir", "plots_dir")
OUTPUT_FILES = ("metrics_file", "history_file", "predictions_file")
# The project's own folders: its sources, configs and documentation (no run output belongs inside them), and the data
# and results that git or DVC track whole (a run's outputs belong below them, never in their place).
SOURCES = ("conf", "src", "tests", "docs", ".git", ".dvc", ".ci")
PROTECTED = (*SOURCES, "data", "reports", "resolved", "metrics", "models", "plots")


def resolve_paths(cfg: DictConfig) -> None:
    """Make every relative `paths.*` relative to the project root (`paths.root`), not to the working directory."""
    root = Path(cfg.paths.root)
    with open_dict(cfg.paths):
        for key in ("raw", "processed", *OUTPUT_DIRS, *OUTPUT_FILES):
            value = Path(cfg.paths[key]).expanduser()
            if not value.is_absolute():
                cfg.paths[key] = str(root / value)


def check_outputs(cfg: DictConfig) -> None:
    """Refuse an output path that would replace or clear a folder of the project, its root, or a folder above it."""
    root = Path(cfg.paths.root).resolve()
    for key in (*OUTPUT_DIRS, *OUTPUT_FILES):
        path = Path(cfg.paths[key]).resolve()
        folder = path if key in OUTPUT_DIRS else path.parent
        top_level = folder.parent == root and folder.name in PROTECTED
        inside_sources = any(folder.is_relative_to(root / name) for name in SOURCES)
        if folder == root or root.is_relative_to(folder) or top_level or (inside_sources and key in OUTPUT_DIRS):
            raise ConfigError(
                f"paths.{key}={cfg.paths[key]} would {'replace' if key in OUTPUT_DIRS else 'write into'} {folder}, a folder of "
                f"the project (or above it) that this run did not create; give the run a folder of its own, e.g. the default "
                f"paths.{key} under {_default_area(key)}."
            )


def claim_run_dir(cfg: DictConfig) -> None:
    """Take the run folder for this (task, model, seed), refusing one that holds anything else or belongs to another run."""
    run_dir = Path(cfg.paths.run_dir)
    owner = f"{cfg.task.name}/{cfg.model.name}/seed{cfg.seed}"
    marker = run_dir / MARKER
    if marker.is_file():
        claimed = marker.read_text().strip()
        if claimed != owner:
            raise ConfigError(
                f"paths.run_dir={run_dir} belongs to run {claimed}, not {owner}: give this run its own folder "
                "(the default is logs/runs/<task>-<model>-seed<seed>)."
            )
    elif run_dir.is_dir():
        foreign = sorted(
            p.name for p in run_dir.iterdir() if p.name not in (*RUN_CONTENT, *HYDRA_CONTENT) and not (p.is_file() and p.suffix == ".log")
        )
        if foreign:
            shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
            raise ConfigError(
                f"paths.run_dir={run_dir} already holds files no rnnlab run made ({shown}); a run clears its checkpoints and "
                "figures there, so point paths.run_dir at a new or empty folder (the default is logs/runs/<task>-<model>-seed<seed>)."
            )
    run_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(owner + "\n")


def clear_run_dir(cfg: DictConfig) -> None:
    """Remove what an earlier run of this (task, model, seed) left in its run folder: a fresh run must not pick up
    its checkpoints or figures. Call after claim_run_dir, which made sure the folder is this run's."""
    for stale in RUN_CONTENT:
        shutil.rmtree(Path(cfg.paths.run_dir, stale), ignore_errors=True)


def _default_area(key: str) -> str:
    return {"run_dir": "logs/runs/", "model_dir": "models/", "plots_dir": "plots/"}.get(key, "metrics/")
