"""The comparison stage: statistics, verdicts, seeds, champions, figures, curves and errors on a synthetic MLflow
store, and the champion alias and fetched figures on real tiny training runs."""

from __future__ import annotations

import io
import json
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import yaml
from helpers import isolated_outputs, run_main
from hydra import compose, initialize_config_dir
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig
from scipy import stats
from statsmodels.regression.linear_model import OLS
from statsmodels.stats.multitest import multipletests

from rnnlab.compare import (
    _test_set,
    baselines_to_test,
    compare,
    forecast_accuracy,
    learning_curve,
    requested_models,
    requested_seeds,
    train_command,
    with_owa,
)
from rnnlab.compare import main as compare_main
from rnnlab.config import config_dir
from rnnlab.errors import ConfigError, DataError
from rnnlab.training import train

# task -> (primary metric, monitor, monitor mode), as conf/task/*.yaml set them.
TASKS = {
    "sentiment": ("test_acc", "val_acc", "max"),
    "forecast": ("test_mase", "val_mase", "min"),
    "textgen": ("test_loss", "val_loss", "min"),
}
# Primary metric per (task, model), one value per seed 1, 2, ...
GRU_SENTIMENT = [0.901, 0.899, 0.902, 0.898, 0.900]
VALUES = {
    ("sentiment", "gru"): GRU_SENTIMENT,
    # Seed noise in both directions around the GRU: no real difference.
    ("sentiment", "lstm"): [g + d for g, d in zip(GRU_SENTIMENT, [0.010, -0.012, 0.007, -0.006, 0.002], strict=True)],
    ("sentiment", "rnn"): [0.801, 0.800, 0.803, 0.799, 0.802],  # clearly worse, low noise
    ("sentiment", "gru_tuned"): [0.91],  # a configured variant with one seed: reported, in no pair of networks
    ("forecast", "gru"): [1.10, 1.12, 1.11],
    ("forecast", "lstm"): [0.90, 0.91, 0.905],  # lower error: better
    ("textgen", "gru"): [1.60],  # one seed each
    ("textgen", "lstm"): [1.70],
}
VAL_LOSS = [0.9, 0.7, 0.6]
# The validation history of the monitor where it is not the default (best = the test value, at epoch 1): the GRU's
# seed 4 has the worst sentiment test accuracy but by far the best validation accuracy, so it is the champion.
VAL = {("sentiment", "gru", 4): [0.5, 0.99, 0.6]}
# textgen's monitor is val_loss: the LSTM's is best at epoch 1, not at its last epoch.
TEXTGEN_VAL_LOSS = {"lstm": [0.9, 0.5, 0.7]}
NO_ALIAS = "champion_alias=null"  # the synthetic runs have no network to register
FEW_RESAMPLES = "resamples=200"  # for tests of which runs are compared, not of the intervals: a tenth of the bootstrap's time
# The smallest effects of interest the synthetic runs declare (task/equivalence_margin).
MARGINS = {"sentiment": 0.02, "forecast": 0.03, "textgen": 0.02}
# What the synthetic runs say their test set is (task/test_set); the other tasks' runs say nothing, as older runs.
TEST_SETS = {"sentiment": "reviews held out at random (test_fraction 0.1, split_seed 1234)"}
N_REVIEWS, N_ORIGINS, HORIZON, CHUNKS = 1000, 40, 3, 30
# Forecast errors per origin: a fixed pattern of mean 1, so that a run's MASE is its value exactly.
ERROR_PATTERN = np.tile([0.7, 1.3, 0.9, 1.1], N_ORIGINS // 4)
BASELINE_SENTIMENT = 0.95
PERSISTENCE_MASE = 1.0  # a forecast baseline stage's: between the GRU (1.1) and the LSTM (0.9)
NAIVE2_MASE = 1.2  # a weaker one: scored, not tested (compare's baseline_tests: strongest)
LEVEL = 10.0  # every forecast target


def synthetic_predictions(task: str, value: float, errors: np.ndarray = ERROR_PATTERN) -> pd.DataFrame:
    """Per-example test outputs whose primary metric is `value` exactly, with a structure shared by every model: the same
    reviews are hard for all (a model gets right the round(value * N) easiest), the same origins are hard to forecast
    (`errors`: each origin's error, of mean 1)."""
    if task == "sentiment":
        units = np.arange(N_REVIEWS)
        right = np.random.default_rng(0).permutation(N_REVIEWS) < round(value * N_REVIEWS)
        target = units % 2
        prediction = np.where(right, target, 1 - target)
        return pd.DataFrame({"unit": units, "group": units, "target": target, "prediction": prediction, "score": prediction, "loss": 0.5})
    if task == "forecast":
        origin = np.repeat(np.arange(N_ORIGINS), HORIZON)
        error = np.repeat(errors, HORIZON)
        return pd.DataFrame(
            {
                "unit": [f"2020-01-{o + 1:02d} 00:00" for o in origin],
                "group": origin // HORIZON,
                "horizon": np.tile(np.arange(1, HORIZON + 1), N_ORIGINS),
                "target": LEVEL,
                "prediction": LEVEL + value * error,  # MASE scale 1: the run's test_mae is its test_mase
            }
        )
    units = np.arange(CHUNKS) * 100
    return pd.DataFrame({"unit": units, "group": units // 1000, "loss": value, "characters": 100})


def png(rows: int) -> bytes:
    """A small PNG, its size (and so its bytes) set by `rows`."""
    buffer = io.BytesIO()
    plt.imsave(buffer, np.zeros((rows, 3)), format="png")
    return buffer.getvalue()


def sample(task: str, model: str, seed: int, epoch: int) -> str:
    # A backtick fence inside the LSTM's sample: the report's fence must be longer.
    return f"{model} seed {seed} epoch {epoch}: To be, or not" + ("\n```\nthat is $x$" if model == "lstm" else "")


def add_run(
    client: MlflowClient,
    task: str,
    model: str,
    seed: int,
    value: float,
    start: int,
    status: str = "FINISHED",
    val: list[float] | None = None,
    **extra: Any,
) -> str:
    """A run as `python -m rnnlab.train` leaves it: tags, the task's config parameters, test and per-epoch metrics
    (`epoch` too, as Lightning logs it), and its figures or text samples."""
    experiment = client.get_experiment_by_name(f"rnnlab-{task}")
    root = Path(client.tracking_uri.removeprefix("sqlite:///")).parent
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(f"rnnlab-{task}", f"{root}/artifacts/{task}")
    tags = {"task": task, "model": model, "seed": str(seed), "profile": "default", **extra.pop("tags", {})}
    run_id = client.create_run(experiment_id, start_time=start, tags=tags, run_name=f"{task}-{model}-seed{seed}").info.run_id
    metric, monitor, mode = TASKS[task]
    logged = {metric: value, "n_params": 1000.0 * len(model), "seconds_per_epoch": 2.0, **extra}
    metrics = [Metric(key, v, start, 0) for key, v in logged.items()]
    step = [10 * (epoch + 1) for epoch in range(len(VAL_LOSS))]
    val_loss = TEXTGEN_VAL_LOSS.get(model, VAL_LOSS) if task == "textgen" else VAL_LOSS
    metrics += [Metric("val_loss", loss + value / 10, start + e, step[e]) for e, loss in enumerate(val_loss)]
    metrics += [Metric("epoch", e, start + e, step[e]) for e in range(len(VAL_LOSS))]
    if monitor != "val_loss":
        sign = 1 if mode == "max" else -1
        history = val if val is not None else VAL.get((task, model, seed), [value - sign * 0.02, value, value - sign * 0.01])
        metrics += [Metric(monitor, v, start + e, step[e]) for e, v in enumerate(history)]
    params = [Param("task/primary_metric", metric), Param("task/monitor", monitor), Param("task/monitor_mode", mode)]
    params.append(Param("task/equivalence_margin", str(MARGINS[task])))
    if task in TEST_SETS:
        params.append(Param("task/test_set", TEST_SETS[task]))
    client.log_batch(run_id, metrics=metrics, params=params)
    client.log_text(run_id, synthetic_predictions(task, value).to_csv(index=False), "test_predictions.csv")
    if task in ("sentiment", "forecast"):
        with tempfile.TemporaryDirectory() as tmp:
            figure = Path(tmp) / ("confusion_matrix.png" if task == "sentiment" else "forecast.png")
            figure.write_bytes(png(seed))
            client.log_artifact(run_id, str(figure), "figures")
    if task == "textgen":
        for epoch in range(len(VAL_LOSS)):
            client.log_text(run_id, sample(task, model, seed, epoch), f"samples/epoch{epoch:02d}.txt")
    client.set_terminated(run_id, status)
    return run_id


def write_baselines(task_metrics: Path, baselines: dict[str, pd.DataFrame]) -> None:
    """A baseline stage's outputs as rnnlab.baselines writes them: each baseline's test outputs, and the list of them."""
    out = task_metrics / "baselines"
    out.mkdir(parents=True)
    for name, predictions in baselines.items():
        predictions.to_csv(out / f"{name}_predictions.csv", index=False)
    (out / "baselines.json").write_text(json.dumps({"task": task_metrics.name, "baselines": list(baselines)}))


def compose_compare(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="compare", overrides=list(overrides))


def store_overrides(store: Path, out: Path | None = None, resolved: bool = True) -> list[str]:
    """Read runs from, and log the comparison to, the store in `store`; write the reports under `out` (default `store`).
    `resolved`: read whether gru_tuned equals its default from the store's resolved_compare.yaml if it has one (the
    `store` fixture's), as the DVC stage reads resolve's findings, instead of composing the configs each time."""
    out, findings_file = out or store, store / "resolved_compare.yaml"
    tracking = [f"tracking.uri=sqlite:///{store}/mlflow.db", f"tracking.artifact_location={store}/artifacts"]
    findings = [f"tuned_as_default_from={findings_file}"] if resolved and findings_file.exists() else []
    return [*tracking, f"output_dir={out}/reports", f"metrics_dir={store}/metrics", *findings]


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
    # The baseline stages' test outputs (rnnlab.baselines), beside the metrics files: TF-IDF better than every network;
    # persistence's errors fall on other origins than the networks' (reversed), naive2's below the target.
    write_baselines(root / "metrics" / "sentiment", {"tfidf_logreg": synthetic_predictions("sentiment", BASELINE_SENTIMENT)})
    naive2 = synthetic_predictions("forecast", NAIVE2_MASE)
    naive2["prediction"] = 2 * LEVEL - naive2["prediction"]
    persistence = synthetic_predictions("forecast", PERSISTENCE_MASE, ERROR_PATTERN[::-1])
    write_baselines(root / "metrics" / "forecast", {"persistence": persistence, "naive2": naive2})
    # What resolve would have found (store_overrides): the store's sentiment gru_tuned is model=gru's default configuration.
    (root / "resolved_compare.yaml").write_text("tuned_as_default:\n  sentiment/gru_tuned: gru\n")
    return root


@pytest.fixture(scope="module")
def report(store: Path) -> dict[str, Any]:
    return compare(compose_compare(*store_overrides(store), NO_ALIAS))


def run_id_of(store: Path, task: str, model: str, seed: int) -> str:
    """The counted run of (task, model, seed): the newest FINISHED run of the default profile outside a search."""
    client = MlflowClient(f"sqlite:///{store}/mlflow.db")
    experiment = client.get_experiment_by_name(f"rnnlab-{task}")
    query = f"tags.model = '{model}' AND tags.seed = '{seed}' AND tags.profile = 'default' AND attributes.status = 'FINISHED'"
    runs = [
        r for r in client.search_runs([experiment.experiment_id], query, order_by=["start_time DESC"]) if "optuna.trial" not in r.data.tags
    ]
    return runs[0].info.run_id


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
    # Every model with runs, conf/model/ or not; of the networks, only the configured pairs are tested with each other.
    assert list(report["tasks"]["sentiment"]["models"]) == ["gru", "gru_tuned", "lstm", "rnn"]
    assert report["tasks"]["sentiment"]["models"]["gru_tuned"]["ci"] is None
    # The configured pairs, then every model against the baseline: gru_tuned too, though it is in no pair with runs (its
    # one seed gives the effect without a test).
    pairs = {(p["first"], p["second"]): p for p in report["tasks"]["sentiment"]["pairs"]}
    assert list(pairs) == [
        ("gru", "lstm"),
        ("gru", "rnn"),
        ("gru", "tfidf_logreg"),
        ("gru_tuned", "tfidf_logreg"),
        ("lstm", "tfidf_logreg"),
        ("rnn", "tfidf_logreg"),
    ]
    lone = pairs["gru_tuned", "tfidf_logreg"]
    assert lone["verdict"] == "not enough seeds" and lone["p_value"] is None
    assert lone["effect"] == pytest.approx(report["tasks"]["sentiment"]["models"]["gru_tuned"]["mean"] - BASELINE_SENTIMENT)
    assert report["tasks"]["sentiment"]["baselines"] == {"tfidf_logreg": pytest.approx(BASELINE_SENTIMENT)}


def test_paired_tests_and_verdicts(report: dict[str, Any], store: Path) -> None:
    sentiment = {(p["first"], p["second"]): p for p in report["tasks"]["sentiment"]["pairs"]}
    for other in ("lstm", "rnn"):
        pair = sentiment["gru", other]
        assert pair["effect"] == pytest.approx(np.mean(GRU_SENTIMENT) - np.mean(VALUES["sentiment", other]))
        assert pair["ci"][0] <= pair["effect"] <= pair["ci"][1] and pair["test"] == "paired t (clustered)"
        assert pair["shared_seeds"] == [1, 2, 3, 4, 5] and pair["margin"] == MARGINS["sentiment"]
    # The LSTM's seeds scatter around the GRU's: equivalent within the task's 0.02, not a winner.
    assert sentiment["gru", "lstm"]["verdict"] == "equivalent within ±0.02" and sentiment["gru", "lstm"]["p_holm"] > 0.05
    assert -0.02 < sentiment["gru", "lstm"]["equivalence_interval"][0] < sentiment["gru", "lstm"]["equivalence_interval"][1] < 0.02
    assert sentiment["gru", "rnn"]["verdict"] == "gru better" and sentiment["gru", "rnn"]["p_holm"] < 1e-6
    # The paired t-test of each review's correctness averaged over the seeds (a review is its own group, so the
    # clustered variance is the classical one).
    right = {
        model: np.mean([synthetic_predictions("sentiment", v).eval("prediction == target") for v in VALUES["sentiment", model]], axis=0)
        for model in ("gru", "rnn")
    }
    assert sentiment["gru", "rnn"]["p_value"] == pytest.approx(stats.ttest_1samp(right["gru"] - right["rnn"], 0).pvalue)

    forecast = {(p["first"], p["second"]): p for p in report["tasks"]["forecast"]["pairs"]}
    # The configured pair with runs (no rnn runs), then each network against the strongest baseline of the baseline stage.
    assert list(forecast) == [("gru", "lstm"), ("gru", "persistence"), ("lstm", "persistence")]
    assert report["tasks"]["forecast"]["baselines"] == {
        "persistence": pytest.approx(PERSISTENCE_MASE),
        "naive2": pytest.approx(NAIVE2_MASE),
    }
    # M4's measures of every model (means over seeds) and baseline; OWA relative to naive2.
    accuracy = report["tasks"]["forecast"]["forecast_accuracy"]
    errors = NAIVE2_MASE * np.repeat(ERROR_PATTERN, HORIZON)
    naive2_smape = np.mean(200 * errors / (LEVEL + LEVEL - errors))
    assert accuracy["naive2"] == pytest.approx({"smape": naive2_smape, "mase": NAIVE2_MASE, "owa": 1.0, "mae_1": NAIVE2_MASE})
    gru = [
        np.mean(200 * v * np.repeat(ERROR_PATTERN, HORIZON) / (2 * LEVEL + v * np.repeat(ERROR_PATTERN, HORIZON)))
        for v in VALUES["forecast", "gru"]
    ]
    gru_mase = np.mean(VALUES["forecast", "gru"])
    assert accuracy["gru"]["smape"] == pytest.approx(np.mean(gru)) and accuracy["gru"]["mase"] == pytest.approx(gru_mase)
    assert accuracy["gru"]["owa"] == pytest.approx((np.mean(gru) / naive2_smape + gru_mase / NAIVE2_MASE) / 2)
    assert forecast["gru", "lstm"]["verdict"] == "lstm better"  # lower MASE wins
    assert forecast["gru", "lstm"]["effect"] == pytest.approx(np.mean(VALUES["forecast", "gru"]) - np.mean(VALUES["forecast", "lstm"]))
    # Diebold-Mariano on the per-origin differences: uniform kernel at lag horizon - 1, Harvey-Leybourne-Newbold's factor.
    differences = np.mean(VALUES["forecast", "gru"]) * ERROR_PATTERN - PERSISTENCE_MASE * ERROR_PATTERN[::-1]
    hac = {"maxlags": HORIZON - 1, "kernel": "uniform"}
    t = OLS(differences, np.ones(N_ORIGINS)).fit(cov_type="HAC", cov_kwds=hac).tvalues[0]
    t *= np.sqrt((N_ORIGINS + 1 - 2 * HORIZON + HORIZON * (HORIZON - 1) / N_ORIGINS) / N_ORIGINS)
    assert forecast["gru", "persistence"]["p_value"] == pytest.approx(2 * stats.t.sf(abs(t), N_ORIGINS - 1))
    assert forecast["gru", "persistence"]["test"] == "Diebold-Mariano (HLN)"

    assert sentiment["rnn", "tfidf_logreg"]["verdict"] == "tfidf_logreg better"
    assert sentiment["rnn", "tfidf_logreg"]["test"] == "paired t (clustered)"  # a classifier baseline: 0/1 scores too
    # Holm over every test of the report: 5 sentiment, 3 forecast (textgen has one seed).
    tested = [p for result in report["tasks"].values() for p in result["pairs"] if p["p_value"] is not None]
    assert report["tests"] == len(tested) == 8
    assert [p["p_holm"] for p in tested] == pytest.approx(list(multipletests([p["p_value"] for p in tested], method="holm")[1]))

    md = (store / "reports" / "comparison.md").read_text()
    assert "| gru vs lstm | 5 |" in md and "| equivalent within ±0.02 |" in md
    assert "| **gru** better |" in md and "| **lstm** better |" in md
    assert "(higher is better)" in md and "(lower is better)" in md and "Holm's correction over all 8 tests" in md
    assert "| tfidf_logreg (baseline) | 0.9500 |" in md and "| persistence (baseline) | 1.0000 |" in md
    assert f"| naive2 (baseline) | {naive2_smape:.3f} | 1.2000 | 1.0000 | 1.2 |" in md  # the M4 table
    assert "against its task's strongest baseline" in md
    assert "| — | — |" in md  # latency and peak memory the runs did not log
    assert json.loads((store / "reports" / "comparison.json").read_text()) == report


def test_the_same_runs_give_the_same_report_byte_for_byte(store: Path, tmp_path: Path) -> None:
    for name in ("first", "second"):
        compare(compose_compare(*store_overrides(store, tmp_path / name), NO_ALIAS, "tracking.experiment=rerun"))
    for report in ("comparison.md", "comparison.json", "comparison_metrics.json"):
        assert (tmp_path / "first" / "reports" / report).read_bytes() == (tmp_path / "second" / "reports" / report).read_bytes()


@pytest.mark.parametrize(
    ("change", "what"),
    [
        (lambda frame: frame.head(500), "other test examples"),  # a smaller test set
        (lambda frame: frame.assign(target=1 - frame["target"]), "the same test examples with other targets"),  # other labels
    ],
)
def test_a_baseline_of_other_test_examples_is_a_clear_error(store: Path, tmp_path: Path, change: Any, what: str) -> None:
    write_baselines(tmp_path / "metrics" / "sentiment", {"tfidf_logreg": change(synthetic_predictions("sentiment", 0.9))})
    overrides = [*store_overrides(store, tmp_path), NO_ALIAS, f"metrics_dir={tmp_path}/metrics", "tasks=[sentiment]"]
    with pytest.raises(DataError, match=rf"tfidf_logreg_predictions\.csv scores {what} than the runs of sentiment"):
        compare(compose_compare(*overrides))
    assert not (tmp_path / "reports").exists()


def test_a_listed_baseline_without_its_test_outputs_is_a_clear_error(store: Path, tmp_path: Path) -> None:
    write_baselines(tmp_path / "metrics" / "sentiment", {"tfidf_logreg": synthetic_predictions("sentiment", 0.9)})
    (tmp_path / "metrics" / "sentiment" / "baselines" / "tfidf_logreg_predictions.csv").unlink()
    overrides = [*store_overrides(store, tmp_path), NO_ALIAS, f"metrics_dir={tmp_path}/metrics", "tasks=[sentiment]"]
    with pytest.raises(DataError, match=r"tfidf_logreg_predictions\.csv is missing though .*baselines\.json lists it: rerun"):
        compare(compose_compare(*overrides))
    assert not (tmp_path / "reports").exists()


def test_single_seed_has_no_interval_and_no_test(report: dict[str, Any], store: Path) -> None:
    textgen = report["tasks"]["textgen"]
    assert textgen["models"]["gru"]["ci"] is None and textgen["models"]["gru"]["std"] is None
    [pair] = textgen["pairs"]
    assert pair["p_value"] is None and pair["verdict"] == "not enough seeds"
    assert pair["effect"] == pytest.approx(1.60 - 1.70)  # the point estimate alone, from the test outputs
    assert "undefined (one seed)" in (store / "reports" / "comparison.md").read_text()


def test_champion_is_chosen_by_validation_not_test(report: dict[str, Any], store: Path) -> None:
    gru = report["tasks"]["sentiment"]["models"]["gru"]["champion"]
    # Seed 3 has the best test accuracy (0.902), seed 4 the worst (0.898) but the best val_acc: the champion.
    assert (gru["seed"], gru["monitor"], gru["best_value"], gru["epoch"], gru["test_value"]) == (4, "val_acc", 0.99, 1, 0.898)
    assert gru["run_id"] == run_id_of(store, "sentiment", "gru", 4)
    assert report["tasks"]["sentiment"]["models"]["rnn"]["champion"]["seed"] == 3  # the default history: best val = best test
    # Lower is better for forecast's val_mase and textgen's val_loss.
    assert report["tasks"]["forecast"]["models"]["lstm"]["champion"]["seed"] == 1
    textgen = report["tasks"]["textgen"]["models"]
    assert (textgen["gru"]["champion"]["epoch"], textgen["lstm"]["champion"]["epoch"]) == (2, 1)
    assert report["champion_alias"] is None and "registered_model" not in gru
    md = (store / "reports" / "comparison.md").read_text()
    assert f"| gru | sentiment-gru-seed4 (`{gru['run_id']}`) | 4 | 0.9900 (1) | 0.8980 | not registered (champion_alias: null) |" in md


def test_figures_and_mlflow_run(report: dict[str, Any], store: Path) -> None:
    figures = store / "reports" / "figures"
    fetched = {f"sentiment_{m}_confusion_matrix.png" for m in ("gru", "gru_tuned", "lstm", "rnn")}
    fetched |= {f"forecast_{m}_forecast.png" for m in ("gru", "lstm")}
    drawn = {f"{task}_{name}.png" for task in TASKS for name in ("learning_curves", "metric_ci", "metric_vs_params")}
    assert {path.name for path in figures.iterdir()} == drawn | fetched | {"textgen_samples.png"}
    assert all(path.read_bytes().startswith(b"\x89PNG") for path in figures.iterdir())
    # The champion's own figure: the GRU's is seed 4's, not another seed's.
    assert (figures / "sentiment_gru_confusion_matrix.png").read_bytes() == png(4)
    md = (store / "reports" / "comparison.md").read_text()
    assert all(f"](figures/{path.name})" in md for path in figures.iterdir())
    assert report["tasks"]["sentiment"]["figures"][:4] == [
        "sentiment_learning_curves.png",
        "sentiment_metric_ci.png",
        "sentiment_metric_vs_params.png",
        "sentiment_gru_confusion_matrix.png",
    ]

    client = MlflowClient(f"sqlite:///{store}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("rnnlab-compare").experiment_id])
    assert run.info.run_name == "compare-default" and run.info.status == "FINISHED" and run.data.tags["seeds"] == "all"
    logged = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert logged == {"comparison.md", "comparison.json", "comparison_metrics.json", "figures", "curves"}
    assert len(client.list_artifacts(run.info.run_id, "figures")) == len(list(figures.iterdir()))
    assert [a.path for a in client.list_artifacts(run.info.run_id, "curves")] == [f"curves/{task}.csv" for task in sorted(TASKS)]


def test_curves_csv_is_the_mean_val_loss_per_model(report: dict[str, Any], store: Path) -> None:
    sentiment = pd.read_csv(store / "reports" / "curves" / "sentiment.csv")
    assert list(sentiment.columns) == ["epoch", "gru", "gru_tuned", "lstm", "rnn"]
    assert sentiment["epoch"].tolist() == [0, 1, 2]
    for model in ("gru", "rnn"):
        expected = [loss + np.mean(VALUES["sentiment", model]) / 10 for loss in VAL_LOSS]
        assert sentiment[model].tolist() == pytest.approx(expected)
    textgen = pd.read_csv(store / "reports" / "curves" / "textgen.csv")
    assert textgen["lstm"].tolist() == pytest.approx([loss + 0.17 for loss in TEXTGEN_VAL_LOSS["lstm"]])


def test_textgen_samples_in_the_markdown(report: dict[str, Any], store: Path) -> None:
    md = (store / "reports" / "comparison.md").read_text()
    # Each champion's sample from the epoch it was tested at: the GRU's last epoch, the LSTM's epoch 1.
    assert "gru champion's sample (seed 1, epoch 2):\n\n```text\ngru seed 1 epoch 2: To be, or not\n```\n" in md
    assert f"lstm champion's sample (seed 1, epoch 1):\n\n````text\n{sample('textgen', 'lstm', 1, 1)}\n````\n" in md
    assert report["tasks"]["textgen"]["models"]["lstm"]["champion"]["sample"]["artifact"] == "samples/epoch01.txt"
    assert report["tasks"]["sentiment"]["models"]["gru"]["champion"]["sample"] is None
    assert "![textgen samples](figures/textgen_samples.png)" in md


def test_each_task_section_says_what_its_test_set_is_when_its_runs_record_it(report: dict[str, Any], store: Path) -> None:
    assert report["tasks"]["sentiment"]["test_set"] == TEST_SETS["sentiment"]
    assert report["tasks"]["forecast"]["test_set"] == ""  # runs of an older rnnlab record none
    md = (store / "reports" / "comparison.md").read_text()
    assert f"## sentiment: test_acc (higher is better)\n\nTest set: {TEST_SETS['sentiment']}.\n\n| model |" in md
    assert "## forecast: test_mase (lower is better)\n\n| model |" in md and md.count("Test set:") == 1


def test_runs_of_one_task_tested_on_different_test_sets_are_not_compared() -> None:
    runs = pd.DataFrame({"test_set": ["clips of voices ...", "", "clips of speakers ..."]})
    with pytest.raises(DataError, match=r"runs of speech were tested on different test sets \(clips of speakers \.\.\.; clips of voices"):
        _test_set("speech", runs)
    assert _test_set("speech", runs.iloc[:2]) == "clips of voices ..."  # runs of an older rnnlab say nothing


SPEECH_VOICES = "clips of voices that no training clip has, and silence clips (test_fraction 0.1, task.fetch.espeak.split_by=voice)"


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (["task=speech"], SPEECH_VOICES),
        (["task=speech", "task.fetch.espeak.split_by=speaker"], "clips of speakers that no training clip has"),
        (["task=speech", "task.fetch.source=speechcommands"], "the clips of the archive's testing list"),
        (["task=speech", "task.fetch.source=nosuch"], "an unknown source's test split"),
        (
            ["task=forecast_electricity", "task.preprocess.test_fraction=0.2"],
            "every forecast origin in the series' newest rows (test_fraction 0.2,",
        ),
        (
            ["task=sentiment", "task.preprocess.test_fraction=0.2"],
            "distinct reviews (duplicates dropped) of a stratified random split (test_fraction 0.2,",
        ),
        (["task=memory_copy", "task.data.lag=40"], "1000 sequences at lag 40"),
    ],
)
def test_a_task_config_says_what_its_test_set_is_from_its_split_settings(
    compose_cfg: Callable[..., DictConfig], overrides: list[str], says: str
) -> None:
    assert compose_cfg(*overrides).task.test_set.startswith(says)


def test_a_tuned_model_equal_to_its_default_is_marked(report: dict[str, Any], store: Path) -> None:
    # The store's sentiment gru_tuned is model=gru's default configuration, as resolve found (the report fixture).
    models = report["tasks"]["sentiment"]["models"]
    assert models["gru_tuned"]["same_as_default"] == "gru"
    assert [models[model]["same_as_default"] for model in ("gru", "lstm", "rnn")] == [None, None, None]
    md = (store / "reports" / "comparison.md").read_text()
    assert "\n| gru_tuned (= gru's default) | 0.9100 ± — |" in md and "\n| gru | " in md
    assert "gru_tuned is gru's default configuration: its study found nothing better (conf/experiment/sentiment_gru_tuned.yaml)" in md


# A study that found model=gru's default configuration on sentiment.
DEFAULT_GRU_TUNED = """# @package _global_
defaults:
- override /task: sentiment
- override /model: gru
model:
  name: gru_tuned
"""


@pytest.mark.parametrize(("listed", "marked"), [("forecast/gru_tuned: null", "gru"), ("sentiment/gru_tuned: null", None)])
def test_a_tuned_model_resolve_did_not_check_is_composed(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, listed: str, marked: str | None
) -> None:
    # A file that says nothing of sentiment/gru_tuned (runs=newest may compare tuned models the pipeline does not train):
    # compare composes it, as it does without a file, and finds the default; what resolve says it takes as it is.
    shutil.copytree(config_dir(), tmp_path / "conf")
    (tmp_path / "conf" / "experiment" / "sentiment_gru_tuned.yaml").write_text(DEFAULT_GRU_TUNED)
    monkeypatch.setenv("RNNLAB_ROOT", str(tmp_path))
    findings = tmp_path / "compare.yaml"
    findings.write_text(f"tuned_as_default:\n  {listed}\n")
    overrides = [*store_overrides(store, tmp_path, resolved=False), NO_ALIAS, FEW_RESAMPLES, f"tuned_as_default_from={findings}"]
    assert compare(compose_compare(*overrides))["tasks"]["sentiment"]["models"]["gru_tuned"]["same_as_default"] == marked


@pytest.mark.parametrize(
    ("text", "got"),
    [
        ("tuned_as_default: [sentiment/gru_tuned]\n", "['sentiment/gru_tuned']"),
        ("compare: {}\n", "None"),
        ("tuned_as_default: {a: 1}\n", "{'a': 1}"),
    ],
)
def test_a_file_without_resolve_s_findings_is_refused(store: Path, tmp_path: Path, text: str, got: str) -> None:
    listed = tmp_path / "compare.yaml"
    listed.write_text(text)
    out = tmp_path / "out"
    says = (
        rf"tuned_as_default_from={listed}: it has no `tuned_as_default` mapping .* \(got {re.escape(got)}\); run `python -m rnnlab.resolve`"
    )
    with pytest.raises(ConfigError, match=says):
        compare(compose_compare(*store_overrides(store, out, resolved=False), NO_ALIAS, f"tuned_as_default_from={listed}"))
    assert not out.exists()  # refused before anything was written


def test_metrics_file_holds_only_numbers(report: dict[str, Any], store: Path) -> None:
    metrics = json.loads((store / "reports" / "comparison_metrics.json").read_text())

    def leaves(node: Any) -> list[Any]:
        return [leaf for child in node.values() for leaf in leaves(child)] if isinstance(node, dict) else [node]

    assert all(isinstance(leaf, int | float) and not isinstance(leaf, bool) for leaf in leaves(metrics))
    gru = metrics["sentiment"]["gru"]
    assert gru["test_acc_mean"] == pytest.approx(np.mean(GRU_SENTIMENT)) and gru["seeds"] == 5 and gru["champion_val_acc"] == 0.99
    assert gru["ci_low"] < gru["test_acc_mean"] < gru["ci_high"] and "peak_memory_mb" not in gru  # not logged: left out
    assert "ci_low" not in metrics["textgen"]["gru"]  # one seed: no interval
    assert metrics["sentiment"]["baseline_tfidf_logreg"] == {"test_acc": pytest.approx(BASELINE_SENTIMENT)}
    accuracy = report["tasks"]["forecast"]["forecast_accuracy"]  # M4's sMAPE and OWA beside each forecast model's MASE
    assert metrics["forecast"]["baseline_naive2"] == pytest.approx(
        {"test_mase": NAIVE2_MASE, "test_smape": accuracy["naive2"]["smape"], "test_owa": 1.0}
    )
    assert metrics["forecast"]["gru"]["test_owa"] == pytest.approx(accuracy["gru"]["owa"])
    gru_vs_rnn = report["tasks"]["sentiment"]["pairs"][1]
    assert metrics["sentiment"]["gru_vs_rnn"] == pytest.approx(
        {"effect": gru_vs_rnn["effect"], "shared_seeds": 5, "ci_low": gru_vs_rnn["ci"][0], "ci_high": gru_vs_rnn["ci"][1]}
        | {key: gru_vs_rnn[key] for key in ("p_value", "p_holm", "mde")}
    )
    assert metrics["textgen"]["gru_vs_lstm"] == {"effect": pytest.approx(-0.1), "shared_seeds": 1}


def test_seeds_filter(store: Path, tmp_path: Path) -> None:
    narrowed = compare(
        compose_compare(*store_overrides(store, tmp_path), NO_ALIAS, FEW_RESAMPLES, "seeds=[1,2,3]", "tracking.experiment=seeds")
    )
    assert narrowed["seeds"] == {key: [1, 2, 3] for key in narrowed["tasks"]}
    sentiment = narrowed["tasks"]["sentiment"]
    assert sentiment["models"]["gru"]["seeds"] == [1, 2, 3] and sentiment["models"]["gru_tuned"]["seeds"] == [1]
    assert sentiment["models"]["gru"]["mean"] == pytest.approx(np.mean(GRU_SENTIMENT[:3]))
    assert sentiment["models"]["gru"]["champion"]["seed"] == 3  # seed 4, the champion over every seed, is left out
    assert sentiment["pairs"][0]["shared_seeds"] == [1, 2, 3]
    assert "(profile `default`, seeds 1, 2, 3)" in (tmp_path / "reports" / "comparison.md").read_text()
    # The same seeds from a params file, as the DVC stage passes them; one seed as a plain number.
    params = tmp_path / "params.yaml"
    params.write_text("profile: default\nseeds: [3, 1, 2]\n")
    # (The comparison itself reads seeds_from below, with more_seeds.)
    assert requested_seeds(compose_compare(f"seeds_from={params}"), list(narrowed["tasks"])) == narrowed["seeds"]
    single = compare(compose_compare(*store_overrides(store, tmp_path / "one"), NO_ALIAS, FEW_RESAMPLES, "seeds=4", "tasks=[sentiment]"))
    assert single["seeds"] == {"sentiment": [4]} and list(single["tasks"]["sentiment"]["models"]) == ["gru", "lstm", "rnn"]
    # More seeds for some tasks, as params.yaml's more_seeds and more_seeds_tasks give them.
    params.write_text("seeds: [1, 2]\nmore_seeds: [3, 4]\nmore_seeds_tasks: [sentiment]\n")
    more = compare(compose_compare(*store_overrides(store, tmp_path / "more"), NO_ALIAS, FEW_RESAMPLES, f"seeds_from={params}"))
    others = sorted(task for task in more["tasks"] if task != "sentiment")
    assert others and more["seeds"] == {"sentiment": [1, 2, 3, 4]} | {key: [1, 2] for key in others}
    assert more["tasks"]["sentiment"]["models"]["gru"]["seeds"] == [1, 2, 3, 4]
    assert all(max(m["seeds"]) <= 2 for task in others for m in more["tasks"][task]["models"].values())
    header = f"(profile `default`, seeds 1, 2 ({', '.join(others)}); seeds 1, 2, 3, 4 (sentiment))"
    assert header in (tmp_path / "more" / "reports" / "comparison.md").read_text()
    params.write_text("seeds: [1]\nmore_seeds: [2, b]\n")
    with pytest.raises(ConfigError, match=r"more_seeds in .*params.yaml must be null \(no more seeds\), a whole number or a list of them"):
        compare(compose_compare(*store_overrides(store, tmp_path / "bad"), NO_ALIAS, f"seeds_from={params}"))
    params.write_text("seeds: [1]\nmore_seeds: [2]\nmore_seeds_tasks: sentiment\n")
    with pytest.raises(ConfigError, match=r"more_seeds_tasks in .*params.yaml must be a list of tasks, e.g. \[speech\]; got 'sentiment'"):
        compare(compose_compare(*store_overrides(store, tmp_path / "bad"), NO_ALIAS, f"seeds_from={params}"))
    # The models a pipeline's params file trains: gru_tuned's runs (no longer in `tuned`) are left out.
    params.write_text("seeds: [1, 2, 3]\nmodels: [gru, lstm]\nsingle_seed_models: []\ntuned: []\n")
    from_params = (NO_ALIAS, FEW_RESAMPLES, f"models_from={params}", "tasks=[sentiment]")
    pipeline = compare(compose_compare(*store_overrides(store, tmp_path / "models"), *from_params))
    assert list(pipeline["tasks"]["sentiment"]["models"]) == ["gru", "lstm"]
    params.write_text("models: [gru]\ntuned: [sentiment]\n")
    tuned = compare(compose_compare(*store_overrides(store, tmp_path / "tuned"), *from_params))
    assert list(tuned["tasks"]["sentiment"]["models"]) == ["gru", "gru_tuned"]
    # default_tasks without sentiment: its default runs (on disk, in the store) are not this pipeline's.
    params.write_text("seeds: [1]\nmore_seeds: [2]\nmodels: [gru]\ntuned: [sentiment]\ndefault_tasks: [textgen]\n")
    both = (NO_ALIAS, FEW_RESAMPLES, f"models_from={params}", "seeds=[1]", "tasks=[sentiment,textgen]")
    only_tuned = compare(compose_compare(*store_overrides(store, tmp_path / "only_tuned"), *both))
    assert list(only_tuned["tasks"]["sentiment"]["models"]) == ["gru_tuned"] and list(only_tuned["tasks"]["textgen"]["models"]) == ["gru"]
    # The tuned models of more_seeds_tuned train over more_seeds too (the store's tuned runs have seed 1 only, so this is
    # read, not compared); those of another tuned task over `seeds` alone.
    assert requested_seeds(compose_compare(f"seeds_from={params}"), ["sentiment", "textgen"]) == {"sentiment": [1], "textgen": [1]}
    params.write_text(params.read_text() + "more_seeds_tuned: [sentiment]\n")
    assert requested_seeds(compose_compare(f"seeds_from={params}"), ["sentiment", "textgen"]) == {"sentiment": [1, 2], "textgen": [1]}
    params.write_text("models: [gru, lstm_scratch]\ntuned: []\ndefault_tasks: [sentiment]\n")
    produce = r"Produce them with `dvc repro`, or `python -m rnnlab.train task=sentiment model=lstm_scratch profile=default`"
    with pytest.raises(DataError, match=r"no FINISHED training runs of lstm_scratch on sentiment .*" + produce):
        compare(compose_compare(*store_overrides(store, tmp_path / "missing"), NO_ALIAS, f"models_from={params}", "tasks=[sentiment]"))
    params.write_text("models: [gru]\ntuned: []\ndefault_tasks: [textgen]\n")
    with pytest.raises(ConfigError, match=r"models_from=.*params.yaml trains no model on sentiment \(neither its default_tasks nor"):
        compare(compose_compare(*store_overrides(store, tmp_path / "untrained"), NO_ALIAS, f"models_from={params}", "tasks=[sentiment]"))


def test_the_command_that_produces_a_missing_run_names_a_config_that_exists() -> None:
    tuned = train_command("speech", "gru_tuned", "default", 42)
    assert tuned == "python -m rnnlab.train experiment=speech_gru_tuned seed=42 profile=default"
    assert (config_dir() / "experiment" / "speech_gru_tuned.yaml").is_file()
    assert train_command("sentiment", "lstm", "quick") == "python -m rnnlab.train task=sentiment model=lstm profile=quick"
    assert (config_dir() / "model" / "lstm.yaml").is_file()


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        (
            ["seeds=[a,2]"],
            ConfigError,
            r"seeds must be null \(every seed\), a whole number or a list of them, e.g. seeds=\[42,43,44\]; got \['a', 2\]",
        ),
        (["seeds=1.5"], ConfigError, r"seeds must be .* got 1.5"),
        (["seeds=[]"], ConfigError, r"seeds must be .* got \[\]"),
        (
            ["seeds=[1,99]"],
            DataError,
            r"seed 99 has no FINISHED training runs of profile 'default' .*; the runs there have seeds 1, 2, 3, 4, 5\. .*"
            r"`python -m rnnlab.train task=\w+ model=\w+ seed=99 profile=default` and likewise for each missing run",
        ),
        (["seeds=[1]", "seeds_from=params.yaml"], ConfigError, r"give seeds or seeds_from, not both"),
        (["seeds_from=/nonexistent/params.yaml"], ConfigError, r"seeds_from=/nonexistent/params.yaml: cannot read"),
        (["models=[gru]", "models_from=params.yaml"], ConfigError, r"give models or models_from, not both"),
        (["models=[gru,nosuch]"], ConfigError, r"unknown model 'nosuch'; known: gru, gru_scratch, gru_tuned, lstm, .*models with runs"),
        (
            ["models=[lstm_scratch]"],
            DataError,
            r"no FINISHED training runs of model lstm_scratch .*; models with runs: gru, gru_tuned, lstm, rnn\. "
            r"Produce them with `dvc repro`, or `python -m rnnlab.train task=\w+ model=lstm_scratch",
        ),
        (["tasks=[nosuch]"], ConfigError, r"unknown task 'nosuch'; known: .*sentiment"),
        (["champion_alias=latest"], ConfigError, r"champion_alias must be null .* other than 'latest' and v<number>"),
        (["champion_alias=v2"], ConfigError, r"champion_alias must be null"),
        (["resamples=10"], ConfigError, r"resamples must be an integer >= 100"),
        (["alpha=0.5"], ConfigError, r"alpha must be in \(0, 0.5\)"),
        (["profile=smoke", "models=[lstm]"], DataError, r"no FINISHED training runs of model lstm of profile 'smoke'.*dvc repro"),
    ],
)
def test_bad_settings_are_clear_errors_and_write_nothing(
    store: Path, tmp_path: Path, overrides: list[str], error: type, message: str
) -> None:
    with pytest.raises(error, match=message):
        compare(compose_compare(*store_overrides(store, tmp_path), NO_ALIAS, *overrides))
    assert not (tmp_path / "reports").exists()


