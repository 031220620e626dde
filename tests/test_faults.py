"""Faults a training run must survive or report: signals, resuming, a diverging loss, a shared MLflow store."""

from __future__ import annotations

import ast
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import psutil
import pytest
import torch
from helpers import file_hashes, isolated_outputs, only_results, run_main
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from mlflow import MlflowClient

import rnnlab
import rnnlab.io
from rnnlab import run_paths, tracking
from rnnlab.callbacks import StopOnSignal
from rnnlab.config import config_dir, project_root
from rnnlab.errors import ConfigError, TrainingError
from rnnlab.tracking import ContinuedRunLogger
from rnnlab.train import main as train_main
from rnnlab.training import RunInterrupted, train

OUTPUTS = ("metrics.json", "history.csv", "models", "plots")  # what isolated_outputs sends a run's DVC outputs to


def start_training(*overrides: str, out: Path) -> subprocess.Popen:
    """`python -m rnnlab.train` in its own process, with tests/ importable (for helpers.Throttle)."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))}
    with (out / "output.log").open("w") as log:  # a file, not a pipe: a full pipe would stall the run while the test polls
        return subprocess.Popen([sys.executable, "-m", "rnnlab.train", *overrides], cwd=out, env=env, stdout=log, stderr=subprocess.STDOUT)


def finish(process: subprocess.Popen, out: Path, timeout: float = 300) -> str:
    process.wait(timeout=timeout)
    return (out / "output.log").read_text()


def interrupt_in_second_epoch(overrides: list[str], out: Path, signum: int) -> tuple[int, str]:
    """Start a 3-epoch run slowed to ~2 s an epoch, send `signum` once the first epoch's last.ckpt
    exists (so it lands in the second epoch), and return the exit code and output."""
    throttled = [*overrides, "trainer.max_epochs=3", "+callbacks.throttle._target_=helpers.Throttle", "+callbacks.throttle.seconds=0.3"]
    process = start_training(*throttled, out=out)
    last = out / "run" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 240
    while not last.is_file():
        assert process.poll() is None, finish(process, out)[-3000:]
        assert time.monotonic() < deadline, "no checkpoint after the first epoch"
        time.sleep(0.05)
    process.send_signal(signum)
    return process.wait(timeout=120), finish(process, out)


def only_run(out: Path) -> mlflow.entities.Run:
    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("rnnlab-sentiment").experiment_id])
    return run


@pytest.mark.slow  # a real process (its exit code is the point): ~12 s each, mostly imports
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_the_run_marks_it_killed_and_writes_no_outputs(tiny_overrides: list[str], tmp_path: Path, signum: int) -> None:
    code, output = interrupt_in_second_epoch(tiny_overrides, tmp_path, signum)

    assert code == 128 + signum, output[-3000:]
    name = signal.Signals(signum).name
    hint = next(line for line in output.splitlines() if line.startswith("rnnlab: interrupted"))
    assert f"rnnlab: interrupted by {name}; MLflow run marked KILLED" in hint and hint.endswith("resume=true"), hint
    assert "Traceback" not in output
    assert not any((tmp_path / output).exists() for output in OUTPUTS)
    assert only_run(tmp_path).info.status == "KILLED"
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["epoch"] == 0  # the end of the first epoch, the last one that finished


def test_a_signal_stops_at_the_next_safe_point_and_a_second_one_at_once() -> None:
    """Not inside whatever the signal interrupts (an MLflow write would keep its SQLite lock)."""
    stop = StopOnSignal()
    previous = signal.getsignal(signal.SIGTERM)
    with stop.installed():
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.received == [signal.SIGTERM]  # noted, nothing raised
        with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
            stop.check()
        with pytest.raises(KeyboardInterrupt, match="SIGINT"):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is previous


@pytest.mark.slow
def test_sigterm_to_dvc_repro_stops_the_training_it_runs(tiny_overrides: list[str], tmp_path: Path) -> None:
    """DVC dies on SIGTERM without passing it to its stage's command; the training notices and stops as for SIGTERM."""
    project = tmp_path / "project"
    project.mkdir()
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=project, check=True)
    out = project / "out"  # DVC outputs live inside the project
    own = tuple(o.split("=")[0] + "=" for o in isolated_outputs(out))
    throttle = ["+callbacks.throttle._target_=helpers.Throttle", "+callbacks.throttle.seconds=0.3"]
    run = [*(o for o in tiny_overrides if not o.startswith(own)), *isolated_outputs(out), "trainer.max_epochs=3", *throttle]
    command = " ".join([sys.executable, "-m", "rnnlab.train", *(f"'{o}'" for o in run)])
    stage = {"cmd": command, "outs": [{"out/metrics.json": {"cache": False}}]}
    (project / "dvc.yaml").write_text(json.dumps({"stages": {"train": stage}}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))}
    with (tmp_path / "dvc.log").open("w") as log:
        dvc = subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=project, env=env, stdout=log, stderr=subprocess.STDOUT)
    last = out / "run" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 240
    while not last.is_file():
        assert dvc.poll() is None and time.monotonic() < deadline, (tmp_path / "dvc.log").read_text()[-3000:]
        time.sleep(0.1)
    training = [p for p in psutil.Process(dvc.pid).children(recursive=True) if "rnnlab.train" in " ".join(p.cmdline())]
    dvc.send_signal(signal.SIGTERM)  # dvc alone, not its process group
    dvc.wait(timeout=60)
    _, alive = psutil.wait_procs(training, timeout=120)
    assert training and not alive, "the training ran on after dvc ended"
    log = (tmp_path / "dvc.log").read_text()
    assert "has ended: stopping as for SIGTERM" in log and "rnnlab: interrupted by SIGTERM; MLflow run marked KILLED" in log, log[-3000:]
    assert not any((out / output).exists() for output in OUTPUTS)
    assert only_run(out).info.status == "KILLED"


