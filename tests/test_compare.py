"""The comparison stage on a synthetic MLflow store: statistics, verdicts, ignored runs, figures, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig
from scipy import stats

from rnnlab.compare import compare, learning_curve
from rnnlab.config import config_dir
from rnnlab.errors import ConfigError, DataError

TASKS = {"sentiment": ("test_acc", "max"), "forecast": ("test_mase", "min"), "textgen": ("test_loss", "min")}
# Primary metric per (task, model), one value per seed 1, 2, ...
GRU_SENTIMENT = [0.901, 0.899, 0.902, 0.898, 0.900]
VALUES = {
    ("sentiment", "gru"): GRU_SENTIMENT,
    # Seed noise in both directions around the GRU: no real difference.
    ("sentiment", "lstm"): [g + d for g, d in zip(GRU_SENTIMENT, [0.010, -0.012, 0.007, -0.006, 0.002], strict=True)],
    ("sentiment", "rnn"): [0.801, 0.800, 0.803, 0.799, 0.802],  # clearly worse, low noise
    ("forecast", "gru"): [1.10, 1.12, 1.11],
    ("forecast", "lstm"): [0.90, 0.91, 0.905],  # lower error: better
    ("textgen", "gru"): [1.60],  # one seed each
    ("textgen", "lstm"): [1.70],
}
VAL_LOSS = [0.9, 0.7, 0.6]


def add_run(
    client: MlflowClient, task: str, model: str, seed: int, value: float, start: int, status: str = "FINISHED", **extra: Any
) -> str:
    """A run as `python -m rnnlab.train` leaves it: tags, the task's config parameters, test and per-epoch metrics."""
    experiment = client.get_experiment_by_name(f"rnnlab-{task}")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(f"rnnlab-{task}")
    tags = {"task": task, "model": model, "seed": str(seed), "profile": "default", **extra.pop("tags", {})}
    run_id = client.create_run(experiment_id, start_time=start, tags=tags, run_name=f"{task}-{model}-seed{seed}").info.run_id
    metric, mode = TASKS[task]
    logged = {metric: value, "n_params": 1000.0 * len(model), "seconds_per_epoch": 2.0, **extra}
    metrics = [Metric(key, v, start, 0) for key, v in logged.items()]
    metrics += [Metric("val_loss", loss + value / 10, start + epoch, 10 * (epoch + 1)) for epoch, loss in enumerate(VAL_LOSS)]
    client.log_batch(run_id, metrics=metrics, params=[Param("task/primary_metric", metric), Param("task/monitor_mode", mode)])
    client.set_terminated(run_id, status)
    return run_id


def compose_compare(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="compare", overrides=list(overrides))


def store_overrides(store: Path, out: Path | None = None) -> list[str]:
    """Read runs from, and log the comparison to, the store in `store`; write the reports under `out` (default `store`)."""
    out = out or store
    return [f"tracking.uri=sqlite:///{store}/mlflow.db", f"tracking.artifact_location={store}/artifacts", f"output_dir={out}/reports"]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("compare")
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    start = 1_700_000_000_000
    # Runs that must not count: each would pull the GRU's sentiment mean far down.
    add_run(client, "sentiment", "gru", 3, 0.2, start)  # older than the seed's newest run
    add_run(client, "sentiment", "gru", 1, 0.1, start, tags={"optuna.trial": "0", "optuna.study": "s"})
    add_run(client, "sentiment", "gru", 2, 0.1, start, status="FAILED")
    add_run(client, "sentiment", "gru", 6, 0.1, start, tags={"profile": "smoke"})
    for (task, model), values in VALUES.items():
        for seed, value in enumerate(values, start=1):
            extra = {"latency_ms_per_sequence": 0.5} if (task, model) == ("forecast", "gru") else {}
            add_run(client, task, model, seed, value, start + 1000, **extra)
    return root


@pytest.fixture(scope="module")
def report(store: Path) -> dict[str, Any]:
    return compare(compose_compare(*store_overrides(store)))


def test_model_statistics_match_numpy_and_scipy(report: dict[str, Any]) -> None:
    for (task, model), values in VALUES.items():
        result = report["tasks"][task]["models"][model]
        assert result["seeds"] == list(range(1, len(values) + 1))
        assert result["mean"] == pytest.approx(np.mean(values))
        if len(values) > 1:
            half = stats.t.ppf(0.975, len(values) - 1) * np.std(values, ddof=1) / np.sqrt(len(values))
            assert result["std"] == pytest.approx(np.std(values, ddof=1))
            assert result["ci"] == pytest.approx([np.mean(values) - half, np.mean(values) + half])
        assert result["n_params"] == 1000 * len(model) and result["seconds_per_epoch"] == 2.0
    assert report["tasks"]["forecast"]["models"]["gru"]["latency_ms_per_sequence"] == 0.5
    assert report["tasks"]["sentiment"]["models"]["gru"]["peak_memory_mb"] is None