def sentiment_gru_runs(store: Path) -> dict[tuple[int, float], str]:
    """(seed, test_acc) -> run id of every FINISHED sentiment GRU run of the default profile outside a search."""
    client = MlflowClient(f"sqlite:///{store}/mlflow.db")
    experiment = client.get_experiment_by_name("rnnlab-sentiment")
    query = "tags.model = 'gru' AND tags.profile = 'default' AND attributes.status = 'FINISHED'"
    runs = [r for r in client.search_runs([experiment.experiment_id], query) if "optuna.trial" not in r.data.tags]
    return {(int(r.data.tags["seed"]), r.data.metrics["test_acc"]): r.info.run_id for r in runs}


def test_pipeline_runs_are_those_the_metrics_files_name(store: Path, tmp_path: Path) -> None:
    named = sentiment_gru_runs(store)
    metrics = tmp_path / "metrics" / "sentiment" / "gru"
    metrics.mkdir(parents=True)
    for (seed, value), run_id in named.items():
        if seed in (1, 2) or value == 0.2:  # seed 3: its older run, not the newest
            (metrics / f"seed{seed}.json").write_text(json.dumps({"test_acc": value, "mlflow_run_id": run_id}))
    (metrics / "seed9.json").write_text(json.dumps({"test_acc": 0.5}))  # another pipeline's seed (and an older rnnlab's file)
    overrides = [*store_overrides(store, tmp_path), NO_ALIAS, "runs=pipeline", f"metrics_dir={tmp_path}/metrics", "tasks=[sentiment]"]
    gru = compare(compose_compare(*overrides, "seeds=[1,2,3]"))["tasks"]["sentiment"]["models"]["gru"]
    assert gru["seeds"] == [1, 2, 3]
    assert gru["mean"] == pytest.approx(np.mean([*GRU_SENTIMENT[:2], 0.2]))
    newest = compare(compose_compare(*store_overrides(store, tmp_path / "newest"), NO_ALIAS, "tasks=[sentiment]", "seeds=[1,2,3]"))
    assert newest["tasks"]["sentiment"]["models"]["gru"]["mean"] == pytest.approx(np.mean(GRU_SENTIMENT[:3]))


