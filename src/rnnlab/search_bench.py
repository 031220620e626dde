"""Trials per hour of a hyperparameter search, with one worker and with several sharing a study.

`python -m rnnlab.search_bench workers=[1,2] n_trials=8` runs `python -m rnnlab.train -m
hparams_search=<search_config>` as that many worker processes on one fresh journal storage per
worker count, in a temporary directory, and prints finished trials per hour of wall time.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import optuna
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState
from rich.progress import Progress

from rnnlab import io
from rnnlab.config import hydra_entry
from rnnlab.console import console, summary
from rnnlab.errors import ConfigError, RnnlabError
from rnnlab.trial import open_storage
from rnnlab.validation import is_int

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def worker_command(cfg: DictConfig, study: str, out: Path) -> list[str]:
    """One worker of the study `study`, with everything it writes under `out`."""
    return [
        sys.executable,
        "-m",
        "rnnlab.train",
        "-m",
        f"hparams_search={cfg.search_config}",
        *cfg.overrides,
        f"hydra.sweeper.n_trials={cfg.n_trials}",
        f"search.study={study}",
        f"search.storage={out}/study.log",
        f"search.report_dir={out}/report",
        f"search.experiment_file={out}/experiment.yaml",
        f"tracking.uri=sqlite:///{out}/mlflow.db",
        f"tracking.artifact_location={out}/artifacts",
        f"paths.run_dir={out}/trials/" + "${search.trial}",
        f"hydra.sweep.dir={out}/hydra",
    ]


def finished_trials(out: Path, study: str) -> list[optuna.trial.FrozenTrial]:
    try:
        return optuna.load_study(study_name=study, storage=open_storage(f"{out}/study.log")).get_trials(deepcopy=False, states=FINISHED)
    except KeyError:  # no worker has created the study yet
        return []


def measure(cfg: DictConfig, workers: int, threads: int, progress: Progress) -> dict[str, Any]:
    """Run one study with `workers` processes of `threads` torch threads each; its throughput."""
    study = f"bench-{workers}-workers"
    task = progress.add_task(f"{workers} worker{'s' * (workers != 1)}", total=cfg.n_trials)
    with tempfile.TemporaryDirectory(prefix="rnnlab-search-bench-") as tmp:
        out = Path(tmp)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        started = time.perf_counter()
        processes = []
        for number in range(workers):
            log = open(out / f"worker{number}.log", "w")  # noqa: SIM115 -- closed after the process ends
            processes.append((subprocess.Popen(worker_command(cfg, study, out), stdout=log, stderr=subprocess.STDOUT, env=env), log))
        try:
            while any(process.poll() is None for process, _ in processes):
                progress.update(task, completed=len(finished_trials(out, study)))
                time.sleep(1.0)
        finally:
            for process, log in processes:
                if process.poll() is None:
                    process.terminate()
                process.wait()
                log.close()
        seconds = time.perf_counter() - started
        failed = [(n, (out / f"worker{n}.log").read_text()[-2000:]) for n, (p, _) in enumerate(processes) if p.returncode != 0]
        if failed:
            number, tail = failed[0]
            raise RnnlabError(f"worker {number} of the {workers}-worker study exited non-zero; its output ends with:\n{tail}")
        trials = finished_trials(out, study)
    progress.update(task, completed=len(trials))
    states = {state.name.lower(): sum(t.state == state for t in trials) for state in FINISHED}
    return {
        "workers": workers,
        "threads_per_worker": threads,
        "trials": len(trials),
        **states,
        "seconds": round(seconds, 1),
        "trials_per_hour": round(len(trials) / seconds * 3600, 1),
    }


def run(cfg: DictConfig) -> dict[str, Any]:
    workers = list(cfg.workers)
    if not workers or not all(is_int(w) and w >= 1 for w in workers):
        raise ConfigError(f"workers must be a list of positive integers such as [1, 2], got {OmegaConf.to_container(cfg.workers)}.")
    if cfg.n_trials < 1:
        raise ConfigError(f"n_trials must be >= 1, got {cfg.n_trials}.")
    if not (Path(cfg.paths.root) / "conf" / "hparams_search" / f"{cfg.search_config}.yaml").is_file():
        raise ConfigError(
            f"search_config={cfg.search_config} is not a config of conf/hparams_search/; name one of its files, without .yaml."
        )
    cores = os.cpu_count() or 1
    with Progress(console=console) as progress:
        rows = [measure(cfg, w, cfg.threads_per_worker or max(1, cores // w), progress) for w in workers]
    report = {"search_config": cfg.search_config, "n_trials": cfg.n_trials, "overrides": list(cfg.overrides), "cores": cores, "rows": rows}
    io.write_json(cfg.output, report)
    base = rows[0]["trials_per_hour"]
    summary(
        f"search throughput: {cfg.search_config}, {cfg.n_trials} trials per study, {cores} cores",
        {
            **{
                f"{r['workers']} worker(s) x {r['threads_per_worker']} thread(s)": f"{r['trials_per_hour']:.1f} trials/h "
                f"({r['trials']} trials in {r['seconds']:.0f} s; {r['pruned']} pruned; x{r['trials_per_hour'] / base:.2f})"
                for r in rows
            },
            "report": cfg.output,
        },
    )
    return report


@hydra_entry(config_name="search_bench")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
