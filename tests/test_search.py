"""Hyperparameter search: the search-space parser, and whole studies run through
`python -m rnnlab.train -m hparams_search=...` on tiny data (best config, pruning,
resume after a kill, two workers, bad input)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from conftest import TINY
from helpers import Finished, run_main
from hydra import compose, initialize_config_dir
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from rnnlab.config import config_dir
from rnnlab.errors import ConfigError
from rnnlab.search import PARENT_RUN_ATTR, WORKER_ATTR, parse_search_space, shared_tag
from rnnlab.train import main as train_main
from rnnlab.trial import RUN_ID_ATTR, open_storage, trial_id

# ---------------------------------------------------------------------------- the search space


@pytest.fixture(scope="module")
def base_cfg(compose_cfg: Callable[..., DictConfig]) -> DictConfig:
    return compose_cfg("hparams_search=sentiment")


def test_search_space_maps_sweep_syntax_to_optuna_distributions(base_cfg: DictConfig) -> None:
    space = parse_search_space(
        {
            "optimizer.lr": "tag(log, interval(1e-4, 1e-2))",
            "model.encoder.dropout": "interval(0.0, 0.5)",
            "model.encoder.num_layers": "range(1, 4)",
            "model.encoder.hidden_size": "int(interval(8, 64))",
            "model.encoder.bidirectional": "choice(false, true)",
            "+model.encoder.extra": "choice(a, b)",
        },
        base_cfg,
    )
    by_name = {param.name: param for param in space.params}
    assert by_name["optimizer.lr"].distribution == FloatDistribution(1e-4, 1e-2, log=True)
    assert by_name["model.encoder.dropout"].distribution == FloatDistribution(0.0, 0.5)
    assert by_name["model.encoder.num_layers"].distribution == IntDistribution(1, 4)  # the stop is included
    assert by_name["model.encoder.hidden_size"].distribution == IntDistribution(8, 64)
    assert by_name["model.encoder.bidirectional"].distribution == CategoricalDistribution([False, True])
    assert by_name["model.encoder.bidirectional"].override(True) == "model.encoder.bidirectional=true"
    assert by_name["model.encoder.extra"].override("a") == "+model.encoder.extra=a"


TASK_SEARCHES = ("sentiment", "textgen", "forecast", "speech")
STUDY_SPACE = {
    "optimizer.lr",
    "optimizer.weight_decay",
    "model.encoder.hidden_size",
    "model.encoder.num_layers",
    "model.encoder.dropout",
    "model.encoder.bidirectional",
    "trainer.gradient_clip_val",
    "trainer.max_epochs",
    "task.data.batch_size",
}
SHAPE_KEYS = {"model.encoder.hidden_size", "model.encoder.num_layers", "model.encoder.bidirectional"}


@pytest.mark.parametrize("task", TASK_SEARCHES)
def test_every_cell_of_a_task_gets_the_same_study(task: str) -> None:
    """Issue #12's fair fight: one search config per task, the cell from the command line; the same space, trial count
    and pruner for gru, lstm and rnn, a study of its own per cell, and Hyperband's brackets fixed by the largest budget."""
    studies = {}
    for model in ("gru", "lstm", "rnn"):
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = compose(config_name="config", overrides=[f"hparams_search={task}", f"model={model}"], return_hydra_config=True)
        assert (cfg.task.name, cfg.model.name, cfg.search.study) == (task, model, f"{task}_{model}")
        assert cfg.search.direction == {"max": "maximize", "min": "minimize"}[cfg.task.monitor_mode]
        space = {p.name: p.distribution for p in parse_search_space(cfg.hydra.sweeper.params, cfg).params}
        # A language model cannot read both ways (language_model.py refuses it): textgen's space leaves direction out.
        # Sentiment searches whole encoder shapes of similar cost (conf/encoder_shape/) in place of width, depth and direction.
        shapes = "encoder_shape" in space
        expected = STUDY_SPACE - (SHAPE_KEYS if shapes else set()) - ({"model.encoder.bidirectional"} if task == "textgen" else set())
        assert set(space) >= expected
        assert task != "textgen" or "model.encoder.bidirectional" not in space
        if shapes:
            assert not SHAPE_KEYS & set(space)  # a shape's width is not searched a second time
        else:
            assert space["model.encoder.num_layers"] == IntDistribution(1, 2)  # 1 or 2 layers: the stop is included
        pruner = OmegaConf.to_container(cfg.search.pruner, resolve=True)
        assert pruner["_target_"] == "optuna.pruners.HyperbandPruner"
        assert pruner["max_resource"] == max(space["trainer.max_epochs"].choices)
        # The search's settings as hydra-optuna-sweeper names them, from search.*; rnnlab's resume and sharing.
        sweeper = cfg.hydra.sweeper
        assert (sweeper.study_name, sweeper.direction, sweeper.storage) == (cfg.search.study, cfg.search.direction, cfg.search.storage)
        assert (sweeper.n_jobs, sweeper.max_failure_rate, sweeper.total_trials) == (1, 1.0, sweeper.n_trials)
        assert sweeper.sampler._target_ == "optuna.samplers.TPESampler" and sweeper.sampler.seed == 42
        assert sweeper.n_trials >= (12 if task in ("sentiment", "textgen") else 30)
        studies[model] = (space, pruner, sweeper.n_trials)
    assert studies["gru"] == studies["lstm"] == studies["rnn"]