def test_pipeline_runs_leave_out_the_metrics_files_of_models_the_pipeline_no_longer_trains(store: Path, tmp_path: Path) -> None:
    # A model that leaves params.yaml (sentiment's defaults, when its tuned cells replaced them) leaves its metrics files
    # in git, naming runs that a fresh clone's store does not have: they are not this pipeline's, as other seeds are not.
    named = sentiment_gru_runs(store)
    for model, seed_runs in {"gru": {seed: run_id for (seed, _), run_id in named.items()}, "lstm": {1: "0" * 32}}.items():
        (tmp_path / "metrics" / "sentiment" / model).mkdir(parents=True)
        for seed, run_id in seed_runs.items():
            (tmp_path / "metrics" / "sentiment" / model / f"seed{seed}.json").write_text(json.dumps({"mlflow_run_id": run_id}))
    params = tmp_path / "params.yaml"
    params.write_text("tasks: [sentiment]\nmodels: [gru]\n")
    overrides = [*store_overrides(store, tmp_path), NO_ALIAS, "runs=pipeline", f"metrics_dir={tmp_path}/metrics", "tasks=[sentiment]"]
    models = compare(compose_compare(*overrides, "seeds=[1,2]", f"models_from={params}"))["tasks"]["sentiment"]["models"]
    assert list(models) == ["gru"] and models["gru"]["seeds"] == [1, 2]
    with pytest.raises(DataError, match=r"lstm/seed1\.json names MLflow run 0{32}, which is not in this store"):
        compare(compose_compare(*overrides, "seeds=[1,2]"))  # every model's files, where no params file names the models


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"test_acc": 0.9}, r"seed1\.json names no MLflow run \(mlflow_run_id\).*dvc repro"),
        ({"mlflow_run_id": "0" * 32}, r"seed1\.json names MLflow run 0{32}, which is not in this store"),
        ("not json", r"seed1\.json is not a metrics file"),
    ],
)
def test_a_metrics_file_without_a_usable_run_is_a_clear_error(store: Path, tmp_path: Path, content: Any, message: str) -> None:
    metrics = tmp_path / "metrics" / "sentiment" / "gru"
    metrics.mkdir(parents=True)
    (metrics / "seed1.json").write_text(content if isinstance(content, str) else json.dumps(content))
    overrides = [*store_overrides(store, tmp_path), NO_ALIAS, "runs=pipeline", f"metrics_dir={tmp_path}/metrics", "tasks=[sentiment]"]
    with pytest.raises(DataError, match=message):
        compare(compose_compare(*overrides))
    assert not (tmp_path / "reports").exists()


