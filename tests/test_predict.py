"""rnnlab-predict end to end on the tiny champions of test_serving: predictions, summary, and bad input
answered with a one-line message and exit code 2."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

# Session fixtures: tiny trained runs whose serving pyfunc is the champion (built once, shared with test_serving).
from test_serving import Champion, sentiment_champion, textgen_champion  # noqa: F401

from rnnlab.config import project_root
from rnnlab.errors import DataError
from rnnlab.models.language_model import generate
from rnnlab.predict import conform_to_signature, main, project_tracking_uri
from rnnlab.predictors.sentiment import ReviewPredictor


def run_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """main(argv): its exit code (0 when it returns) and what it printed to stdout and stderr."""
    try:
        main(list(argv))
        code = 0
    except SystemExit as exit:
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


def test_predict_prints_the_sentiment_champions_probability_and_a_summary(sentiment_champion: Champion, capsys) -> None:  # noqa: F811
    text = "great wonderful superb film"
    code, out, err = run_main(capsys, "sentiment", text, "--tracking-uri", sentiment_champion.uri)
    assert code == 0, err
    mlflow.set_tracking_uri(sentiment_champion.uri)
    expected = mlflow.pyfunc.load_model(sentiment_champion.model_uri).predict(pd.DataFrame({"text": [text]}))
    label, probability = expected["label"][0], expected["probability"][0]
    assert out == f"{label:<8}  P(positive) = {probability:.3f}  {text!r}\n"
    assert "rnnlab-sentiment-gru v2" in err and sentiment_champion.run_id in err and re.search(r"predictions\s*│\s*1\s", err)


def test_predict_continues_a_prompt_with_the_sampling_options(textgen_champion: Champion, capsys) -> None:  # noqa: F811
    code, out, err = run_main(capsys, "textgen", "ROMEO:", "--length", "25", "--seed", "4", "--tracking-uri", textgen_champion.uri)
    assert code == 0, err
    net = mlflow.pytorch.load_model(f"runs:/{textgen_champion.run_id}/model")
    assert out == "ROMEO:" + generate(net, "ROMEO:", 25, 0.8, seed=4) + "\n"
    assert "length=25, temperature=0.8, seed=4" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["sentiment", "   "], r"row 0 of column 'text' is only whitespace; give a review text"),
        (["sentiment", ""], r"row 0 of column 'text' is empty"),
        (
            ["sentiment", "fine", "--alias", "best"],
            r"alias best not found.*has versions 1, 2 and aliases @champion -> v2.*python -m rnnlab.compare",
        ),
        (
            ["sentiment", "fine", "--model", "lstm"],
            r"rnnlab-sentiment-lstm is not registered \(registered models of this task: rnnlab-sentiment-gru\)",
        ),
        (["sentiment", "fine", "--model-uri", "models:/rnnlab-sentiment-gru/1"], r"is not an rnnlab serving model"),
        # A shell's $'bad \xff film': Python keeps the byte that is not UTF-8 as a lone surrogate.
        (
            ["sentiment", "bad \udcff film"],
            r"row 0 of column 'text' is not valid UTF-8 \(byte 0xff at character 4\); give a review text.* in UTF-8\.",
        ),
        (
            ["sentiment", "fine", "--length", "5"],
            r"sentiment models do not take --length \(they take none of --length, --temperature, --seed\)",
        ),
        (
            ["textgen", "ROMEO:", "--model-uri", "models:/rnnlab-sentiment-gru@champion"],
            r"is a sentiment model \(run \w+\), not a textgen one",
        ),
    ],
)
def test_bad_sentiment_requests_exit_2_with_the_reason(sentiment_champion: Champion, capsys, argv: list[str], message: str) -> None:  # noqa: F811
    code, out, err = run_main(capsys, *argv, "--tracking-uri", sentiment_champion.uri)
    assert code == 2 and out == ""
    assert err.startswith("rnnlab: error: ") and len(err.strip().splitlines()) == 1, err
    assert re.search(message, err), err


def test_a_mistyped_store_is_refused_and_not_created(capsys, tmp_path: Path) -> None:
    store = tmp_path / "mlrun" / "mlflow.db"  # mlruns, mistyped
    code, out, err = run_main(capsys, "sentiment", "fine", "--tracking-uri", f"sqlite:///{store}")
    assert code == 2 and out == ""
    assert err.strip() == (
        f"rnnlab: error: there is no MLflow store at sqlite:///{store}; check --tracking-uri "
        f"(this project's is sqlite:///{project_root()}/mlruns/mlflow.db)."
    )
    assert not store.exists() and not store.parent.exists()


def test_unknown_prompt_characters_are_named(textgen_champion: Champion, capsys) -> None:  # noqa: F811
    code, out, err = run_main(capsys, "textgen", "ROMEO§", "--tracking-uri", textgen_champion.uri)
    assert code == 2 and out == ""
    assert "prompt has character(s) outside the model's vocabulary: '§'" in err


def test_inputs_are_checked_against_the_signature_before_mlflow_sees_them(sentiment_champion: Champion, caplog) -> None:  # noqa: F811
    mlflow.set_tracking_uri(sentiment_champion.uri)
    model = mlflow.pyfunc.load_model(sentiment_champion.model_uri)
    with pytest.raises(DataError, match=r"lacks the column\(s\) \['text'\] .* \(it has \['review'\]\); give the columns \['text'\]"):
        conform_to_signature(pd.DataFrame({"review": ["fine"]}), model, sentiment_champion.model_uri)
    extra = pd.DataFrame({"id": [7], "text": ["fine"]})
    conformed = conform_to_signature(extra, model, sentiment_champion.model_uri)
    assert list(conformed.columns) == ["text"] and conformed["text"].tolist() == ["fine"]
    with caplog.at_level("WARNING"):
        model.predict(conformed)
    assert "extra inputs" not in caplog.text


def test_an_input_of_the_wrong_type_is_a_one_line_error(sentiment_champion: Champion, capsys, monkeypatch) -> None:  # noqa: F811
    # A reader that yields numbers where the signature takes text: MLflow's schema check refuses it before the predictor.
    monkeypatch.setattr(ReviewPredictor, "read_input", classmethod(lambda cls, source: pd.DataFrame({"text": [3]})))
    code, out, err = run_main(capsys, "sentiment", "fine", "--tracking-uri", sentiment_champion.uri)
    assert code == 2 and out == ""
    assert err.startswith("rnnlab: error: models:/rnnlab-sentiment-gru@champion refuses the input: "), err
    assert len(err.strip().splitlines()) == 1, err


def test_without_a_default_gru_predict_answers_with_the_tuned_one(sentiment_champion: Champion, capsys, tmp_path: Path) -> None:  # noqa: F811
    """A task the pipeline tunes registers gru_tuned and no gru: the default model follows (in a copy of the store)."""
    store = tmp_path / "mlflow.db"
    shutil.copy(sentiment_champion.uri.removeprefix("sqlite:///"), store)
    client = MlflowClient(f"sqlite:///{store}")
    source = f"models:/{sentiment_champion.registered_model}/{sentiment_champion.version}"
    tuned = client.copy_model_version(source, "rnnlab-sentiment-gru_tuned")
    client.set_registered_model_alias("rnnlab-sentiment-gru_tuned", "champion", tuned.version)
    client.delete_registered_model(sentiment_champion.registered_model)
    code, out, err = run_main(capsys, "sentiment", "great film", "--tracking-uri", f"sqlite:///{store}")
    assert code == 0, err
    assert out.startswith(("positive", "negative")) and "rnnlab-sentiment-gru_tuned v1" in err


def test_by_default_predict_reads_the_projects_store() -> None:
    assert project_tracking_uri("sentiment") == f"sqlite:///{project_root()}/mlruns/mlflow.db"


@pytest.mark.slow  # two fresh interpreters importing torch and MLflow: about 20 s
def test_the_console_script_predicts_and_reports_bad_input_without_a_traceback(sentiment_champion: Champion) -> None:  # noqa: F811
    script = Path(sys.executable).with_name("rnnlab-predict")
    assert script.is_file(), f"the rnnlab-predict console script is not installed at {script}"
    command = [str(script), "sentiment", "--tracking-uri", sentiment_champion.uri]
    good = subprocess.run([*command, "A wonderful, moving film"], capture_output=True, text=True, timeout=300)
    assert good.returncode == 0, good.stderr[-3000:]
    assert "P(positive) = " in good.stdout and "rnnlab-sentiment-gru v2" in good.stderr
    bad = subprocess.run([*command, " "], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "rnnlab: error: row 0 of column 'text' is only whitespace" in bad.stderr