def test_resuming_from_a_corrupt_checkpoint_names_it(compose_cfg, tiny_overrides: list[str], tmp_path: Path) -> None:
    train(compose_cfg(*tiny_overrides, "trainer.max_epochs=1"))
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])  # cut short, as by a full disk
    with pytest.raises(ConfigError, match=rf"{last} is not a readable checkpoint of a run .*without resume=true"):
        train(compose_cfg(*tiny_overrides, "trainer.max_epochs=1", "resume=true"))


def test_a_model_or_plots_folder_that_another_run_or_no_run_wrote_is_refused_and_kept(
    compose_cfg, tiny_overrides: list[str], tmp_path: Path
) -> None:
    train(compose_cfg(*tiny_overrides, "trainer.max_epochs=1"))
    models, plots = tmp_path / "models", tmp_path / "plots"
    written = {path: path.read_bytes() for path in sorted(models.iterdir())}
    assert {path.name for path in written} == {"config.yaml", "model.ckpt"}
    with pytest.raises(ConfigError, match=rf"{re.escape(str(models))} holds files that no earlier run of sentiment/gru/seed7"):
        train(compose_cfg(*tiny_overrides, "trainer.max_epochs=1", "seed=7"))
    assert {path: path.read_bytes() for path in sorted(models.iterdir())} == written
    # The same (task, model, seed) again replaces its own folders.
    train(compose_cfg(*tiny_overrides, "trainer.max_epochs=1"))
    # A file that no run writes into a plots folder: the folder is not a run's.
    (plots / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=rf"{re.escape(str(plots))} holds files that no earlier run of sentiment/gru/seed42"):
        train(compose_cfg(*tiny_overrides, "trainer.max_epochs=1"))
    assert (plots / "notes.txt").read_text() == "mine"
    # Pictures, but none that a run saves (run_paths.FIGURES): not a run's either.
    (plots / "notes.txt").unlink()
    (plots / "holiday.png").write_bytes(b"mine")
    with pytest.raises(ConfigError, match=rf"{re.escape(str(plots))} holds files that no earlier run of sentiment/gru/seed42"):
        train(compose_cfg(*tiny_overrides, "trainer.max_epochs=1"))
    assert (plots / "holiday.png").read_bytes() == b"mine"


def test_a_folder_no_run_marked_keeps_the_figures_and_checkpoints_a_run_would_clear(
    compose_cfg, tiny_overrides: list[str], tmp_path: Path
) -> None:
    paper = tmp_path / "paper"  # someone's folder that happens to hold what a run clears before it starts afresh
    for name in ("figures", "checkpoints"):
        (paper / name).mkdir(parents=True)
        (paper / name / "mine.png").write_bytes(b"mine")
    with pytest.raises(ConfigError, match=r"paper already holds files no rnnlab run made \(checkpoints, figures\)"):
        train(compose_cfg(*tiny_overrides, f"paths.run_dir={paper}"))
    assert all((paper / name / "mine.png").read_bytes() == b"mine" for name in ("figures", "checkpoints"))
    assert not (paper / run_paths.MARKER).exists()