def test_a_metrics_file_naming_a_run_of_another_profile_is_a_clear_error(store: Path, tmp_path: Path) -> None:
    client = MlflowClient(f"sqlite:///{store}/mlflow.db")
    experiment = client.get_experiment_by_name("rnnlab-sentiment")
    smoke = client.search_runs([experiment.experiment_id], "tags.profile = 'smoke'")[0].info.run_id
    metrics = tmp_path / "metrics" / "sentiment" / "gru"
    metrics.mkdir(parents=True)
    (metrics / "seed6.json").write_text(json.dumps({"mlflow_run_id": smoke}))
    overrides = [*store_overrides(store, tmp_path), NO_ALIAS, "runs=pipeline", f"metrics_dir={tmp_path}/metrics", "tasks=[sentiment]"]
    with pytest.raises(DataError, match=rf"names MLflow run {smoke} \(FINISHED, profile smoke\).*compare that profile"):
        compare(compose_compare(*overrides))


def test_run_without_monitor_history_is_a_clear_error(tmp_path: Path) -> None:
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    add_run(client, "sentiment", "gru", 1, 0.9, 1000)
    broken = add_run(client, "forecast", "gru", 1, 1.1, 1000, val=[])  # no val_mase logged
    with pytest.raises(DataError, match=rf"run {broken} \(forecast-gru-seed1\) logged no val_mase history.*seeds=\[\.\.\.\]"):
        compare(compose_compare(*store_overrides(tmp_path), NO_ALIAS))
    assert not (tmp_path / "reports").exists()


