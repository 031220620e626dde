"""End to end on tiny data: metrics file, history, checkpoint, MLflow run and registered model."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from helpers import isolated_outputs, only_results, run_main
from mlflow import MlflowClient

from rnnlab.train import main as train_main
from rnnlab.training import train


def test_train_writes_outputs_and_tracks_in_mlflow(compose_cfg, tiny_overrides: list[str], tmp_path: Path) -> None:
    cfg = compose_cfg(
        *tiny_overrides,
        "model=lstm",
        "model.encoder.hidden_size=32",
        "model.encoder.match_params=gru",
        "trainer.max_epochs=2",
        "callbacks.early_stopping=null",
    )
    metrics = train(cfg)

    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    run_id = on_disk.pop("mlflow_run_id")  # the run the comparison reads: DVC's metrics and MLflow agree
    assert on_disk == metrics
    assert {"test_acc", "test_f1", "test_auroc", "test_loss", "n_params", "train_seconds"} <= on_disk.keys()
    assert 0 <= on_disk["test_acc"] <= 1 and on_disk["epochs"] == 2
    history = pd.read_csv(tmp_path / "history.csv")
    assert history["epoch"].tolist() == [0, 1]
    assert {"train_loss", "val_loss", "val_acc"} <= set(history.columns)
    assert (tmp_path / "models" / "model.ckpt").is_file()
    # One row per test review, scored by the tested weights: the paired tests of compare read these.
    predictions = pd.read_csv(tmp_path / "predictions.csv")
    test_ids = json.loads((Path(cfg.paths.processed) / "splits.json").read_text())["test"]
    assert list(predictions.columns) == ["unit", "group", "target", "prediction", "score", "loss"]
    assert predictions["unit"].tolist() == test_ids[: len(predictions)] and (predictions["group"] == predictions["unit"]).all()
    assert len(predictions) == cfg.task.data.limit_test or len(predictions) == len(test_ids)
    assert (predictions["prediction"] == (predictions["score"] > 0.5)).all()
    assert (predictions["prediction"] == predictions["target"]).mean() == pytest.approx(metrics["test_acc"], abs=1e-6)
    assert predictions["loss"].mean() == pytest.approx(metrics["test_loss"], rel=1e-4)

    mlflow.set_tracking_uri(cfg.tracking.uri)
    runs = mlflow.search_runs(experiment_names=["rnnlab-sentiment"], output_format="list")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    assert run.info.run_name == "sentiment-lstm-seed42"
    assert run.data.tags["profile"] == "smoke" and run.data.tags["model"] == "lstm"
    assert run.data.metrics["test_acc"] == pytest.approx(metrics["test_acc"])
    assert run.data.metrics["n_params"] == metrics["n_params"]
    # The LSTM narrowed to the GRU's parameter count at width 32 (embedding 52 x 8, head 2 x 64 + 2), and says so.
    gru_params = 3 * (8 * 32 + 32 * 32 + 2 * 32) + 52 * 8 + (2 * 32 * 2 + 2)
    assert abs(metrics["n_params"] - gru_params) <= 0.02 * gru_params
    assert run.data.metrics["hidden_size"] == metrics["hidden_size"] < 32
    # What the model costs to use, for the comparison: measured on the test set, logged beside the metrics.
    for key in ("latency_ms_per_sequence", "peak_memory_mb"):
        assert metrics[key] > 0 and run.data.metrics[key] == pytest.approx(metrics[key])
    assert run.data.params["model/encoder/cell"] == "torch.nn.LSTM"
    client = MlflowClient(cfg.tracking.uri)
    assert {"config.yaml", "test_predictions.csv"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    versions = client.search_model_versions("name='rnnlab-sentiment-lstm'")
    assert [v.run_id for v in versions] == [run.info.run_id]
    net = mlflow.pytorch.load_model("models:/rnnlab-sentiment-lstm/1")
    assert type(net.encoder.rnn).__name__ == "LSTM"


@pytest.mark.parametrize("package", ["lightning.pytorch", "pytorch_lightning"])
def test_lightnings_litlogger_advert_is_dropped_and_its_other_notices_kept(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, package: str
) -> None:
    # The loggers Lightning's trainer notices go to: lightning's while pytorch_lightning is not imported (a process's
    # first run), the standalone pytorch_lightning's once mlflow.pytorch has imported it (an in-process multirun's later runs).
    notices = logging.getLogger(f"{package}.utilities.rank_zero")
    monkeypatch.setattr(logging.getLogger(package), "propagate", True)  # Lightning stops it at its own handler
    with caplog.at_level(logging.INFO, logger=notices.name):
        notices.info(
            "💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger](https://pypi.org/project/litlogger/)"
        )
        notices.info("GPU available: False, used: False")
    assert {r.getMessage() for r in caplog.records if r.name == notices.name} == {"GPU available: False, used: False"}


def test_same_seed_gives_same_metrics(compose_cfg, tiny_overrides: list[str], tmp_path: Path) -> None:
    """Two runs with their own outputs, checkpoints and MLflow store: nothing of the first can reach the second."""
    first = train(compose_cfg(*tiny_overrides, *isolated_outputs(tmp_path / "first"), "model=gru", "seed=3"))
    second = train(compose_cfg(*tiny_overrides, *isolated_outputs(tmp_path / "second"), "model=gru", "seed=3"))
    other = train(compose_cfg(*tiny_overrides, *isolated_outputs(tmp_path / "other"), "model=gru", "seed=4"))
    assert only_results(first) == only_results(second)
    histories = [pd.read_csv(tmp_path / run / "history.csv").drop(columns="seconds") for run in ("first", "second")]
    pd.testing.assert_frame_equal(*histories)
    assert first["test_loss"] != other["test_loss"]


def test_failed_run_is_marked_failed_and_writes_no_metrics(compose_cfg, tiny_overrides: list[str], tmp_path: Path) -> None:
    cfg = compose_cfg(*tiny_overrides, "+optimizer.betas=[2.0,0.999]")  # AdamW rejects it when training starts
    with pytest.raises(Exception, match="Invalid beta parameter"):
        train(cfg)
    assert not (tmp_path / "metrics.json").exists()
    assert not (tmp_path / "models").exists()
    mlflow.set_tracking_uri(cfg.tracking.uri)
    runs = mlflow.search_runs(experiment_names=["rnnlab-sentiment"], output_format="list")
    assert [r.info.status for r in runs] == ["FAILED"]


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("rnnlab-train")  # installed beside this interpreter
    assert script.is_file(), f"the rnnlab-train console script is not installed at {script}"
    return subprocess.run([str(script), *args], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.mark.slow  # the installed console script in a fresh interpreter: the process is the point
def test_console_script_accepts_hydra_overrides(compose_cfg, tiny_overrides: list[str], tmp_path: Path) -> None:
    result = run_cli(*tiny_overrides, "model=rnn", "trainer.max_epochs=1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["epochs"] == 1
    assert metrics["n_params"] == (8 * 8 + 8 * 8 + 2 * 8) + 52 * 8 + (2 * 8 * 2 + 2)
    # The command and train() in this process (another hash seed, fresh state) give the same run.
    in_process = train(compose_cfg(*tiny_overrides, *isolated_outputs(tmp_path / "in_process"), "model=rnn", "trainer.max_epochs=1"))
    assert only_results(in_process) == only_results(metrics)


@pytest.mark.slow  # the installed console script in a fresh interpreter: the process is the point
def test_console_script_reports_bad_values_without_traceback(tiny_overrides: list[str], tmp_path: Path) -> None:
    result = run_cli(*tiny_overrides, "model.encoder.dropout=-0.5", cwd=tmp_path)
    assert result.returncode == 2
    assert "model.encoder.dropout must be in [0, 1), got -0.5" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "metrics.json").exists()


def test_multirun_grid_trains_each_model_into_mlflow(tiny_overrides: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    overrides = [
        o
        for o in tiny_overrides
        if not o.startswith(("paths.metrics_file", "paths.model_dir", "paths.history_file", "paths.run_dir"))
        and not o.startswith("paths.predictions_file")
    ]
    outputs = [f"paths.metrics_file={tmp_path}/metrics/${{model.name}}.json", f"paths.model_dir={tmp_path}/models/${{model.name}}"]
    outputs.append(f"paths.run_dir={tmp_path}/runs/${{model.name}}")  # each run its own folder: one run never clears another's
    history = f"paths.history_file={tmp_path}/metrics/${{model.name}}_history.csv"
    outputs.append(f"paths.predictions_file={tmp_path}/metrics/${{model.name}}_predictions.csv")
    sweep_dir = f"hydra.sweep.dir={tmp_path}/multirun"
    result = run_main(train_main, "-m", *overrides, *outputs, history, sweep_dir, "model=gru,lstm,rnn", run_dir=tmp_path, capsys=capsys)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "metrics").glob("*.json")) == ["gru.json", "lstm.json", "rnn.json"]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["rnnlab-sentiment"], output_format="list")
    assert sorted(r.info.run_name for r in runs) == ["sentiment-gru-seed42", "sentiment-lstm-seed42", "sentiment-rnn-seed42"]
    assert {r.info.status for r in runs} == {"FINISHED"}