def test_the_forecast_study_searches_any_series() -> None:
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["hparams_search=forecast", "task=forecast_electricity", "model=rnn"])
    assert (cfg.task.name, cfg.search.study) == ("forecast_electricity", "forecast_electricity_rnn")
    assert cfg.search.experiment_file.endswith("conf/experiment/forecast_electricity_rnn_tuned.yaml")


def test_a_null_entry_drops_a_key_from_the_space_it_extends(compose_cfg: Callable[..., DictConfig]) -> None:
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["hparams_search=sentiment"], return_hydra_config=True)
    searched = {p.name: p.distribution for p in parse_search_space(cfg.hydra.sweeper.params, cfg).params}
    assert not SHAPE_KEYS & set(searched)  # base's width, depth and direction, dropped for encoder_shape
    assert searched["encoder_shape"] == CategoricalDistribution(["1x128", "1x64", "2x64", "1x64_bidirectional"])
    assert searched["optimizer.lr"] == FloatDistribution(3e-4, 1e-2, log=True)  # inherited from base


# The default run each capped study must not exceed per run (conf/hparams_search/sentiment.yaml, textgen.yaml), and the
# shapes measured at 0.63-1.12x the default's 1x128 epoch (docs/search.md).
CAPPED_SHAPES = {"1x128", "1x64", "2x64", "1x64_bidirectional"}