# Each processed file a run reads: the tensors before training, metadata.json at set-up, splits.json after training
# (the test examples' ids), so a late failure must leave nothing behind either.
@pytest.mark.parametrize("name", ["train.pt", "metadata.json", "splits.json"])
def test_processed_data_that_cannot_be_read_is_one_line_naming_the_file(
    name: str, tiny_overrides: list[str], sentiment_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    processed = tmp_path / "processed"  # not named after the task: the hint takes the task from the config
    shutil.copytree(sentiment_root / "data" / "processed" / "sentiment", processed)
    (processed / name).write_bytes((processed / name).read_bytes()[:30])  # cut short, as by a full disk
    result = run_main(train_main, *tiny_overrides, f"paths.processed={processed}", run_dir=tmp_path / "hydra", capsys=capsys)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.startswith("rnnlab: error:")]
    assert f"{processed / name} is not readable processed data" in line and "dvc repro -f preprocess@sentiment`" in line
    assert not any((tmp_path / output).exists() for output in OUTPUTS)


def test_a_run_folder_that_cannot_be_made_is_one_line(
    tiny_overrides: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A path through a file stands for any folder the run cannot write (read-only, full): the same OSError, also as root.
    (tmp_path / "file").write_text("")
    result = run_main(train_main, *tiny_overrides, f"paths.run_dir={tmp_path}/file/run", run_dir=tmp_path / "hydra", capsys=capsys)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.startswith("rnnlab: error:")]
    assert f"cannot write into paths.run_dir={tmp_path}/file/run (Not a directory)" in line
    assert not any((tmp_path / output).exists() for output in OUTPUTS)


@pytest.mark.parametrize(
    ("writer", "when"),
    [
        ("lightning.pytorch.plugins.io.torch_plugin.TorchCheckpointIO.save_checkpoint", "while training"),
        ("matplotlib.figure.Figure.savefig", "while testing"),  # the confusion matrix
        ("rnnlab.tracking.log_model", "while logging the model"),
    ],
)
def test_a_full_disk_at_any_step_is_one_line_and_publishes_nothing(
    writer: str, when: str, tiny_overrides: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "full" / "file"))

    monkeypatch.setattr(writer, full)
    result = run_main(train_main, *tiny_overrides, run_dir=tmp_path / "hydra", capsys=capsys)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.startswith("rnnlab: error:")]
    assert f"cannot write {tmp_path / 'full' / 'file'} (No space left on device) {when}; free space there" in line
    assert not any((tmp_path / output).exists() for output in OUTPUTS)
    assert only_run(tmp_path).info.status == "FAILED"
    assert MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").search_registered_models() == []


@pytest.mark.parametrize(
    ("override", "says", "runs"),
    [
        # checked only after the first validation (the run is FAILED); the message lists what was logged
        (
            "callbacks.early_stopping.monitor=val_accuracy",
            ("callbacks.early_stopping.monitor names no logged metric", "`val_accuracy`", "`val_acc`"),
            ["FAILED"],
        ),
        # refused by Lightning when the trainer is built, inside Hydra's instantiate: before the MLflow run starts
        (
            "+trainer.enable_checkpointing=false",
            ("Lightning refused the trainer settings: Trainer was configured with `enable_checkpointing=False`",),
            [],
        ),
    ],
    ids=["early-stopping-monitor", "checkpointing-off"],
)
def test_a_setting_refused_once_the_run_started_is_one_line(
    override: str, says: tuple[str, ...], runs: list[str], tiny_overrides: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = run_main(train_main, *tiny_overrides, override, run_dir=tmp_path / "hydra", capsys=capsys)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.startswith("rnnlab: error:")]
    assert all(part in line for part in says), line
    assert not any((tmp_path / output).exists() for output in OUTPUTS)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("rnnlab-sentiment")
    assert [run.info.status for run in client.search_runs([experiment.experiment_id])] == runs


