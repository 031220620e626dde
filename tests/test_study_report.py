"""What the studies teach (rnnlab.study_report): per-cell trial summaries, fANOVA importances and the report files,
from study journals written here with known trials."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from rnnlab import study_report
from rnnlab.config import project_root
from rnnlab.errors import ConfigError
from rnnlab.resolve import study_command
from rnnlab.trial import open_storage

SPACE = {"optimizer.lr": FloatDistribution(1e-4, 1e-2, log=True), "model.encoder.num_layers": CategoricalDistribution([1, 2])}


def journal(root: Path, name: str, direction: str, trials: list[tuple[TrialState, list[float]]]) -> optuna.Study:
    """A study in root/optuna/<name>.log holding `trials`: each a state and the values it reported epoch by epoch."""
    study = optuna.create_study(study_name=name, storage=open_storage(str(root / "optuna" / f"{name}.log")), direction=direction)
    rng = np.random.default_rng(len(trials))
    for state, reported in trials:
        params = {"optimizer.lr": float(10 ** rng.uniform(-4, -2)), "model.encoder.num_layers": int(rng.integers(1, 3))}
        value = (min(reported) if direction == "minimize" else max(reported)) if state == TrialState.COMPLETE else None
        study.add_trial(
            create_trial(state=state, params=params, distributions=SPACE, value=value, intermediate_values=dict(enumerate(reported)))
        )
    return study


COMPLETE, PRUNED, FAIL = TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL


def test_a_cell_s_summary_counts_pruned_trials_with_the_best_value_they_reached(tmp_path: Path) -> None:
    trials = [(COMPLETE, [1.4, 1.2]), (COMPLETE, [1.3, 1.1]), (PRUNED, [1.6]), (PRUNED, [1.5, 1.45]), (FAIL, [])]
    summary = study_report.cell_summary(journal(tmp_path, "forecast_gru", "minimize", trials))
    assert summary["trials"] == {"complete": 2, "pruned": 2, "fail": 1}
    values = [1.2, 1.1, 1.6, 1.45]  # each trial's best reported value; the failed trial reported none
    assert summary["values"] == values
    assert summary["best"] == 1.1
    assert summary["median"] == pytest.approx(1.325)
    assert summary["top_decile"] == pytest.approx(np.quantile(values, 0.1))  # lower is better: 10% reach this or less


def test_for_a_maximised_metric_the_top_decile_is_the_upper_one(tmp_path: Path) -> None:
    trials = [(COMPLETE, [0.5, v]) for v in (0.6, 0.7, 0.8, 0.9)] + [(PRUNED, [0.2])]
    summary = study_report.cell_summary(journal(tmp_path, "speech_rnn", "maximize", trials))
    assert summary["best"] == 0.9
    assert summary["top_decile"] == pytest.approx(np.quantile([0.6, 0.7, 0.8, 0.9, 0.5], 0.9))
    assert summary["top_decile"] > summary["median"]


def test_importances_are_seeded_and_need_two_complete_trials(tmp_path: Path) -> None:
    one = journal(tmp_path, "a_gru", "minimize", [(COMPLETE, [1.0]), (PRUNED, [2.0])])
    assert study_report.importances(one) is None
    many = journal(tmp_path, "b_gru", "minimize", [(COMPLETE, [1.0 + i / 10]) for i in range(8)])
    first, again = study_report.importances(many), study_report.importances(many)
    assert first == again  # the same journal, the same numbers: the report is reproducible
    assert set(first) == set(SPACE) and sum(first.values()) == pytest.approx(1.0, abs=1e-3)


def test_the_task_report_puts_every_cell_side_by_side(tmp_path: Path) -> None:
    journal(tmp_path, "forecast_gru", "minimize", [(COMPLETE, [1.0 + i / 20]) for i in range(6)])
    journal(tmp_path, "forecast_rnn", "minimize", [(COMPLETE, [1.2 + i / 20]) for i in range(3)] + [(PRUNED, [2.0])])
    markdown = study_report.write(tmp_path, "forecast", ["gru", "lstm", "rnn"], pipeline_trains_tuned=True)
    text = markdown.read_text()
    assert "# What the studies teach: forecast (val_mase)" in text and "the `*_tuned` rows of [comparison.md]" in text
    assert "| gru | 6 | 0 | 0 | 1.0000 |" in text and "| rnn | 3 | 1 | 0 | 1.2000 |" in text
    assert "lstm" not in text.split("| hyperparameter |")[0]  # a cell without a study is left out, not invented
    assert "| hyperparameter | gru | rnn |" in text and "| `optimizer.lr` |" in text
    assert (tmp_path / "reports/studies/forecast_trials.png").read_bytes().startswith(b"\x89PNG")
    assert (tmp_path / "reports/studies/forecast.json").is_file()
    before = {p.name: p.read_bytes() for p in (tmp_path / "reports/studies").iterdir() if p.suffix != ".png"}
    study_report.write(tmp_path, "forecast", ["gru", "lstm", "rnn"], pipeline_trains_tuned=True)
    assert before == {p.name: p.read_bytes() for p in (tmp_path / "reports/studies").iterdir() if p.suffix != ".png"}


def test_the_study_command_names_the_search_config_of_the_task_s_family() -> None:
    assert study_command("forecast_stock", "lstm") == "python -m rnnlab.train -m hparams_search=forecast task=forecast_stock model=lstm"
    assert study_command("textgen", "rnn") == "python -m rnnlab.train -m hparams_search=textgen task=textgen model=rnn"
    assert "hparams_search=<a config of conf/hparams_search/>" in study_command("memory_copy", "gru")  # no search of its own


def test_a_task_without_studies_is_refused_with_the_command_to_run(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError,
        match=r"none of the study journals optuna/speech_gru.log, optuna/speech_rnn.log exists: run a study first, e.g. "
        r"python -m rnnlab.train -m hparams_search=speech task=speech model=gru\.",
    ):
        study_report.write(tmp_path, "speech", ["gru", "rnn"], pipeline_trains_tuned=True)
    assert not (tmp_path / "reports").exists()


PARAMS = "profile: default\ntasks: [forecast]\nmodels: [gru]\nsingle_seed_models: []\n"


def test_without_tasks_the_report_covers_the_tasks_of_studied_and_says_where_tuned_cells_are_tested(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copytree(project_root() / "conf", tmp_path / "conf")
    monkeypatch.setenv("RNNLAB_ROOT", str(tmp_path))
    journal(tmp_path, "textgen_gru", "minimize", [(COMPLETE, [1.7, 1.6]), (COMPLETE, [1.5])])
    journal(tmp_path, "forecast_gru", "minimize", [(COMPLETE, [0.8])])
    journal(tmp_path, "speech_gru", "maximize", [(COMPLETE, [0.9])])  # a study of a task `studied` leaves out
    (tmp_path / "params.yaml").write_text(PARAMS + "tuned: [forecast]\nstudied: [forecast, textgen]\n")
    study_report.main([])
    assert capsys.readouterr().out == "forecast: reports/studies/forecast.md\ntextgen: reports/studies/textgen.md\n"
    studies = tmp_path / "reports" / "studies"
    assert "the `*_tuned` rows of [comparison.md]" in (studies / "forecast.md").read_text()
    textgen = (studies / "textgen.md").read_text()
    assert (
        "| gru | 2 | 0 | 0 | 1.5000 |" in textgen
        and "textgen is not in `tuned` of params.yaml" in textgen
        and "`*_tuned` rows" not in textgen
    )
    assert not (studies / "speech.md").exists()
    for studied, message in [
        ("[]", "no task to report: `studied` in params.yaml is empty; name tasks with --tasks"),
        ("speech", "studied in .*params.yaml must be a list of distinct tasks"),
    ]:
        (tmp_path / "params.yaml").write_text(PARAMS + f"tuned: []\nstudied: {studied}\n")
        with pytest.raises(SystemExit) as exit_info:
            study_report.main([])
        assert exit_info.value.code == 2
        assert re.search(message, capsys.readouterr().err)