def test_failed_registration_writes_nothing(store: Path, tmp_path: Path) -> None:
    """The synthetic runs have no config.yaml or network: setting the alias fails, after the figures were drawn."""
    with pytest.raises(DataError, match=r"has no config\.yaml artifact"):
        compare(compose_compare(*store_overrides(store, tmp_path), "tasks=[textgen]"))
    assert not (tmp_path / "reports").exists()


def test_champion_alias_is_profile_aware() -> None:
    assert compose_compare().champion_alias == "champion"
    assert compose_compare("profile=smoke").champion_alias == "champion-smoke"
    assert compose_compare("profile=smoke", "champion_alias=best").champion_alias == "best"


def test_learning_curve_is_the_mean_per_epoch(tmp_path: Path) -> None:
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    long = add_run(client, "sentiment", "gru", 1, 0.0, 1000)
    short = client.create_run(client.get_experiment_by_name("rnnlab-sentiment").experiment_id).info.run_id
    # Stopped after two epochs; its first epoch logged twice (a resumed run): the later value counts.
    for step, value, timestamp in ((10, 5.0, 1), (10, 0.5, 2), (20, 0.3, 3)):
        client.log_metric(short, "val_loss", value, timestamp=timestamp, step=step)
    curve = learning_curve(client, [long, short])
    assert curve.index.tolist() == [0, 1, 2]
    assert curve.tolist() == pytest.approx([(0.9 + 0.5) / 2, (0.7 + 0.3) / 2, 0.6])