@pytest.mark.slow
def test_a_resumed_run_ends_exactly_as_an_uninterrupted_one(compose_cfg, tiny_overrides: list[str], tmp_path: Path) -> None:
    reference = train(compose_cfg(*tiny_overrides, *isolated_outputs(tmp_path / "reference"), "trainer.max_epochs=3"))

    interrupted = tmp_path / "interrupted"
    overrides = [*tiny_overrides, *isolated_outputs(interrupted)]
    code, output = interrupt_in_second_epoch(overrides, interrupted, signal.SIGTERM)
    assert code == 143, output[-3000:]
    resumed = train(compose_cfg(*overrides, "trainer.max_epochs=3", "resume=true"))

    assert only_results(resumed) == only_results(reference)
    assert only_results(json.loads((interrupted / "metrics.json").read_text())) == only_results(resumed)
    history = pd.read_csv(interrupted / "history.csv")  # the epochs before the interruption too
    assert history["epoch"].tolist() == [0, 1, 2]
    pd.testing.assert_frame_equal(
        history.drop(columns="seconds"), pd.read_csv(tmp_path / "reference" / "history.csv").drop(columns="seconds")
    )
    run = only_run(interrupted)  # the interrupted MLflow run, continued
    assert run.info.status == "FINISHED"
    client = MlflowClient(f"sqlite:///{interrupted}/mlflow.db")
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")]
    assert len(steps) == 3 and len(set(steps)) == 3
    # Every metric at the steps an uninterrupted run logs it, the learning rate at the resumed epoch's start too.
    reference_client, reference_run = MlflowClient(f"sqlite:///{tmp_path / 'reference'}/mlflow.db"), only_run(tmp_path / "reference")
    assert run.data.metrics.keys() == reference_run.data.metrics.keys()
    for key in run.data.metrics:
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
        assert steps == sorted(m.step for m in reference_client.get_metric_history(reference_run.info.run_id, key)), key


def test_a_signal_while_the_model_is_logged_registers_nothing_and_the_resumed_run_registers_one_version(
    compose_cfg, tiny_overrides: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log_model = tracking.log_model

    def log_then_signal(logger: object, net: torch.nn.Module) -> str:
        model_uri = log_model(logger, net)
        os.kill(os.getpid(), signal.SIGTERM)  # a scheduler's signal while the network goes to MLflow
        return model_uri

    monkeypatch.setattr(tracking, "log_model", log_then_signal)
    with pytest.raises(RunInterrupted) as stopped:
        train(compose_cfg(*tiny_overrides))
    assert stopped.value.exit_code == 143
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert only_run(tmp_path).info.status == "KILLED" and client.search_registered_models() == []
    assert not any((tmp_path / output).exists() for output in OUTPUTS)

    monkeypatch.setattr(tracking, "log_model", log_model)
    train(compose_cfg(*tiny_overrides, "resume=true"))
    run = only_run(tmp_path)  # the killed run, continued
    assert run.info.status == "FINISHED"
    assert [version.version for version in client.search_model_versions("name='rnnlab-sentiment-gru'")] == [1]
    tested = [key for key in run.data.metrics if key.startswith("test_")] + ["train_seconds"]
    assert len(tested) > 1 and all(len(client.get_metric_history(run.info.run_id, key)) == 1 for key in tested)
    assert json.loads((tmp_path / "metrics.json").read_text())["mlflow_run_id"] == run.info.run_id


def test_a_continued_run_logs_each_metric_once_per_step(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("e", artifact_location=str(tmp_path / "artifacts"))).info.run_id
    client.log_metric(run_id, "test_acc", 0.9, step=5)  # logged before the run was killed
    client.log_metric(run_id, "lr-AdamW", 0.01, step=3)
    logger = ContinuedRunLogger(experiment_name="e", tracking_uri=uri, run_id=run_id)
    logger.log_metrics({"test_acc": 0.9, "test_loss": 0.3}, step=5)  # the resumed run tests again
    logger.log_metrics({"lr-AdamW": 0.01}, step=3)  # the interrupted epoch starts again
    logger.log_metrics({"lr-AdamW": 0.005, "test_loss": 0.3}, step=4)
    keys = ("test_acc", "test_loss", "lr-AdamW")
    history = {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key)) for key in keys}
    assert history == {"test_acc": [(5, 0.9)], "test_loss": [(4, 0.3), (5, 0.3)], "lr-AdamW": [(3, 0.01), (4, 0.005)]}