def test_paired_tests_and_verdicts(report: dict[str, Any], store: Path) -> None:
    sentiment = {(p["first"], p["second"]): p for p in report["tasks"]["sentiment"]["pairs"]}
    for other in ("lstm", "rnn"):
        expected = stats.ttest_rel(VALUES["sentiment", "gru"], VALUES["sentiment", other])
        assert sentiment["gru", other]["p_value"] == pytest.approx(expected.pvalue)
        assert sentiment["gru", other]["ci"] == pytest.approx(list(expected.confidence_interval(0.95)))
    assert sentiment["gru", "lstm"]["winner"] is None and sentiment["gru", "rnn"]["winner"] == "gru"
    forecast = report["tasks"]["forecast"]["pairs"]
    assert [(p["first"], p["second"], p["winner"]) for p in forecast] == [("gru", "lstm", "lstm")]  # lower MASE wins; no rnn runs

    md = (store / "reports" / "comparison.md").read_text()
    assert "| gru vs lstm | 5 |" in md and "no significant difference |" in md
    assert "**gru** better |" in md and "**lstm** better |" in md
    assert "(higher is better)" in md and "(lower is better)" in md
    assert "| — | — |" in md  # latency and peak memory the runs did not log
    assert json.loads((store / "reports" / "comparison.json").read_text()) == report


def test_single_seed_has_no_interval_and_no_test(report: dict[str, Any], store: Path) -> None:
    textgen = report["tasks"]["textgen"]
    assert textgen["models"]["gru"]["ci"] is None and textgen["models"]["gru"]["std"] is None
    [pair] = textgen["pairs"]
    assert pair["p_value"] is None and pair["winner"] is None and pair["verdict"] == "not enough seeds"
    assert pair["mean_difference"] == pytest.approx(1.60 - 1.70)
    assert "undefined (one seed)" in (store / "reports" / "comparison.md").read_text()


def test_figures_and_mlflow_run(report: dict[str, Any], store: Path) -> None:
    figures = sorted((store / "reports" / "figures").iterdir())
    assert len(figures) == 3 * len(TASKS)
    assert all(path.read_bytes().startswith(b"\x89PNG") for path in figures)
    client = MlflowClient(f"sqlite:///{store}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("rnnlab-compare").experiment_id])
    assert run.info.run_name == "compare-default" and run.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"comparison.md", "comparison.json", "figures"}
    assert len(client.list_artifacts(run.info.run_id, "figures")) == len(figures)


def test_learning_curve_is_the_mean_per_epoch(tmp_path: Path) -> None:
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    long = add_run(client, "sentiment", "gru", 1, 0.0, 1000)
    short = client.create_run(client.get_experiment_by_name("rnnlab-sentiment").experiment_id).info.run_id
    # Stopped after two epochs; its first epoch logged twice (a resumed run): the later value counts.
    for step, value, timestamp in ((10, 5.0, 1), (10, 0.5, 2), (20, 0.3, 3)):
        client.log_metric(short, "val_loss", value, timestamp=timestamp, step=step)
    curve = learning_curve(client, [long, short])
    assert curve.index.tolist() == [1, 2, 3]
    assert curve.tolist() == pytest.approx([(0.9 + 0.5) / 2, (0.7 + 0.3) / 2, 0.6])


def test_filters_and_unknown_task(store: Path) -> None:
    narrowed = compare(compose_compare(*store_overrides(store, store / "narrowed"), "tasks=[sentiment]", "tracking.experiment=narrowed"))
    assert list(narrowed["tasks"]) == ["sentiment"]
    with pytest.raises(DataError, match=r"profile 'smoke'.*rnnlab-sentiment.*dvc repro"):
        compare(compose_compare(*store_overrides(store, store / "smoke"), "profile=smoke", "models=[lstm]"))
    with pytest.raises(ConfigError, match=r"unknown task 'nosuch'; known: .*sentiment"):
        compare(compose_compare(*store_overrides(store), "tasks=[nosuch]"))
    assert not (store / "smoke").exists()


def test_empty_store_is_a_clear_error_and_writes_nothing(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "rnnlab.compare", *store_overrides(tmp_path), f"hydra.run.dir={tmp_path}/hydra"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    # The last line: a new store's MLflow log lines come first.
    assert result.stderr.splitlines()[-1].startswith("rnnlab: error: no FINISHED training runs of profile 'default'")
    assert "rnnlab-sentiment" in result.stderr and "dvc repro" in result.stderr and "python -m rnnlab.train" in result.stderr
    assert not (tmp_path / "reports").exists()