def test_the_pipeline_s_learning_curve_plots_name_the_models_compare_writes_for_each_task() -> None:
    """dvc.yaml's top-level plots cannot be templated: each task's columns are written by hand, so they are checked
    against the models that `compare` reads from params.yaml (a tuned task's curves have <model>_tuned columns)."""
    root = config_dir().parent
    dvc = yaml.safe_load((root / "dvc.yaml").read_text())
    plotted = {}
    for ((title, spec),) in (plot.items() for plot in dvc["plots"]):
        ((curves, columns),) = spec["y"].items()  # one file per plot: compare's reports/curves/<task>.csv
        assert curves == f"reports/curves/{title.removesuffix(' learning curves')}.csv"
        plotted[Path(curves).stem] = set(columns)
    tasks = yaml.safe_load((root / "params.yaml").read_text())["tasks"]
    models = requested_models(compose_compare(f"models_from={root / 'params.yaml'}"), tasks)
    assert isinstance(models, dict) and plotted == {task: set(names) for task, names in models.items()}


def test_empty_store_is_a_clear_error_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = run_main(compare_main, *store_overrides(tmp_path), run_dir=tmp_path / "hydra", capsys=capsys)
    assert result.returncode == 2
    # The last line: a new store's MLflow log lines come first.
    assert result.stderr.splitlines()[-1].startswith("rnnlab: error: no FINISHED training runs of profile 'default'")
    assert "rnnlab-sentiment" in result.stderr and "dvc repro" in result.stderr and "python -m rnnlab.train" in result.stderr
    assert not (tmp_path / "reports").exists()