def test_resume_without_a_checkpoint_says_there_is_none(compose_cfg, tiny_overrides: list[str], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"resume=true, but there is no checkpoint to resume at .*last\.ckpt"):
        train(compose_cfg(*tiny_overrides, "resume=true"))
    assert not (tmp_path / "mlflow.db").exists()  # refused before any MLflow run was made


def test_a_loss_that_becomes_nan_fails_the_run_naming_the_step_and_the_fix(compose_cfg, tiny_overrides: list[str], tmp_path: Path) -> None:
    cfg = compose_cfg(*tiny_overrides, "optimizer.lr=1e30")  # the first step sends the weights to ~1e30
    with pytest.raises(
        TrainingError, match=r"training loss became nan in epoch 0, step \d+ .*optimizer\.lr, now 1e\+30.*gradient_clip_val"
    ):
        train(cfg)
    assert not any((tmp_path / output).exists() for output in OUTPUTS)
    assert only_run(tmp_path).info.status == "FAILED"


@pytest.mark.slow
def test_two_runs_share_one_new_mlflow_store(tiny_overrides: list[str], tmp_path: Path) -> None:
    """Two processes start at once on a store that does not exist yet: both create it, the
    experiment and the registered model, and log all along; neither may fail on a locked database."""
    store = [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"tracking.artifact_location={tmp_path}/artifacts"]
    processes = {
        seed: start_training(
            *tiny_overrides, *isolated_outputs(tmp_path / f"seed{seed}"), *store, f"seed={seed}", out=tmp_path / f"seed{seed}"
        )
        for seed in (1, 2)
    }
    outputs = {seed: finish(process, tmp_path / f"seed{seed}") for seed, process in processes.items()}
    for seed, process in processes.items():
        assert process.returncode == 0, outputs[seed][-3000:]
        assert "database is locked" not in outputs[seed]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("rnnlab-sentiment").experiment_id])
    assert sorted((r.info.run_name, r.info.status) for r in runs) == [
        ("sentiment-gru-seed1", "FINISHED"),
        ("sentiment-gru-seed2", "FINISHED"),
    ]
    assert sorted(int(v.version) for v in client.search_model_versions("name='rnnlab-sentiment-gru'")) == [1, 2]


def test_multi_process_training_is_refused_in_a_multirun(tiny_overrides: list[str], tmp_path: Path) -> None:
    """Lightning starts DDP processes by re-running the command line: from -m, each would run the sweep."""
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=[*tiny_overrides, "trainer=ddp", "hydra.mode=MULTIRUN"], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    try:
        with pytest.raises(ConfigError, match=r"trainer.devices=2 with -m \(multirun\).*single runs \(no -m\)"):
            train(cfg)
    finally:
        HydraConfig.instance().cfg = None
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []  # refused before a run was made


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_tracks_one_run_logged_once(tiny_overrides: list[str], tmp_path: Path) -> None:
    process = start_training(*tiny_overrides, "trainer=ddp", "trainer.devices=2", "trainer.max_epochs=2", out=tmp_path)
    output = finish(process, tmp_path)
    assert process.returncode == 0, output[-3000:]
    assert "Starting with 2 processes" in output

    run = only_run(tmp_path)
    assert run.info.status == "FINISHED"
    assert run.data.params["trainer/devices"] == "2" and run.data.params["trainer/strategy/process_group_backend"] == "gloo"
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    for key in run.data.metrics.keys() - {"epoch"}:  # Lightning itself logs `epoch` with every call, on one device too
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert len(steps) == len(set(steps)), f"{key} logged twice at a step: {steps}"
    assert len(client.get_metric_history(run.info.run_id, "val_acc")) == 2  # once per epoch, not once per process
    assert [int(v.version) for v in client.search_model_versions("name='rnnlab-sentiment-gru'")] == [1]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and metrics["test_acc"] == pytest.approx(run.data.metrics["test_acc"])
    assert pd.read_csv(tmp_path / "history.csv")["epoch"].tolist() == [0, 1]


def test_the_slurm_launcher_sizes_jobs_from_the_trainer() -> None:
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.tasks_per_node, launcher.nodes) == (4, 2)  # one SLURM task per DDP process


