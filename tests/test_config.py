"""Every task x model x profile composes; bad choices fail with Hydra's list of options."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import run_main

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