def test_champion_alias_and_figures_from_real_runs(
    compose_cfg: Callable[..., DictConfig], tiny_overrides: list[str], tmp_path: Path
) -> None:
    """Two tiny sentiment runs: the champion's serving model gets `champion-smoke`, which moves with the seeds compared
    and back again without a new version; the champion's confusion matrix is fetched into the report."""
    store = [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"tracking.artifact_location={tmp_path}/artifacts"]
    for seed in (1, 2):
        train(compose_cfg(*tiny_overrides, *isolated_outputs(tmp_path / f"seed{seed}"), *store, "trainer.max_epochs=2", f"seed={seed}"))
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = {
        int(r.data.tags["seed"]): r.info.run_id
        for r in client.search_runs([client.get_experiment_by_name("rnnlab-sentiment").experiment_id])
    }
    best_val = {seed: max(m.value for m in client.get_metric_history(run_id, "val_acc")) for seed, run_id in runs.items()}

    def compare_seeds(seeds: str, out: str) -> dict[str, Any]:
        overrides = [
            *store,
            f"output_dir={tmp_path}/{out}",
            f"metrics_dir={tmp_path}/metrics",
            "profile=smoke",
            "tasks=[sentiment]",
            f"seeds={seeds}",
        ]
        return compare(compose_compare(*overrides))

    def champion_run() -> str:
        return client.get_model_version_by_alias("rnnlab-sentiment-gru", "champion-smoke").run_id

    both = compare_seeds("[1,2]", "both")["tasks"]["sentiment"]["models"]["gru"]["champion"]
    assert best_val[both["seed"]] == max(best_val.values()) and both["best_value"] == pytest.approx(best_val[both["seed"]])
    assert champion_run() == runs[both["seed"]] and both["alias"] == "champion-smoke"
    md = (tmp_path / "both" / "comparison.md").read_text()
    assert f"rnnlab-sentiment-gru v{both['version']} @champion-smoke" in md
    assert "![sentiment gru_confusion_matrix](figures/sentiment_gru_confusion_matrix.png)" in md
    assert (tmp_path / "both" / "figures" / "sentiment_gru_confusion_matrix.png").read_bytes().startswith(b"\x89PNG")
    assert pd.read_csv(tmp_path / "both" / "curves" / "sentiment.csv")["epoch"].tolist() == [0, 1]

    other = 3 - both["seed"]
    moved = compare_seeds(str(other), "other")["tasks"]["sentiment"]["models"]["gru"]["champion"]
    assert champion_run() == runs[other] and moved["version"] != both["version"]
    back = compare_seeds(str(both["seed"]), "back")["tasks"]["sentiment"]["models"]["gru"]["champion"]
    assert champion_run() == runs[both["seed"]] and back["version"] == both["version"]  # the alias moved, no new version
    assert client.get_registered_model("rnnlab-sentiment-gru").aliases == {"champion-smoke": both["version"]}