@pytest.mark.parametrize("task", ["sentiment", "textgen"])
def test_a_capped_study_tries_nothing_costlier_than_the_default_run(task: str) -> None:
    """make run trains the tuned sentiment and textgen cells over five seeds in the time of their defaults: no epoch budget
    above the default's, no batch below it, no wider or deeper encoder, no shape outside the measured ones."""
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"hparams_search={task}"], return_hydra_config=True)
        default = compose(config_name="config", overrides=[f"task={task}"])
    space = {p.name: p.distribution for p in parse_search_space(cfg.hydra.sweeper.params, cfg).params}
    assert max(space["trainer.max_epochs"].choices) == default.trainer.max_epochs == cfg.search.max_epochs
    assert min(space["task.data.batch_size"].choices) == default.task.data.batch_size
    assert max(space["task.front_end.embedding_dim"].choices) == default.task.front_end.embedding_dim
    if task == "sentiment":
        assert set(space["encoder_shape"].choices) == CAPPED_SHAPES
    else:
        assert max(space["model.encoder.hidden_size"].choices) == default.model.encoder.hidden_size
        assert space["model.encoder.num_layers"].high == default.model.encoder.num_layers
        assert max(space["task.data.seq_len"].choices) == default.task.data.seq_len


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"optimizer.lr": "interval(0.1, 0.001)"}, "the low end 0.1 is not below the high end 0.001; write interval(0.001, 0.1)"),
        ({"optimizer.lr": "tag(log, interval(0.0, 0.1))"}, "a log-scaled interval needs a positive low end"),
        ({"model.encoder.hiden_size": "choice(8, 16)"}, "`model.encoder.hiden_size` is not a key of the config"),
        ({"model.encoder.num_layers": "range(3, 1)"}, "is empty: the start 3 is above the stop 1; write range(1, 3)"),
        ({"optimizer.lr": "interval(0.1"}, "is not valid sweep syntax"),
        ({}, "The search space is empty"),
    ],
)
def test_bad_search_space_entries_name_the_problem_and_the_fix(base_cfg: DictConfig, entry: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_search_space(entry, base_cfg)
    assert message in str(err.value)


def test_the_command_line_fixes_or_sweeps_keys_of_the_space(base_cfg: DictConfig) -> None:
    params = {"optimizer.lr": "tag(log, interval(1e-4, 1e-2))", "model.encoder.num_layers": "range(1, 2)"}
    space = parse_search_space(params, base_cfg, ["hparams_search=sentiment", "optimizer.lr=0.01", "model.encoder.dropout=0.1,0.3"])
    assert {p.name: p.distribution for p in space.params} == {
        "model.encoder.num_layers": IntDistribution(1, 2),
        "model.encoder.dropout": CategoricalDistribution([0.1, 0.3]),
    }
    assert space.fixed == ["hparams_search=sentiment", "optimizer.lr=0.01"]


# ---------------------------------------------------------------------------- whole studies


@pytest.fixture
def study_args(sentiment_root: Path, tmp_path: Path) -> Callable[..., list[str]]:
    """The arguments of `python -m rnnlab.train -m hparams_search=<name>` on the tiny data, with everything
    it writes (study, MLflow store, reports, best config) under tmp_path."""
    configs = tmp_path / "search_configs"
    configs.mkdir()  # on Hydra's search path even when empty (Hydra warns of a missing one)

    def args(
        name: str = "sentiment", *overrides: str, configs_to_add: dict[str, dict] | None = None, store: str = "mlflow.db"
    ) -> list[str]:
        for relative, content in (configs_to_add or {}).items():  # the test's own configs, next to the shipped ones
            path = configs / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            package = "# @package _global_\n" if relative.startswith("hparams_search/") else ""
            path.write_text(package + yaml.safe_dump(content))
        return [
            "-m",
            f"hparams_search={name}",
            f"hydra.searchpath=[file://{configs}]",
            *TINY,
            f"paths.root={tmp_path}",
            f"paths.processed={sentiment_root}/data/processed/sentiment",
            f"tracking.uri=sqlite:///{tmp_path}/{store}",
            "trainer.max_epochs=2",
            *overrides,
        ]

    return args


@pytest.fixture
def study(study_args: Callable[..., list[str]]) -> Callable[..., subprocess.Popen]:
    """Start a study in a process of its own: for tests that kill it or run two at once."""

    def start(*args: str, configs_to_add: dict[str, dict] | None = None) -> subprocess.Popen:
        command = [sys.executable, "-m", "rnnlab.train", *study_args(*args, configs_to_add=configs_to_add)]
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)

    return start


