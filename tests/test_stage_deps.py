"""Each pipeline stage depends on exactly the code and settings it runs (rnnlab.resolve, rnnlab.code_deps)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from functools import cached_property
from pathlib import Path
from unittest.mock import ANY

import pytest
import yaml
from helpers import isolated_outputs
from omegaconf import OmegaConf
from test_forecast import fetch_and_preprocess, make_series
from test_memory import make_data
from test_textgen import archive, textgen_root  # noqa: F401 (the textgen fixtures)

from rnnlab import code_deps, resolve
from rnnlab.config import project_root
from rnnlab.errors import ConfigError

PROJECT = project_root()


# --- the import graph ----------------------------------------------------------------------------------------


@pytest.fixture
def toy_src(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A src/ folder with a package `toy` whose modules import each other in every way Python allows."""
    files = {
        "toy/__init__.py": "",
        "toy/a.py": "import os\nfrom toy import b\nfrom . import c\n",
        "toy/b.py": "def f():\n    from toy.sub.d import thing  # imported only when f runs\n",
        "toy/c.py": "import toy.sub\n",
        "toy/sub/__init__.py": "",
        "toy/sub/d.py": "from ..b import f\nthing = 1\n",
        "toy/e.py": "from toy.sub.d import thing\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(code_deps, "SRC", tmp_path)
    code_deps.imports_of.cache_clear()
    yield tmp_path
    code_deps.imports_of.cache_clear()


def test_imports_are_read_from_every_kind_of_import_statement(toy_src: Path) -> None:
    assert code_deps.imports_of("toy.a") == {"toy", "toy.b", "toy.c"}  # os is not under src/
    assert code_deps.imports_of("toy.b") == {"toy", "toy.sub", "toy.sub.d"}  # inside a function counts
    assert code_deps.imports_of("toy.sub.d") == {"toy", "toy.b"}  # relative, two levels
    assert code_deps.imports_of("toy.e") == {"toy", "toy.sub", "toy.sub.d"}  # `thing` is an object, d the module


def test_closure_follows_imports_transitively_and_hashes_the_files(toy_src: Path) -> None:
    assert code_deps.closure(["toy.c"]) == {"toy", "toy.c", "toy.sub"}
    assert code_deps.closure(["toy.e"]) == {"toy", "toy.e", "toy.sub", "toy.sub.d", "toy.b"}
    hashes = code_deps.file_hashes(["toy.e", "toy.sub"])
    assert set(hashes) == {"toy/e.py", "toy/sub/__init__.py"}
    (toy_src / "toy/e.py").write_text("# changed\n")
    assert code_deps.file_hashes(["toy.e"])["toy/e.py"] != hashes["toy/e.py"]


def test_module_of_finds_the_module_behind_a_class_path() -> None:
    assert code_deps.module_of("rnnlab.models.cells.GRU") == "rnnlab.models.cells"
    assert code_deps.module_of("torch.nn.GRU") is None


# --- what each stage is declared to run ------------------------------------------------------------------------


# A smaller pipeline than params.yaml's (Hydra composes each stage in about 0.2 s), with every kind of stage.
PIPELINE = """
profile: default
seeds: [1]
tasks: [sentiment, forecast, forecast_stock, speech]
models: [gru, lstm]
single_seed_models: [gru_scratch]
tuned: [sentiment]
studied: [sentiment]
baseline_tasks: [sentiment, forecast, speech]
"""

# The tuned task's default models left out (params.yaml leaves out the tuned series' defaults).
TUNED_ONLY = "default_tasks: [forecast, forecast_stock, speech]"

# PIPELINE without the two series, for tests that resolve several pipelines (about half of PIPELINE's composes).
SMALL_PIPELINE = PIPELINE.replace("tasks: [sentiment, forecast, forecast_stock, speech]", "tasks: [sentiment, speech]").replace(
    "baseline_tasks: [sentiment, forecast, speech]", "baseline_tasks: [sentiment, speech]"
)
SMALL_TUNED_ONLY = "default_tasks: [speech]"


# The fixture's sentiment studies: model=gru's and model=lstm's defaults with another learning rate (not the project's
# conf/experiment/sentiment_*_tuned.yaml, which a study may rewrite).
TUNED_SENTIMENT = """# @package _global_
defaults:
- override /task: sentiment
- override /model: {model}
optimizer:
  lr: 0.001
model:
  name: {model}_tuned
"""

# A study journal's text as the fixture writes it: not a valid Optuna journal, which resolve never reads, only hashes.
JOURNAL = "a {model} study of {task}\n"


class Project:
    """A copy of this project's conf/ with `pipeline` as params.yaml (src/ is the installed one), resolved on demand."""

    def __init__(self, root: Path, pipeline: str = PIPELINE) -> None:
        self.root = root
        shutil.copytree(PROJECT / "conf", root / "conf")
        (root / "optuna").mkdir()
        self.write_params(pipeline)
        # Studies that found something other than the default.
        self.tuned = root / "conf/experiment/sentiment_gru_tuned.yaml"
        for model in ("gru", "lstm"):
            (root / f"conf/experiment/sentiment_{model}_tuned.yaml").write_text(TUNED_SENTIMENT.format(model=model))

    def write_params(self, pipeline: str) -> None:
        """`pipeline` as params.yaml, with a journal for each model of each studied task."""
        (self.root / "params.yaml").write_text(pipeline)
        params = yaml.safe_load(pipeline)
        for task in params.get("studied") or []:
            for model in params["models"]:
                (self.root / "optuna" / f"{task}_{model}.log").write_text(JOURNAL.format(task=task, model=model))

    @cached_property
    def first(self) -> dict[str, dict]:
        """The first resolve's files; tests of refused settings never need it."""
        return self.resolve()

    def resolve(self) -> dict[str, dict]:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("RNNLAB_ROOT", str(self.root))
            files = resolve.write_all(self.root)
        return {str(path.relative_to(self.root / resolve.OUT_DIR)): OmegaConf.to_container(OmegaConf.load(path)) for path in files}


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Project:
    return Project(tmp_path_factory.mktemp("project"))


def holding(files: dict[str, dict], source: str) -> set[str]:
    """The resolved files whose code (any *code section) names `source`."""
    return {name for name, values in files.items() if any(source in section for key, section in values.items() if key.endswith("code"))}


def test_a_task_s_data_code_is_a_dependency_of_that_task_s_stages_only(project: Project) -> None:
    files = project.first
    assert holding(files, "rnnlab/data/speech.py") == {name for name in files if name.startswith("speech/")} | {"compare.yaml"}
    forecast_tasks = ("forecast/", "forecast_stock/")
    assert holding(files, "rnnlab/data/forecast.py") == {name for name in files if name.startswith(forecast_tasks)} | {"compare.yaml"}
    assert holding(files, "rnnlab/data/sentiment.py") == {name for name in files if name.startswith("sentiment/")} | {"compare.yaml"}
    # Each baseline stage runs its task's baseline module only (the command imports none of them).
    assert {"sentiment/baselines.yaml", "forecast/baselines.yaml", "speech/baselines.yaml"} <= files.keys()
    assert holding(files, "rnnlab/baselines/forecast.py") == {"forecast/baselines.yaml"}
    assert holding(files, "rnnlab/baselines/sentiment.py") == {"sentiment/baselines.yaml"}


def test_rnnlab_s_own_cells_are_a_dependency_of_the_runs_that_use_them_only(project: Project) -> None:
    files = project.first
    scratch = {name for name in files if name.endswith("_scratch.yaml")}
    assert scratch, "params.yaml trains no rnnlab cell"
    assert holding(files, "rnnlab/models/cells.py") == scratch
    assert holding(files, "rnnlab/models/fused_scan.cpp") == scratch  # compiled, not imported: a companion source


def test_a_companion_source_is_hashed_with_its_module(toy_src: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (toy_src / "toy/loop.cpp").write_text("int f() { return 1; }\n")
    monkeypatch.setattr(code_deps, "COMPANION_SOURCES", {"toy.e": ("toy/loop.cpp",)})
    hashes = code_deps.file_hashes(["toy.e"])
    assert set(hashes) == {"toy/e.py", "toy/loop.cpp"}
    (toy_src / "toy/loop.cpp").write_text("int f() { return 2; }\n")
    assert code_deps.file_hashes(["toy.e"])["toy/loop.cpp"] != hashes["toy/loop.cpp"]
    assert set(code_deps.file_hashes(["toy.a"])) == {"toy/a.py"}


def test_the_study_report_depends_on_its_journals_metric_and_code_not_on_search_code(project: Project) -> None:
    report = project.first["studies/sentiment.yaml"]
    text = {model: JOURNAL.format(task="sentiment", model=model) for model in ("gru", "lstm")}
    journals = {f"optuna/sentiment_{model}.log": hashlib.sha256(text[model].encode()).hexdigest() for model in text}
    assert report | {"code": ANY} == {"journals": journals, "metric": "val_acc", "pipeline_trains_tuned": True, "code": ANY}
    code = set(report["code"])
    assert {"rnnlab/study_report.py", "rnnlab/trial.py"} <= code  # trial.py: how it reads the journals
    assert not code & {"rnnlab/search.py", "rnnlab/train.py", "rnnlab/training.py"}
    assert holding(project.first, "rnnlab/study_report.py") == {"studies/sentiment.yaml"}


def pipeline_stages() -> dict[str, dict]:
    """The stage definitions of every pipeline file: dvc.yaml and pipelines/*/dvc.yaml (YAML merge keys applied)."""
    files = [PROJECT / "dvc.yaml", *sorted(PROJECT.glob("pipelines/*/dvc.yaml"))]
    stages = [(name, stage) for path in files for name, stage in yaml.safe_load(path.read_text())["stages"].items()]
    assert len({name for name, _ in stages}) == len(stages), "a stage name used in two pipeline files"
    return dict(stages)


@pytest.mark.filterwarnings("ignore:_NoneStep.value:DeprecationWarning")  # DVC 3.67's own, once per stage and path step
def test_plain_dvc_repro_reaches_every_stage_of_every_pipeline_file_run_from_the_project_root() -> None:
    # The trainings live in pipelines/*/dvc.yaml (each a lock file of its own); `dvc repro` without targets runs the
    # stages of ./dvc.yaml and what they need, so each of theirs must feed a stage there (compare, memory_report).
    import networkx as nx
    from dvc.repo import Repo

    with Repo(str(PROJECT)) as repo:
        graph = repo.index.graph
        root = [stage for stage in graph if stage.dvcfile.relpath == "dvc.yaml"]
        reached = set(root).union(*(nx.descendants(graph, stage) for stage in root))
        files = {stage.dvcfile.relpath for stage in graph}
        assert files == {"dvc.yaml", "pipelines/train/dvc.yaml", "pipelines/tuned/dvc.yaml", "pipelines/lags/dvc.yaml"}
        assert {stage.addressing for stage in graph} - {stage.addressing for stage in reached} == set()
        assert {stage.wdir for stage in graph} == {str(PROJECT)}


def test_every_training_stage_lists_the_hparams_and_the_digest_of_its_config_and_code(project: Project) -> None:
    stages = pipeline_stages()
    trainings = {name: stage for name, stage in stages.items() if "rnnlab.train " in stage.get("cmd", "")}
    assert {"train", "train_more", "train_tuned", "train_tuned_more", "train_single_seed", "train_lag"} <= set(trainings)
    for name, stage in trainings.items():
        (resolved,) = stage["params"]
        assert list(resolved.values()) == [["hparams", "digest"]], name
    for name, values in project.first.items():
        if "hparams" in values:
            assert values["digest"] == {"config": resolve._digest(values["config"]), "code": resolve._digest(values["code"])}, name


def test_every_training_declares_the_shared_training_code(project: Project) -> None:
    trainings = {name: values for name, values in project.first.items() if "hparams" in values}
    assert len(trainings) == 4 * 3 + 2
    for name, values in trainings.items():
        assert {"rnnlab/train.py", "rnnlab/training.py", "rnnlab/models/encoder.py", "rnnlab/data/base.py"} <= set(values["code"]), name
        assert set(values["hparams"]) == set(resolve.HPARAMS), name
        assert "paths" not in values["config"] and "fetch" not in values["config"]["task"], name


def test_a_comment_changes_nothing_and_a_learning_rate_one_model(tmp_path: Path) -> None:
    project = Project(tmp_path, SMALL_PIPELINE)
    before = project.first
    with (tmp_path / "conf/task/speech.yaml").open("a") as f:
        f.write("# a comment changes no value\n")
    assert project.resolve() == before
    # Nor does the report's description of a test set: it is no part of any result.
    speech = tmp_path / "conf/task/speech.yaml"
    speech.write_text(speech.read_text().replace("the clips of the archive's testing list", "the archive's test clips"))
    assert project.resolve() == before

    # A baseline's setting stales its baseline stage only: no training's config digest holds task.baselines.
    speech.write_text(speech.read_text().replace("c_grid: [0.01, 0.1, 1.0, 10.0]", "c_grid: [0.1, 1.0]"))
    changed = project.resolve()
    assert {name for name in changed if changed[name] != before[name]} == {"speech/baselines.yaml"}
    before = changed

    project.tuned.write_text(project.tuned.read_text().replace("lr: 0.001", "lr: 0.003"))
    after = project.resolve()
    changed = {name for name in after if after[name] != before[name]}
    assert changed == {"sentiment/gru_tuned.yaml"}
    assert after["sentiment/gru_tuned.yaml"]["hparams"]["lr"] == 0.003
    # What the trainings list in pipelines/*/dvc.yaml: the digest follows the config (and the code), not the file's bytes.
    assert after["sentiment/gru_tuned.yaml"]["digest"]["config"] != before["sentiment/gru_tuned.yaml"]["digest"]["config"]
    assert after["sentiment/gru_tuned.yaml"]["digest"]["code"] == before["sentiment/gru_tuned.yaml"]["digest"]["code"]


def test_a_tuned_configuration_equal_to_a_default_that_default_tasks_trains_too_is_refused(tmp_path: Path) -> None:
    project = Project(tmp_path, SMALL_PIPELINE)
    assert project.first  # written before the refused change
    project.tuned.write_text(project.tuned.read_text().replace("lr: 0.001", "lr: 0.002"))  # the default's value
    message = (
        r"tuned in params.yaml lists sentiment, but .*sentiment_gru_tuned.yaml is model=gru's default .*default_tasks trains "
        r"that default too, so gru_tuned's runs would repeat gru's: drop sentiment from default_tasks .*or from `tuned`"
    )
    with pytest.raises(ConfigError, match=message):
        project.resolve()
    on_disk = OmegaConf.load(tmp_path / resolve.OUT_DIR / "sentiment/gru_tuned.yaml")
    assert on_disk.hparams.lr == 0.001  # nothing half-written: the earlier resolve stands


@pytest.mark.parametrize(
    ("tuned", "missing", "message"),
    [
        ("[textgen]", None, r"tuned in .*params.yaml must list tasks of `tasks` .*got \['textgen'\]"),
        ("{sentiment-gru: {task: sentiment, model: gru}}", None, r"tuned in .*params.yaml must list tasks of `tasks`"),
        (
            "[speech]",
            "speech_lstm",
            r"lists speech, but conf/experiment/speech_lstm_tuned.yaml does not exist: run its study "
            r"\(python -m rnnlab.train -m hparams_search=speech task=speech model=lstm\)",
        ),
        # The project's own speech studies (the GRU's best trial was its default configuration), speech a default task too.
        ("[speech]", None, r"lists speech, but conf/experiment/speech_gru_tuned.yaml is model=gru's default configuration"),
    ],
)
def test_tuned_names_tasks_whose_every_model_has_a_study(tmp_path: Path, tuned: str, missing: str | None, message: str) -> None:
    project = Project(tmp_path)
    if missing:
        (tmp_path / "conf" / "experiment" / f"{missing}_tuned.yaml").unlink()
    project.write_params(PIPELINE.replace("tuned: [sentiment]\nstudied: [sentiment]", f"tuned: {tuned}\nstudied: {tuned}"))
    with pytest.raises(ConfigError, match=message):
        project.resolve()


def test_studied_reports_every_tuned_task_and_only_tasks_whose_every_model_has_a_journal(tmp_path: Path) -> None:
    # sentiment's tuned cells only: the fewest composes (studied may name tasks the pipeline does not train).
    pipeline = SMALL_PIPELINE.replace("tasks: [sentiment, speech]", "tasks: [sentiment]") + "default_tasks: []\n"
    project = Project(tmp_path, pipeline)
    (tmp_path / "optuna" / "speech_gru.log").write_text("a speech study\n")
    (tmp_path / "params.yaml").write_text(pipeline.replace("studied: [sentiment]", "studied: [speech, sentiment]"))
    missing = (
        r"studied in params.yaml lists speech, whose journals optuna/speech_lstm.log do not exist: run each missing study, "
        r"e.g. python -m rnnlab.train -m hparams_search=speech task=speech model=lstm; or drop speech from studied"
    )
    with pytest.raises(ConfigError, match=missing):
        project.resolve()
    (tmp_path / "optuna" / "speech_lstm.log").write_text("another speech study\n")
    files = project.resolve()
    assert files["studies/speech.yaml"]["pipeline_trains_tuned"] is False and files["studies/sentiment.yaml"]["pipeline_trains_tuned"]
    assert files["studies/speech.yaml"]["metric"] == "val_acc" and set(files["studies/speech.yaml"]["journals"]) == {
        "optuna/speech_gru.log",
        "optuna/speech_lstm.log",
    }
    (tmp_path / "params.yaml").write_text(pipeline.replace("studied: [sentiment]", "studied: [speech]"))
    with pytest.raises(ConfigError, match=r"tuned in params.yaml lists sentiment, which studied lacks: add it to studied"):
        project.resolve()
    (tmp_path / "params.yaml").write_text(pipeline.replace("studied: [sentiment]", "studied: [sentiment, forcast]"))
    with pytest.raises(ConfigError, match=r"studied in params.yaml lists forcast, which conf/task/ does not hold: check the spelling"):
        project.resolve()
    for studied in ("speech", "[speech, speech]", "[null]"):
        (tmp_path / "params.yaml").write_text(pipeline.replace("studied: [sentiment]", f"studied: {studied}"))
        with pytest.raises(ConfigError, match=r"studied in .*params.yaml must be a list of distinct tasks whose every model has a study"):
            project.resolve()


@pytest.mark.parametrize(
    ("more", "message"),
    [
        (
            "more_seeds: [2]\nmore_seeds_tasks: [textgen]",
            r"more_seeds_tasks in .*params.yaml must list tasks of `default_tasks`, e.g. \[speech\]; got \['textgen'\]",
        ),
        (
            "more_seeds: [2]\nmore_seeds_tasks: [sentiment]\n" + TUNED_ONLY,
            r"more_seeds_tasks in .*params.yaml must list tasks of `default_tasks`, e.g. \[speech\]; got \['sentiment'\]",
        ),
        (
            "more_seeds: [2]\nmore_seeds_tuned: [speech]",
            r"more_seeds_tuned in .*params.yaml must list tasks of `tuned`, e.g. \[speech\]; got \['speech'\]",
        ),
        (
            "more_seeds: [2]\nmore_seeds_tasks: [speech]\nmore_seeds_tuned: [sentiment]",
            r"sentiment in .*params.yaml trains default and tuned models, but only one of more_seeds_tasks and more_seeds_tuned "
            r"lists it, .*list it in both, or in neither \(or set more_seeds: \[\]\)",
        ),
        (
            "more_seeds: [2]\nmore_seeds_tasks: [sentiment, speech]",
            r"sentiment in .*params.yaml trains default and tuned models, but only one of more_seeds_tasks and more_seeds_tuned",
        ),
    ],
)
def test_more_seeds_for_tasks_the_pipeline_does_not_train_or_for_one_kind_of_a_tasks_models_are_refused(
    tmp_path: Path, more: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        Project(tmp_path, PIPELINE + more).resolve()


def test_more_seeds_for_both_kinds_of_a_tasks_models_or_neither_or_none_at_all_resolve(tmp_path: Path) -> None:
    for more in (
        "more_seeds: [2]\nmore_seeds_tasks: [sentiment, speech]\nmore_seeds_tuned: [sentiment]",
        "more_seeds: [2]\nmore_seeds_tasks: [speech]",  # sentiment's default and tuned models: five seeds alike
        "more_seeds: []\nmore_seeds_tasks: [speech]\nmore_seeds_tuned: [sentiment]",
    ):
        files = Project(tmp_path / str(len(more)), SMALL_PIPELINE + more).resolve()
        assert {"sentiment/gru_tuned.yaml", "speech/gru.yaml"} <= set(files)
    # A tuned task without default models may have more seeds or not: no default models to pair with.
    for more_tuned in ("[sentiment]", "[]"):
        tuned_only = SMALL_PIPELINE + f"more_seeds: [2]\nmore_seeds_tasks: [speech]\nmore_seeds_tuned: {more_tuned}\n" + SMALL_TUNED_ONLY
        files = Project(tmp_path / f"tuned_only{len(more_tuned)}", tuned_only).resolve()
        assert "sentiment/gru_tuned.yaml" in files and "sentiment/gru.yaml" not in files


def test_default_tasks_choose_which_tasks_train_their_default_models(tmp_path: Path) -> None:
    every = Project(tmp_path / "every", SMALL_PIPELINE).resolve()  # no default_tasks: every task, as before it existed
    assert {"sentiment/gru.yaml", "sentiment/gru_scratch.yaml", "sentiment/gru_tuned.yaml", "speech/gru.yaml"} <= set(every)
    files = Project(tmp_path / "tuned_only", SMALL_PIPELINE + SMALL_TUNED_ONLY).resolve()
    assert set(every) - set(files) == {"sentiment/gru.yaml", "sentiment/lstm.yaml", "sentiment/gru_scratch.yaml"}
    assert files["sentiment/gru_tuned.yaml"] == every["sentiment/gru_tuned.yaml"]
    assert "sentiment/data.yaml" in files  # still fetched and preprocessed for its tuned models


@pytest.mark.parametrize(
    ("default_tasks", "message"),
    [
        ("[textgen]", r"default_tasks in .*params.yaml must list tasks of `tasks`, e.g. \[sentiment, speech\]; got \['textgen'\]"),
        (
            "[forecast, speech]",
            r"tasks in .*params.yaml lists forecast_stock, which neither default_tasks nor tuned lists, so no model would train on it: "
            r"add it to default_tasks \(or to tuned\), or drop it from tasks\.",
        ),
    ],
)
def test_default_tasks_outside_tasks_or_a_task_nothing_trains_on_are_refused(tmp_path: Path, default_tasks: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Project(tmp_path, PIPELINE + f"default_tasks: {default_tasks}").resolve()


def test_baseline_tasks_outside_tasks_or_without_a_baseline_are_refused(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"baseline_tasks in .*params.yaml must list tasks of `tasks`, e.g. \[sentiment\]; got \['textgen'\]"
    ):
        Project(tmp_path / "a", SMALL_PIPELINE.replace("baseline_tasks: [sentiment, speech]", "baseline_tasks: [textgen]")).resolve()
    project = Project(tmp_path / "b", SMALL_PIPELINE)
    speech = tmp_path / "b/conf/task/speech.yaml"
    speech.write_text(speech.read_text().replace("  _target_: rnnlab.baselines.speech.mel_statistics_logistic_regression\n", ""))
    with pytest.raises(ConfigError, match=r"baseline_tasks lists speech, whose config has no `baselines:` with a `_target_`"):
        project.resolve()


def test_a_tuned_configuration_equal_to_an_untrained_default_is_that_cell_s_tuned_entry_marked_for_the_report(tmp_path: Path) -> None:
    project = Project(tmp_path, SMALL_PIPELINE + SMALL_TUNED_ONLY)
    assert project.first["compare.yaml"]["tuned_as_default"] == {"sentiment/gru_tuned": None, "sentiment/lstm_tuned": None}
    project.tuned.write_text(project.tuned.read_text().replace("lr: 0.001", "lr: 0.002"))  # the default's value
    files = project.resolve()
    assert files["sentiment/gru_tuned.yaml"]["hparams"]["lr"] == 0.002
    # Listed among compare's params: the report's mark follows the fact, and DVC reruns the comparison when it changes.
    assert files["compare.yaml"]["tuned_as_default"] == {"sentiment/gru_tuned": "gru", "sentiment/lstm_tuned": None}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RNNLAB_ROOT", str(tmp_path))
        assert resolve.tuned_default("sentiment", "gru_tuned") == "gru"
        assert resolve.tuned_default("sentiment", "lstm_tuned") is None  # lr 0.001: not the default
        assert resolve.tuned_default("sentiment", "gru") is None  # not a tuned model
        assert resolve.tuned_default("forecast", "gru_tuned") is None  # a study that found other settings


def test_whether_a_tuned_model_equals_its_default_is_decided_on_the_default_profile(tmp_path: Path) -> None:
    # A study that chose another width only: the smoke profile's width of 16 makes both alike, yet the study found
    # something other than the default, so the smoke pipeline neither marks it nor refuses it beside its default.
    pipeline = SMALL_PIPELINE.replace("tasks: [sentiment, speech]", "tasks: [sentiment]").replace("profile: default", "profile: smoke")
    project = Project(tmp_path, pipeline)
    project.tuned.write_text(project.tuned.read_text().replace("lr: 0.001", "lr: 0.002") + "  encoder:\n    hidden_size: 64\n")
    files = project.resolve()
    tuned, default = (files[f"sentiment/{model}.yaml"]["config"] for model in ("gru_tuned", "gru"))
    assert {**tuned, "model": {**tuned["model"], "name": "gru"}} == default  # alike on smoke
    assert files["compare.yaml"]["tuned_as_default"]["sentiment/gru_tuned"] is None


def test_the_project_s_speech_gru_study_found_its_default() -> None:
    # The committed studies (conf/experiment/speech_*_tuned.yaml): the GRU's best trial is model=gru's default, the others' are not.
    assert [resolve.tuned_default("speech", f"{model}_tuned") for model in ("gru", "lstm", "rnn")] == ["gru", None, None]


MEMORY_PIPELINE = """
profile: default
seeds: [7, 8]
tasks: [memory_adding, memory_copy]
models: [gru, rnn]
single_seed_models: []
tuned: []
memory_tasks: [memory_adding, memory_copy]
memory_lags: [10, 40]
"""


def test_the_lag_sweep_resolves_a_training_per_task_model_and_lag_and_the_report(tmp_path: Path) -> None:
    files = Project(tmp_path, MEMORY_PIPELINE).first
    sweep = {name for name in files if "_lag" in name}
    assert sweep == {
        f"{task}/{model}_lag{lag}.yaml" for task in ("memory_adding", "memory_copy") for model in ("gru", "rnn") for lag in (10, 40)
    }
    run = files["memory_copy/rnn_lag40.yaml"]
    assert run["config"]["task"]["data"]["lag"] == 40 and run["config"]["model"]["name"] == "rnn_lag40"
    assert run["config"]["model"]["encoder"] == files["memory_copy/rnn.yaml"]["config"]["model"]["encoder"]  # only the lag differs
    assert "tracking" not in run["config"] and {"rnnlab/models/memory.py", "rnnlab/data/memory.py"} <= set(run["code"])
    report = files["memory_report.yaml"]
    assert report["report"] == {
        "tasks": ["memory_adding", "memory_copy"],
        "models": ["gru", "rnn"],
        "lags": [10, 40],
        "seed": None,
        "at_chance": 0.1,
    }
    assert report["tasks"]["memory_copy"] == {"primary_metric": "test_acc", "monitor_mode": "max", "fetch": ANY}
    assert report["tasks"]["memory_copy"]["fetch"]["alphabet"] == 8
    assert {"rnnlab/memory_report.py", "rnnlab/data/memory.py"} <= set(report["code"])
    assert holding(files, "rnnlab/memory_report.py") == {"memory_report.yaml"}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            ("memory_lags: [10, 40]", "memory_lags: [10, 30]"),
            r"memory_lags in params.yaml has 30, which conf/task/memory_adding.yaml does not ",
        ),
        (
            ("\ntasks: [memory_adding, memory_copy]", "\ntasks: [memory_adding]"),
            r"memory_tasks in params.yaml has memory_copy, which is not in `tasks`",
        ),
        (
            ("memory_tasks: [memory_adding, memory_copy]", "memory_tasks: [memory_adding, forecast]"),
            r"has forecast, which is not in `tasks`",
        ),
    ],
)
def test_a_lag_sweep_on_data_the_pipeline_does_not_make_is_refused(change: tuple[str, str], message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=message):
        Project(tmp_path, MEMORY_PIPELINE.replace(*change)).resolve()


def test_no_resolved_value_depends_on_the_machine(project: Project) -> None:
    text = json.dumps(project.first)
    assert str(project.root) not in text and str(PROJECT) not in text


# --- what a training really imports ----------------------------------------------------------------------------

RECORD_IMPORTS = textwrap.dedent(
    """
    import atexit, json, runpy, sys
    out = sys.argv.pop(1)
    def record():
        names = [m for m in sys.modules if m.split(".")[0] in ("rnnlab", "hydra_plugins")]
        names.append("rnnlab.train")  # runpy runs it as __main__
        with open(out, "w") as f:
            json.dump(sorted(names), f)
    atexit.register(record)
    sys.argv[0] = "rnnlab.train"
    runpy.run_module("rnnlab.train", run_name="__main__", alter_sys=True)
    """
)


def imported_by_training(overrides: list[str], out: Path) -> set[str]:
    """The source files (relative to src/) of the rnnlab modules a real `python -m rnnlab.train` loaded."""
    record = out / "imports.json"
    result = subprocess.run(
        [sys.executable, "-c", RECORD_IMPORTS, str(record), *overrides], capture_output=True, text=True, timeout=600, cwd=PROJECT
    )
    assert result.returncode == 0, result.stderr[-3000:]
    files = {code_deps.source_file(m) for m in json.loads(record.read_text())}
    return {f.relative_to(code_deps.SRC).as_posix() for f in files if f is not None}


@pytest.fixture
def task_data(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[str], list[str]]:
    """Overrides that point a training of `task` at tiny data that went through the real fetch and preprocess."""

    def _overrides(task: str) -> list[str]:
        if task == "sentiment":
            return [f"paths.root={request.getfixturevalue('sentiment_root')}"]
        if task == "speech":
            return [f"paths.processed={request.getfixturevalue('speech_dirs')[1]}"]
        if task == "textgen":  # its data went through fetch and preprocess with the fixture's own settings
            request.getfixturevalue("archive")
            return [f"paths.root={request.getfixturevalue('textgen_root')}", "task.module.sample_prompt='thou art'"]
        if task.startswith("memory_"):
            return [f"paths.processed={make_data(tmp_path / task, task.removeprefix('memory_'))}", "task.data.lag=9"]
        return [f"paths.processed={fetch_and_preprocess(tmp_path / 'forecast', make_series())}"]

    return _overrides


@pytest.mark.slow
@pytest.mark.parametrize(
    ("task", "model"),
    [
        ("sentiment", "gru"),
        ("sentiment", "gru_scratch"),
        ("textgen", "lstm"),
        ("forecast", "rnn"),
        ("speech", "gru"),
        ("memory_copy", "lstm"),
    ],
)
def test_a_training_imports_only_code_its_stage_declares(
    task: str, model: str, task_data: Callable[[str], list[str]], tmp_path: Path
) -> None:
    overrides = [
        f"task={task}",
        f"model={model}",
        "profile=smoke",
        "callbacks.progress_bar=null",
        *task_data(task),
        *isolated_outputs(tmp_path),
    ]
    imported = imported_by_training(overrides, tmp_path)
    declared = set(resolve.training_params(resolve.compose_run(overrides))["code"])
    assert {"rnnlab/train.py", "rnnlab/training.py"} <= imported
    assert imported <= declared, f"imported but not declared: {sorted(imported - declared)}"
    assert ("rnnlab/models/cells.py" in imported) == (model == "gru_scratch")
