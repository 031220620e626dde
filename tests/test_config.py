"""Every task x model x profile composes; bad choices fail with Hydra's list of options."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import run_main
from omegaconf import OmegaConf

from rnnlab.config import config_dir
from rnnlab.train import main as train_main

CONF = config_dir()
TASKS = sorted(p.stem for p in (CONF / "task").glob("*.yaml"))
MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
PROFILES = sorted(p.stem for p in (CONF / "profile").glob("*.yaml"))


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("task", TASKS)
def test_every_combination_composes(compose_cfg, task: str, model: str, profile: str) -> None:
    cfg = compose_cfg(f"task={task}", f"model={model}", f"profile={profile}")
    assert cfg.task.name == task
    assert cfg.model.name == model
    assert cfg.profile_name == profile
    # Interpolations resolve and paths are absolute, whatever the working directory.
    assert Path(cfg.paths.metrics_file).is_absolute()
    assert cfg.paths.metrics_file.endswith(f"metrics/{task}/{model}/seed42.json")
    assert cfg.tracking.uri.startswith("sqlite:////")


def test_smoke_profile_shrinks_the_run(compose_cfg) -> None:
    default, smoke = compose_cfg("profile=default"), compose_cfg("profile=smoke")
    assert smoke.trainer.max_epochs == 1 < default.trainer.max_epochs
    assert smoke.task.data.limit_train is not None and default.task.data.limit_train is None
    assert smoke.model.encoder.hidden_size < default.model.encoder.hidden_size


@pytest.mark.parametrize("experiment", ["forecast_rnn_tuned", "speech_lstm_tuned", "uncapped/textgen_lstm_tuned"])
def test_smoke_and_quick_profiles_shrink_a_tuned_cell_too(compose_cfg, experiment: str) -> None:
    """A saved configuration sets its own epochs and width; the smoke and quick budgets still bound them."""
    task = experiment.split("/")[-1].split("_")[0]
    default, quick, smoke = (compose_cfg(f"experiment={experiment}", f"profile={p}") for p in ("default", "quick", "smoke"))
    untuned_quick = compose_cfg(f"task={task}", "profile=quick")
    assert smoke.trainer.max_epochs == 1 and smoke.model.encoder.hidden_size == 16
    assert quick.trainer.max_epochs == untuned_quick.trainer.max_epochs
    # The default profile keeps what the study chose, over the task's own budget.
    saved = OmegaConf.load(CONF / "experiment" / f"{experiment}.yaml")
    assert default.trainer.max_epochs == saved.trainer.max_epochs
    assert default.model.encoder.hidden_size == saved.model.encoder.hidden_size


def test_a_task_budget_applies_on_every_profile_below_the_profile(compose_cfg) -> None:
    default, quick, smoke = (compose_cfg("task=speech", f"profile={p}") for p in ("default", "quick", "smoke"))
    assert (default.trainer.max_epochs, quick.trainer.max_epochs, smoke.trainer.max_epochs) == (20, 8, 1)
    assert default.callbacks.early_stopping.patience == quick.callbacks.early_stopping.patience == 4


@pytest.mark.parametrize(("task", "epochs"), [("memory_adding", 3), ("memory_copy", 4)])
def test_the_quick_profile_halves_a_memory_task_s_epochs_and_keeps_the_rest_of_its_budget(compose_cfg, task: str, epochs: int) -> None:
    cfg = compose_cfg(f"task={task}", "profile=quick")
    assert (cfg.trainer.max_epochs, cfg.model.encoder.hidden_size, cfg.optimizer.lr) == (epochs, 32, 0.01)
    assert cfg.callbacks.early_stopping is None


def test_no_task_tweak_of_the_default_profile_exists() -> None:
    # It would come after a saved configuration and override what a study chose: a task's own budget (epochs, patience)
    # belongs in conf/task_budget/<task>.yaml, which a saved configuration overrides.
    assert sorted(path.name for path in (CONF / "task_profile").glob("*_default.yaml")) == []


def test_command_line_overrides_beat_the_profile(compose_cfg) -> None:
    cfg = compose_cfg("profile=smoke", "model.encoder.hidden_size=33", "seed=7")
    assert cfg.model.encoder.hidden_size == 33
    assert cfg.seed == 7
    assert cfg.tracking.run_name == "sentiment-gru-seed7"


@pytest.mark.parametrize(("override", "group", "expected"), [("model=transformer", "model", "gru"), ("task=chess", "task", "sentiment")])
def test_unknown_choice_lists_available_options(
    override: str, group: str, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = run_main(train_main, override, run_dir=tmp_path / "hydra", capsys=capsys)
    assert result.returncode != 0
    assert f"Available options in '{group}'" in result.stderr
    assert expected in result.stderr