@pytest.fixture
def run_study(study_args: Callable[..., list[str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Callable[..., Finished]:
    """Run a study to its end in this process, from the command line's parsing on (no ~7 s of imports)."""

    def run(*args: str, configs_to_add: dict[str, dict] | None = None, store: str = "mlflow.db") -> Finished:
        command = study_args(*args, configs_to_add=configs_to_add, store=store)
        return run_main(train_main, *command, run_dir=tmp_path / "hydra", capsys=capsys)

    return run


def finish(process: subprocess.Popen, timeout: float = 600) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-3000:]
    return output


def load(root: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=open_storage(str(root / "optuna" / f"{name}.log")))


def load_trials(root: Path, name: str) -> list[optuna.trial.FrozenTrial]:
    """A study's trials; none while its worker has not created it yet."""
    try:
        return load(root, name).trials
    except KeyError:
        return []


def runs(root: Path, store: str = "mlflow.db") -> list:
    client = MlflowClient(f"sqlite:///{root}/{store}")
    return client.search_runs([client.get_experiment_by_name("rnnlab-sentiment").experiment_id])


def test_a_study_runs_its_trials_tracks_them_and_writes_the_best_config(run_study: Callable[..., Finished], tmp_path: Path) -> None:
    result = run_study("sentiment", "hydra.sweeper.n_trials=4")
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stderr
    trials = load(tmp_path, "sentiment_gru").trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    best = max(trials, key=lambda t: t.value)
    assert "hyperparameter search sentiment_gru" in output
    # The first trial runs the config's own values where the space holds them.
    defaults = {"optimizer.lr": 2e-3, "optimizer.weight_decay": 0.01, "model.encoder.dropout": 0.0}
    defaults |= {"scheduler": "cosine", "encoder_shape": "1x128"}  # config groups' composed options
    assert {key: trials[0].params[key] for key in defaults} == defaults
    # As in hydra-optuna-sweeper, a key the command line fixes (TINY's sizes) is not searched.
    for trial in trials:
        assert not {"model.encoder.hidden_size", "task.front_end.embedding_dim", "task.data.batch_size"} & set(trial.params)

    # MLflow: a parent run holding the best value and the report, one nested child run per trial.
    by_name = {run.info.run_name: run for run in runs(tmp_path)}
    parent = by_name.pop("sentiment_gru-study")
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["best_val_acc"] == pytest.approx(best.value)
    assert parent.data.tags["best_trial"] == str(best.number)
    assert sorted(by_name) == [f"sentiment_gru-trial-{n}" for n in range(4)]
    for trial in trials:
        child = by_name[f"sentiment_gru-trial-{trial.number}"]
        assert child.info.run_id == trial.user_attrs[RUN_ID_ATTR]
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.tags["optuna.trial"] == str(trial.number)
        assert child.data.tags["optuna.state"] == "COMPLETE"
        assert float(child.data.params["optimizer/lr"]) == pytest.approx(trial.params["optimizer.lr"])
        assert "test_acc" not in child.data.metrics  # trials never look at the test set
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    logged = {artifact.path for artifact in client.list_artifacts(parent.info.run_id)}
    expected = {"trials.csv", "best.json", "importances.json", "optimization_history.png", "param_importances.png"}
    assert expected <= logged
    assert expected <= {p.name for p in (tmp_path / "reports" / "search" / "sentiment_gru").iterdir()}

    # The best trial's values, as an experiment config that composes into a training run.
    written = tmp_path / "conf" / "experiment" / "sentiment_gru_tuned.yaml"
    assert f"trial {best.number}" in written.read_text()
    # Composed under a name of its own: the project's conf/ would shadow the test's sentiment_gru_tuned.
    written.rename(written.with_name("test_tuned.yaml"))
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        tuned = compose(config_name="config", overrides=[f"hydra.searchpath=[file://{written.parents[1]}]", "experiment=test_tuned"])
    for key, value in best.params.items():
        if key not in ("scheduler", "encoder_shape"):  # config groups' options: the next test
            assert OmegaConf.select(tuned, key) == value
    assert (tuned.task.name, tuned.model.name) == ("sentiment", "gru_tuned")


@pytest.mark.parametrize(
    ("group", "options", "keys"),
    [
        ("scheduler", ("plateau", "none"), ["scheduler"]),
        # A group whose package is another node (model.encoder) and not a key of the config of its own.
        ("encoder_shape", ("2x64", "1x64_bidirectional"), sorted(SHAPE_KEYS)),
    ],
)
def test_a_searched_config_group_is_a_defaults_list_option_of_the_tuned_config(
    run_study: Callable[..., Finished], tmp_path: Path, group: str, options: tuple[str, str], keys: list[str]
) -> None:
    # The learning-rate schedule and the encoder's shape are config groups (conf/scheduler/, conf/encoder_shape/),
    # searched as any group is in Hydra: the tuned config must select the best trial's option in its defaults list, not
    # overwrite the node the group fills.
    result = run_study("sentiment", "hydra.sweeper.n_trials=2", f"{group}=choice({','.join(options)})")
    assert result.returncode == 0, result.stderr[-3000:]
    trials = load(tmp_path, "sentiment_gru").trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    best = max(trials, key=lambda t: t.value)
    assert best.params[group] in options  # the composed option (cosine, 1x128) lies outside this space
    written = tmp_path / "conf" / "experiment" / "sentiment_gru_tuned.yaml"
    assert {f"override /{group}": best.params[group]} in yaml.safe_load(written.read_text())["defaults"]
    written.rename(written.with_name("test_tuned.yaml"))
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        tuned = compose(config_name="config", overrides=[f"hydra.searchpath=[file://{written.parents[1]}]", "experiment=test_tuned"])
        chosen = compose(config_name="config", overrides=[f"{group}={best.params[group]}"])

    def values(cfg: DictConfig) -> dict[str, Any]:
        return {key: OmegaConf.to_object(value) if isinstance(value := OmegaConf.select(cfg, key), DictConfig) else value for key in keys}

    assert values(tuned) == values(chosen)
    assert tuned.model.name == "gru_tuned"


def test_a_two_objective_study_finds_the_front_of_validation_score_against_parameters(
    run_study: Callable[..., Finished], tmp_path: Path
) -> None:
    objectives = ("search.cost=n_params", "hydra.sweeper.direction=[maximize,minimize]", "hydra/sweeper/sampler=nsgaii")
    objectives += ("~hydra.sweeper.sampler.n_startup_trials",)  # TPE's setting in the search configs; NSGA-II has none
    result = run_study("sentiment", *objectives, "hydra.sweeper.n_trials=3", "search.study=pareto")
    assert result.returncode == 0, result.stderr[-3000:]
    study = load(tmp_path, "pareto")
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    for trial in study.trials:  # the best validation accuracy over its epochs, and the network's parameter count
        run_id = trial.user_attrs[RUN_ID_ATTR]
        best_val = max(m.value for m in client.get_metric_history(run_id, "val_acc"))
        assert trial.values == [pytest.approx(best_val), client.get_run(run_id).data.metrics["n_params"]]
        assert trial.intermediate_values == {}  # no per-epoch reports: Optuna prunes single-objective studies only
    report = tmp_path / "reports" / "search" / "pareto"
    front = yaml.safe_load((report / "pareto_front.json").read_text())
    assert {point["trial"] for point in front} == {t.number for t in study.best_trials}
    assert (report / "pareto_front.png").is_file() and not (report / "best.json").exists()
    assert not (tmp_path / "conf" / "experiment" / "sentiment_gru_tuned.yaml").exists()  # a front has no single best config


def test_a_pruner_stops_bad_trials_and_marks_them_pruned(run_study: Callable[..., Finished], tmp_path: Path) -> None:
    # Any validation accuracy is below 1.1: every trial is pruned at its first report.
    configs = {
        "hparams_search/pruned.yaml": {"defaults": ["sentiment"], "search": {"study": "pruned"}},
        "search/pruner/always.yaml": {"_target_": "optuna.pruners.ThresholdPruner", "lower": 1.1},
    }
    # This study lives in an RDB (SQLite here; PostgreSQL for workers on several machines), not a journal file.
    storage = f"sqlite:///{tmp_path}/optuna.db"
    overrides = ("search/pruner=always", f"search.storage={storage}", "hydra.sweeper.n_trials=2", "trainer.max_epochs=3")
    result = run_study("pruned", *overrides, configs_to_add=configs)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stderr
    trials = optuna.load_study(study_name="pruned", storage=storage).trials
    assert [t.state for t in trials] == [TrialState.PRUNED] * 2
    assert all(list(t.intermediate_values) == [0] for t in trials)  # stopped after the first of 3 epochs
    children = [run for run in runs(tmp_path) if run.info.run_name != "pruned-study"]
    assert len(children) == 2
    assert {(run.info.status, run.data.tags["optuna.state"]) for run in children} == {("KILLED", "PRUNED")}
    assert "trial 0: PRUNED" in output
    assert not (tmp_path / "conf" / "experiment" / "sentiment_gru_tuned.yaml").exists()  # nothing completed, nothing to recommend


def test_a_tag_that_another_worker_inserted_at_the_same_moment_is_set_again(tmp_path: Path) -> None:
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.create_run(client.create_experiment("race"))
    real, calls = client.set_tag, []

    def racing(run_id: str, key: str, value: str) -> None:  # the other worker's insert lands first, once
        calls.append(value)
        if len(calls) == 1:
            real(run_id, key, "the other worker's")
            raise MlflowException("(sqlite3.IntegrityError) UNIQUE constraint failed: tags.key, tags.run_uuid")
        real(run_id, key, value)

    client.set_tag = racing
    shared_tag(client, run.info.run_id, "best_trial", "3")
    assert calls == ["3", "3"] and client.get_run(run.info.run_id).data.tags["best_trial"] == "3"
    client.set_tag = lambda *args: (_ for _ in ()).throw(MlflowException("another error"))
    with pytest.raises(MlflowException, match="another error"):  # anything else is not retried
        shared_tag(client, run.info.run_id, "best_trial", "4")


def test_a_trial_whose_heartbeat_stopped_runs_again_with_its_parameters(
    run_study: Callable[..., Finished], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A worker on another machine took trial 0 of a study in an RDB storage, then died: its heartbeat stopped.
    monkeypatch.setattr("rnnlab.trial.HEARTBEAT_SECONDS", 1)
    storage = f"sqlite:///{tmp_path}/optuna.db"
    study = optuna.create_study(study_name="sentiment_gru", storage=open_storage(storage), direction="maximize")
    study.set_user_attr(PARENT_RUN_ATTR, "0" * 32)  # its MLflow parent run is in that worker's store, not here
    lr = FloatDistribution(3e-4, 1e-2, log=True)
    orphan = study.ask({"optimizer.lr": lr})
    orphan.set_user_attr(WORKER_ATTR, "another-host:1")  # not this machine's: no process id to check
    open_storage(storage).record_heartbeat(trial_id(open_storage(storage), "sentiment_gru", orphan.number))
    time.sleep(2.5)  # past the grace period, twice the heartbeat
    result = run_study("sentiment", f"search.storage={storage}", "hydra.sweeper.n_trials=1", "hydra.sweeper.total_trials=1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trial 0's heartbeat stopped (a dead worker); its parameters run again" in result.stderr
    trials = optuna.load_study(study_name="sentiment_gru", storage=storage).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]  # the retried trial counts, its stale copy not
    assert RetryHeartbeatStaleTrialCallback.retried_trial_number(trials[1]) == 0
    assert trials[1].params["optimizer.lr"] == trials[0].params["optimizer.lr"]


def test_a_study_resumes_where_its_mlflow_parent_run_is_not(run_study: Callable[..., Finished], tmp_path: Path) -> None:
    # A committed journal on a fresh clone: the study's trials are in optuna/, its MLflow runs in another store.
    assert run_study("sentiment", "hydra.sweeper.n_trials=2").returncode == 0
    first = load(tmp_path, "sentiment_gru")
    old_parent, first_completed = first.user_attrs["mlflow_parent_run_id"], [t.datetime_complete for t in first.trials]
    result = run_study("sentiment", "hydra.sweeper.n_trials=3", store="fresh.db")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"its MLflow parent run {old_parent} is not in" in result.stderr and "Traceback" not in result.stderr
    study = load(tmp_path, "sentiment_gru")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    assert [t.datetime_complete for t in study.trials[:2]] == first_completed  # not run again
    parent = next(run for run in runs(tmp_path, "fresh.db") if run.info.run_name == "sentiment_gru-study")
    assert study.user_attrs["mlflow_parent_run_id"] == parent.info.run_id != old_parent
    assert parent.data.tags["optuna.previous_parent_run"] == old_parent and parent.info.status == "FINISHED"
    children = [run for run in runs(tmp_path, "fresh.db") if run.info.run_name != "sentiment_gru-study"]
    assert [run.data.tags["mlflow.parentRunId"] for run in children] == [parent.info.run_id]  # the one trial run here


@pytest.mark.slow  # worker processes, started and killed: the point of the test
def test_a_killed_study_resumes_without_repeating_finished_trials(study: Callable[..., subprocess.Popen], tmp_path: Path) -> None:
    first = study("sentiment", "hydra.sweeper.n_trials=3")
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # kill it while trial 1 trains, after trial 0 finished
            trials = load_trials(tmp_path, "sentiment_gru")
            if [t.state for t in trials] == [TrialState.COMPLETE, TrialState.RUNNING] and RUN_ID_ATTR in trials[1].user_attrs:
                break
            assert first.poll() is None, first.communicate()[0][-3000:]
            time.sleep(0.2)
        else:
            pytest.fail("the study did not reach trial 1 in time")
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    finished = load(tmp_path, "sentiment_gru").trials[0]

    output = finish(study("sentiment", "hydra.sweeper.n_trials=3"))
    trials = load(tmp_path, "sentiment_gru").trials
    assert "trial 1 was cut short by a dead worker" in output
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert trials[0].datetime_complete == finished.datetime_complete  # trial 0 was not run again
    assert trials[1].user_attrs["interrupted"] is True
    assert trials[2].params == trials[1].params  # the interrupted parameters ran again
    killed = next(run for run in runs(tmp_path) if run.info.run_name == "sentiment_gru-trial-1")
    assert (killed.info.status, killed.data.tags["optuna.state"]) == ("KILLED", "INTERRUPTED")


@pytest.mark.slow  # worker processes, started and killed: the point of the test
def test_two_workers_share_one_study(study: Callable[..., subprocess.Popen], tmp_path: Path) -> None:
    workers = [study("sentiment", "hydra.sweeper.n_trials=4")]
    time.sleep(2)  # the second joins the study the first created
    workers.append(study("sentiment", "hydra.sweeper.n_trials=4"))
    for worker in workers:
        finish(worker)
    trials = load(tmp_path, "sentiment_gru").trials
    # Each worker stops once the study holds n_trials; at the same instant both may start one more.
    assert 4 <= len(trials) <= 5
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert {t.user_attrs["worker"] for t in trials} == {f"{os.uname().nodename}:{w.pid}" for w in workers}
    assert len({tuple(sorted(t.params.items())) for t in trials}) == len(trials)
    parents = [run for run in runs(tmp_path) if run.info.run_name == "sentiment_gru-study"]
    assert len(parents) == 1


def test_a_bad_search_space_fails_before_any_trial_runs(run_study: Callable[..., Finished], tmp_path: Path) -> None:
    config = {
        "defaults": ["sentiment"],
        "search": {"study": "bad"},
        "hydra": {"sweeper": {"params": {"optimizer.lr": "interval(0.1, 0.001)"}}},
    }
    result = run_study("bad", configs_to_add={"hparams_search/bad.yaml": config})
    output = result.stderr
    assert result.returncode == 2
    assert "rnnlab: error: search space entry `optimizer.lr: interval(0.1, 0.001)`: the low end 0.1 is not below" in output
    assert "Traceback" not in output
    assert not (tmp_path / "optuna").exists()  # no study, no trial
    assert not (tmp_path / "logs" / "optuna").exists()


def compose_bench(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="search_bench", overrides=list(overrides))


@pytest.mark.slow  # runs the benchmark with one and two worker processes
def test_search_bench_measures_trials_per_hour_for_each_worker_count(sentiment_root: Path, tmp_path: Path) -> None:
    from rnnlab.search_bench import run

    overrides = [*TINY, f"paths.processed={sentiment_root}/data/processed/sentiment", "trainer.max_epochs=1"]
    quoted = ",".join(f"'{o}'" for o in overrides)
    report = run(compose_bench(f"output={tmp_path}/bench.json", "workers=[1,2]", "n_trials=2", f"overrides=[{quoted}]"))
    one, two = report["rows"]
    assert (one["workers"], one["trials"], one["complete"]) == (1, 2, 2)
    # Each worker stops once the study holds n_trials; at the same instant both may start one more.
    assert two["workers"] == 2 and 2 <= two["trials"] <= 3 and two["complete"] == two["trials"]
    cores = os.cpu_count() or 1
    assert (one["threads_per_worker"], two["threads_per_worker"]) == (cores, max(1, cores // 2))
    for row in report["rows"]:
        assert row["trials_per_hour"] == pytest.approx(row["trials"] / row["seconds"] * 3600, rel=0.01)
    assert yaml.safe_load((tmp_path / "bench.json").read_text())["rows"] == report["rows"]
    root = config_dir().parent  # the benchmark's studies live in a temporary directory, not the project's
    assert not list((root / "optuna").glob("bench-*")) and not list((root / "reports" / "search").glob("bench-*"))


def test_search_bench_refuses_bad_settings() -> None:
    from rnnlab.search_bench import run

    with pytest.raises(ConfigError, match=r"workers must be a list of positive integers such as \[1, 2\], got \[0\]"):
        run(compose_bench("workers=[0]"))
    with pytest.raises(ConfigError, match="search_config=nope is not a config of conf/hparams_search/"):
        run(compose_bench("search_config=nope"))