def test_checkpoints_load_with_weights_only_and_no_string_is_evaluated() -> None:
    """torch.load and Lightning's checkpoint loading unpickle; weights_only=True admits only tensors and plain data."""
    unsafe = []
    for path in sorted(Path(rnnlab.__file__).parent.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            func, keywords = node.func, {k.arg: k.value for k in node.keywords}
            where = f"{path.name}:{node.lineno}"
            if isinstance(func, ast.Name) and func.id in ("eval", "exec"):
                unsafe.append(f"{where} calls {func.id}")
            loads = isinstance(func, ast.Attribute) and (
                (func.attr == "load" and isinstance(func.value, ast.Name) and func.value.id == "torch")
                or func.attr == "load_from_checkpoint"
                or "ckpt_path" in keywords
            )
            weights_only = keywords.get("weights_only")
            if loads and not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                unsafe.append(f"{where} loads a checkpoint without weights_only=True")
    assert unsafe == []
    (ui,) = [line for line in (project_root() / "Makefile").read_text().splitlines() if "mlflow ui" in line]
    assert "--host 127.0.0.1" in ui  # the UI is for this machine, not the network


def test_relative_paths_resolve_against_the_project_root(compose_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = compose_cfg(f"paths.root={tmp_path}/project", "paths.run_dir=runs/mine", "paths.metrics_file=out/m.json")
    monkeypatch.chdir(tmp_path)  # not the project root
    run_paths.resolve_paths(cfg)
    assert cfg.paths.run_dir == f"{tmp_path}/project/runs/mine" and cfg.paths.metrics_file == f"{tmp_path}/project/out/m.json"
    assert cfg.callbacks.checkpoint.dirpath == f"{tmp_path}/project/runs/mine/checkpoints"  # what reads run_dir follows


def test_a_run_folder_of_another_run_is_refused_and_kept(compose_cfg, tiny_overrides: list[str], tmp_path: Path) -> None:
    first = compose_cfg(*tiny_overrides, "model=gru", "seed=1")
    run_paths.claim_run_dir(first)
    (tmp_path / "run" / "checkpoints").mkdir()
    second = compose_cfg(*tiny_overrides, "model=lstm", "seed=1")
    with pytest.raises(ConfigError, match=r"belongs to run sentiment/gru/seed1, not sentiment/lstm/seed1"):
        train(second)
    assert (tmp_path / "run" / "checkpoints").is_dir()  # nothing of the other run's was cleared


def test_a_run_that_makes_no_optimizer_step_fails_and_records_nothing(compose_cfg, tiny_overrides: list[str], tmp_path: Path) -> None:
    # Whatever stops a fit before its first step (here a callback; the trainer settings that would are refused up front).
    cfg = compose_cfg(*tiny_overrides, "+callbacks.stop._target_=helpers.StopAtStart")
    with pytest.raises(TrainingError, match=r"the run made no optimizer step"):
        train(cfg)
    assert not (tmp_path / "metrics.json").exists() and not (tmp_path / "models").exists()
    client = MlflowClient(cfg.tracking.uri)
    experiment = client.get_experiment_by_name("rnnlab-sentiment")
    assert [run.info.status for run in client.search_runs([experiment.experiment_id])] == ["FAILED"]
    assert client.search_registered_models() == []


def test_a_batch_fraction_that_leaves_no_batch_is_one_clear_error(compose_cfg, tiny_overrides: list[str]) -> None:
    with pytest.raises(
        ConfigError, match=r"Lightning refused the trainer settings: You requested to check 0.0001 of the `train_dataloader`"
    ):
        train(compose_cfg(*tiny_overrides, "+trainer.limit_train_batches=0.0001"))


def test_outputs_that_cannot_be_written_publish_nothing_and_register_nothing(
    compose_cfg, tiny_overrides: list[str], tmp_path: Path
) -> None:
    cfg = compose_cfg(*tiny_overrides, "paths.history_file=/dev/null/history.csv")  # a folder that is a file
    with pytest.raises(ConfigError, match=r"cannot write the run's outputs .*/dev/null.*Nothing was published"):
        train(cfg)
    assert not (tmp_path / "metrics.json").exists() and not (tmp_path / "models").exists() and not (tmp_path / "plots").exists()
    client = MlflowClient(cfg.tracking.uri)
    assert client.search_model_versions("name='rnnlab-sentiment-gru'") == []
    experiment = client.get_experiment_by_name("rnnlab-sentiment")
    assert [run.info.status for run in client.search_runs([experiment.experiment_id])] == ["FAILED"]


def test_a_failure_while_moving_outputs_into_place_puts_back_the_earlier_ones(
    compose_cfg, tiny_overrides: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = compose_cfg(*tiny_overrides, "trainer.max_epochs=1")
    train(first)
    before = {name: file_hashes(tmp_path / name) for name in ("models", "plots")} | {"history": rnnlab.io.sha256(tmp_path / "history.csv")}
    move = os.replace

    failed: list[object] = []

    def full_at_the_metrics_file(src: object, dst: object) -> None:  # every other output is in place by then
        if Path(dst) == tmp_path / "metrics.json" and Path(src).name.endswith(".tmp") and not failed:
            failed.append(dst)
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        move(src, dst)

    monkeypatch.setattr(rnnlab.io.os, "replace", full_at_the_metrics_file)
    with pytest.raises(ConfigError, match=r"cannot write the run's outputs \(No space left on device: .*Nothing was published"):
        train(compose_cfg(*tiny_overrides, "trainer.max_epochs=2"))
    after = {name: file_hashes(tmp_path / name) for name in ("models", "plots")} | {"history": rnnlab.io.sha256(tmp_path / "history.csv")}
    assert after == before  # the first run's outputs, put back
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # nothing staged or set aside is left
    versions = MlflowClient(first.tracking.uri).search_model_versions("name='rnnlab-sentiment-gru'")
    assert [str(v.version) for v in versions] == ["1"]  # the failed run's version was removed


# Kernels of other CPUs, chosen on this one: ATen without its AVX code, MKL's reproducible-results path, oneDNN's SSE4.1
# code. Each rounds convolutions, FFTs or sums differently (the float32 data of 2026-12-06 changed under each).
# numpy's AVX-512 code (its float64 sin, say) is left out too: the augmentation's noise uses it.
OTHER_CPU_KERNELS = {
    "ATEN_CPU_CAPABILITY": "default",
    "MKL_CBWR": "COMPATIBLE",
    "ONEDNN_MAX_CPU_ISA": "SSE41",
    "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR",
}


# Speech's synthesis and features, and the windows cut from a series (whose statistical baselines, fitted by scipy's
# optimisers, are the baseline stage's: they differed in the last digits under these kernels when preprocess made them).
@pytest.mark.slow
@pytest.mark.parametrize(("task", "files"), [("speech", 100), ("forecast_electricity", 6)])
def test_another_cpu_s_kernels_give_the_same_bytes(tmp_path: Path, task: str, files: int) -> None:
    """The smoke profile's fetch and preprocess with this CPU's kernels and with those of another give the same files."""
    hashes = []
    for name, kernels in (("here", {}), ("other", OTHER_CPU_KERNELS)):
        env = {**os.environ, "RNNLAB_WARM": "0", **kernels}
        for stage in ("fetch", "preprocess"):
            overrides = [f"task={task}", "profile=smoke", f"paths.root={tmp_path / name}", f"hydra.run.dir={tmp_path / name}/hydra"]
            command = [sys.executable, "-m", f"rnnlab.{stage}", *overrides]
            finished = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
            assert finished.returncode == 0, finished.stderr[-3000:]
        hashes.append(file_hashes(tmp_path / name / "data"))
    assert len(hashes[0]) > files and hashes[0] == hashes[1]


@pytest.mark.parametrize(("task", "stages"), [("forecast", ("fetch", "preprocess")), ("sentiment", ("fetch",))])
def test_stage_outputs_are_the_same_bytes_in_another_folder(compose_cfg, tmp_path: Path, task: str, stages: tuple[str, ...]) -> None:
    """Outputs are a function of the inputs alone (no absolute path, host or time inside): a DVC remote can share them."""
    roots = [tmp_path / "one", tmp_path / "elsewhere" / "two"]
    for root in roots:
        cfg = compose_cfg(f"task={task}", "profile=smoke", f"paths.root={root}")
        for stage in stages:
            instantiate(cfg.task[stage])
    first, second = (file_hashes(root / "data") for root in roots)
    assert first and first == second