def test_networks_are_tested_against_the_strongest_baseline_or_all() -> None:
    baselines = {"persistence": 1.0, "naive2": 1.2, "arima": 0.9}
    assert baselines_to_test(baselines, "min", "strongest") == ["arima"]
    assert baselines_to_test({"tfidf": 0.9, "other": 0.8}, "max", "strongest") == ["tfidf"]
    assert baselines_to_test(baselines, "min", "all") == ["persistence", "naive2", "arima"]
    assert baselines_to_test({}, "min", "strongest") == []


def test_m4_measures_by_hand() -> None:
    predictions = pd.DataFrame({"horizon": [1, 2, 1, 2], "target": [10.0, 0.0, 4.0, 2.0], "prediction": [12.0, 0.0, 4.0, 1.0]})
    # sMAPE terms: 200*2/22, 0/0 counted as 0, 0, 200*1/3; MASE: mean |error| 0.75 over the scale 0.5; MAE at step 1: 1.
    assert forecast_accuracy(predictions, scale=0.5) == pytest.approx({"smape": (400 / 22 + 200 / 3) / 4, "mase": 1.5, "mae_1": 1.0})
    owa = with_owa({"naive2": {"smape": 10.0, "mase": 2.0}, "gru": {"smape": 5.0, "mase": 3.0}})
    assert owa["gru"]["owa"] == pytest.approx((0.5 + 1.5) / 2) and owa["naive2"]["owa"] == 1.0
    assert "owa" not in with_owa({"gru": {"smape": 5.0, "mase": 3.0}})["gru"]  # no naive2: no OWA
