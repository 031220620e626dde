"""The memory tasks (issue #11): generation, fetch and preprocess per lag, the DataModules' lag, the task modules'
metrics, a smoke training of each task, and the lag sweep's report."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from helpers import isolated_outputs, quiet_trainer, run_main
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from rnnlab import memory_report
from rnnlab.data.base import SPLITS
from rnnlab.data.memory import (
    AddingDataModule,
    CopyDataModule,
    adding_inputs,
    adding_problem,
    chance_level,
    copy_problem,
    copy_tokens,
    fetch,
    preprocess,
)
from rnnlab.errors import ConfigError, DataError
from rnnlab.models.encoder import count_parameters
from rnnlab.models.memory import AddingRegressor, CopyNet, SequenceCopier
from rnnlab.training import train

SIZES = {"train_size": 40, "val_size": 10, "test_size": 12}
LAGS = [4, 9]
OPTIMIZER = {"_target_": "torch.optim.Adam", "lr": 0.01}


def make_data(root: Path, problem: str, lags: list[int] = LAGS, seed: int = 1234, **fetch_settings: int) -> Path:
    """Fetch and preprocess a memory problem into root/raw and root/processed; the processed folder."""
    settings = {"length": 3, "alphabet": 5} if problem == "copy" and not fetch_settings else fetch_settings
    fetch(str(root / "raw"), problem, **settings)
    preprocess(str(root / "raw"), str(root / "processed"), lags, **SIZES, seed=seed)
    return root / "processed"


@pytest.fixture(scope="module")
def adding_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_data(tmp_path_factory.mktemp("adding"), "adding")


@pytest.fixture(scope="module")
def copy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_data(tmp_path_factory.mktemp("copy"), "copy")


def load(processed: Path, lag: int, split: str) -> dict[str, torch.Tensor]:
    return torch.load(processed / f"lag{lag}" / f"{split}.pt", weights_only=True)


# --- generation ------------------------------------------------------------------------------------------------


def test_the_adding_problem_marks_one_step_in_each_half_and_sums_their_values() -> None:
    drawn = adding_problem(2000, 7, np.random.default_rng(0))
    first, second = drawn["positions"][:, 0], drawn["positions"][:, 1]
    assert set(first.tolist()) == {0, 1, 2} and set(second.tolist()) == {3, 4, 5, 6}  # halves of 7 steps: 3 and 4
    assert torch.allclose(drawn["targets"], drawn["values"].gather(1, drawn["positions"]).sum(dim=1))
    assert drawn["values"].min() >= 0 and drawn["values"].max() < 1


def test_adding_inputs_are_the_values_beside_their_markers() -> None:
    inputs = adding_inputs(torch.tensor([[0.1, 0.2, 0.3, 0.4]]), torch.tensor([[0, 3]]))
    assert torch.equal(inputs, torch.tensor([[[0.1, 1.0], [0.2, 0.0], [0.3, 0.0], [0.4, 1.0]]]))


def test_the_copy_task_is_symbols_blanks_delimiter_then_recall_steps() -> None:
    # Alphabet 8: symbols 1..8, blank 0, delimiter 9; lag 2: one blank before the delimiter, then a blank per symbol.
    assert copy_tokens(torch.tensor([[3, 1, 4]]), lag=2, alphabet=8).tolist() == [[3, 1, 4, 0, 9, 0, 0, 0]]
    assert copy_tokens(torch.tensor([[3, 1, 4]]), lag=1, alphabet=8).tolist() == [[3, 1, 4, 9, 0, 0, 0]]
    drawn = copy_problem(500, 6, np.random.default_rng(0), length=3, alphabet=8)
    assert drawn["tokens"].dtype == torch.int8 and drawn["tokens"].shape == (500, 12)
    assert torch.equal(drawn["targets"] + 1, drawn["tokens"][:, :3].long())  # classes 0..7 are the symbols 1..8
    assert set(drawn["targets"].flatten().tolist()) == set(range(8))


@pytest.mark.parametrize("problem", ["adding", "copy"])
def test_generation_is_a_function_of_the_seed(problem: str) -> None:
    def draw(seed: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng(seed)
        return adding_problem(50, 10, rng) if problem == "adding" else copy_problem(50, 10, rng, length=3, alphabet=8)

    same, other = draw(1), draw(2)
    assert all(torch.equal(draw(1)[key], same[key]) for key in same)
    assert not torch.equal(same["targets"], other["targets"])


def test_chance_levels_are_those_of_an_input_blind_guess() -> None:
    rng = np.random.default_rng(0)
    targets = adding_problem(200_000, 10, rng)["targets"]
    assert chance_level("adding")["test_mse"] == pytest.approx(((targets - 1) ** 2).mean().item(), rel=0.02)
    assert chance_level("copy", alphabet=8) == {"test_acc": 0.125}


# --- fetch and preprocess --------------------------------------------------------------------------------------


@pytest.mark.parametrize("problem", ["adding", "copy"])
def test_preprocess_writes_every_split_of_every_lag(problem: str, tmp_path: Path) -> None:
    processed = make_data(tmp_path, problem)
    source = json.loads((tmp_path / "raw" / "source.json").read_text())
    assert source["problem"] == problem and source["source"] == "synthetic" and "numpy==" in source["generator"]
    metadata = json.loads((processed / "metadata.json").read_text())
    assert metadata["lags"] == LAGS and metadata["sizes"] == {"train": 40, "val": 10, "test": 12}
    for lag in LAGS:
        assert json.loads((processed / f"lag{lag}" / "metadata.json").read_text())["lag"] == lag
        for split, n in zip(SPLITS, (40, 10, 12), strict=True):
            tensors = load(processed, lag, split)
            if problem == "adding":
                assert tensors["values"].shape == (n, lag) and tensors["positions"].shape == (n, 2) and tensors["targets"].shape == (n,)
            else:
                assert tensors["tokens"].shape == (n, lag + 6) and tensors["targets"].shape == (n, 3)
                assert tensors["tokens"][:, 3 + lag - 1].eq(6).all()  # the delimiter of an alphabet of 5


def test_preprocess_is_a_function_of_the_seed_and_each_lag_of_its_own(tmp_path: Path) -> None:
    first = make_data(tmp_path / "a", "adding")
    again = make_data(tmp_path / "b", "adding")
    reseeded = make_data(tmp_path / "c", "adding", seed=7)
    more_lags = make_data(tmp_path / "d", "adding", lags=[9, 4, 16])
    for split in SPLITS:
        for lag in LAGS:
            assert torch.equal(load(first, lag, split)["values"], load(again, lag, split)["values"])
            assert torch.equal(load(first, lag, split)["values"], load(more_lags, lag, split)["values"])  # a new lag changes no other
            assert not torch.equal(load(first, lag, split)["values"], load(reseeded, lag, split)["values"])
    assert not torch.equal(load(first, 4, "train")["values"][:10], load(first, 4, "val")["values"])  # a stream per split
    assert json.loads((more_lags / "metadata.json").read_text())["lags"] == [4, 9, 16]


@pytest.mark.parametrize(
    ("problem", "settings", "message"),
    [
        ("sorting", {}, r"task.fetch.problem='sorting' is not a memory problem; choose one of \['adding', 'copy'\]"),
        ("copy", {"length": 3, "alphabet": 1}, r"task.fetch.alphabet \(distinct symbols\) must be a whole number >= 2, got 1"),
        ("copy", {"length": 0, "alphabet": 8}, r"task.fetch.length \(symbols to copy\) must be a whole number >= 1, got 0"),
        ("copy", {"length": 3, "alphabet": 200}, r"task.fetch.alphabet=200 is too large: at most 126 symbols"),
        ("adding", {"length": 3}, r"task.fetch.length and task.fetch.alphabet are settings of the copy task"),
    ],
)
def test_fetch_refuses_bad_settings(problem: str, settings: dict, message: str, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=message):
        fetch(str(tmp_path / "raw"), problem, **settings)
    assert not (tmp_path / "raw").exists()


@pytest.mark.parametrize(
    ("lags", "sizes", "message"),
    [
        ([1, 4], {}, r"task.preprocess.lags must be a non-empty list of whole numbers >= 2, got \[1, 4\]"),
        ([], {}, r"task.preprocess.lags must be a non-empty list"),
        (10, {}, r"task.preprocess.lags must be a non-empty list of whole numbers >= 2, got 10"),
        ([4, 4], {}, r"task.preprocess.lags lists a lag twice: \[4, 4\]"),
        ([4], {"val_size": 0}, r"task.preprocess.val_size must be a whole number >= 1, got 0"),
        ([4], {"seed": -1}, r"task.preprocess.seed must be a whole number >= 0, got -1"),
    ],
)
def test_preprocess_refuses_bad_settings(lags: object, sizes: dict, message: str, tmp_path: Path) -> None:
    fetch(str(tmp_path / "raw"), "adding")
    with pytest.raises(DataError, match=message):
        preprocess(str(tmp_path / "raw"), str(tmp_path / "processed"), lags, **sizes)
    assert not (tmp_path / "processed").exists()


def test_preprocess_needs_the_fetched_source(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"source.json is missing: run the fetch stage first"):
        preprocess(str(tmp_path / "raw"), str(tmp_path / "processed"), [4])


# --- the DataModules -------------------------------------------------------------------------------------------


def test_the_adding_datamodule_serves_the_lag_it_is_given(adding_dir: Path) -> None:
    for lag in LAGS:
        dm = AddingDataModule(str(adding_dir), lag=lag, batch_size=8)
        dm.setup()
        inputs, targets = next(iter(dm.train_dataloader()))
        assert inputs.shape == (8, lag, 2) and targets.shape == (8,)
        test = load(adding_dir, lag, "test")
        assert torch.equal(dm.datasets["test"].tensors[0], adding_inputs(test["values"], test["positions"]))
        assert torch.equal(dm.datasets["test"].tensors[1], test["targets"])
    assert dm.front_end_dims == {"num_features": 2} and dm.head_dims == {}
    assert dm.test_units().to_dict("list") == {"unit": list(range(12)), "group": list(range(12))}


def test_the_copy_datamodule_serves_tokens_and_the_sizes_of_its_network(copy_dir: Path) -> None:
    dm = CopyDataModule(str(copy_dir), lag=9, batch_size=4, limit_test=5)
    dm.setup()
    tokens, targets = next(iter(dm.test_dataloader()))
    assert tokens.dtype == torch.int64 and tokens.shape == (4, 15) and targets.shape == (4, 3)
    assert dm.front_end_dims == {"vocab_size": 7} and dm.head_dims == {"alphabet": 5, "length": 3}
    assert len(dm.test_units()) == 5


def test_unreadable_memory_data_names_the_task_s_stage_not_the_lag_folder(adding_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "adding"
    shutil.copytree(adding_dir, broken)
    (broken / "lag4" / "train.pt").write_bytes(b"cut short")
    unreadable = r"lag4/train\.pt is not readable processed data .*`dvc repro -f preprocess@memory_adding`\.$"
    with pytest.raises(DataError, match=unreadable) as error:
        AddingDataModule(str(broken), lag=4, task="memory_adding").setup()
    assert "\n" not in str(error.value)  # torch's own error runs to a dozen lines
    (broken / "metadata.json").write_text('{"lags": [4')  # truncated: a one-line error, not a traceback
    with pytest.raises(DataError, match=r"metadata\.json is not readable processed data .*preprocess@memory_adding`\.$"):
        AddingDataModule(str(broken), lag=4, task="memory_adding")


def test_a_lag_that_was_not_preprocessed_is_refused_naming_those_that_were(adding_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"task.data.lag=5 was not preprocessed: .* holds the lags 4, 9\. Train one of those, or add 5"):
        AddingDataModule(str(adding_dir), lag=5)
    with pytest.raises(DataError, match=r"task.data.lag must be a positive whole number, got 0"):
        AddingDataModule(str(adding_dir), lag=0)
    with pytest.raises(DataError, match=r"metadata.json is missing: run `dvc repro preprocess@memory_adding`"):
        AddingDataModule(str(tmp_path), lag=4, task="memory_adding")


# --- the task modules ------------------------------------------------------------------------------------------


class Fixed(nn.Module):
    """Stands in for a network: returns the next of `outputs` (one tensor per batch) whatever its input."""

    def __init__(self, outputs: list[torch.Tensor]) -> None:
        super().__init__()
        self.outputs = outputs
        self.calls = 0

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.outputs[self.calls - 1]


def adding_regressor(**settings: object) -> AddingRegressor:
    front_end = {"_target_": "rnnlab.models.front_ends.DenseFeatures", "num_features": 2}
    encoder = {"cell": "torch.nn.GRU", "hidden_size": 8, "pooling": ["mean", "last"]}
    return AddingRegressor(front_end=front_end, encoder=encoder, optimizer=OPTIMIZER, scheduler=None, **settings)


def test_adding_metrics_are_the_mse_and_the_share_within_tolerance(tmp_path: Path) -> None:
    targets = torch.tensor([1.0, 0.5, 1.5, 0.2])
    predictions = torch.tensor([1.0, 0.53, 1.4, 0.25])  # errors 0, 0.03, -0.1, 0.05
    module = adding_regressor()
    module.net = Fixed([predictions[:3, None], predictions[3:, None]])  # batches of 3 and 1: the means weight by sequence
    loader = DataLoader(TensorDataset(torch.zeros(4, 5, 2), targets), batch_size=3)
    result = quiet_trainer(tmp_path).test(module, dataloaders=loader, verbose=False)[0]
    assert result["test_mse"] == pytest.approx((0 + 0.0009 + 0.01 + 0.0025) / 4, abs=1e-7)
    assert result["test_loss"] == pytest.approx(result["test_mse"])
    assert result["test_acc"] == pytest.approx(0.5)  # 0 and 0.03 are within 0.04; 0.1 and 0.05 are not
    recorded = module.test_predictions()
    assert list(recorded.columns) == ["example", "target", "prediction", "loss"]
    assert recorded["loss"].to_numpy() == pytest.approx([0, 0.0009, 0.01, 0.0025], abs=1e-7)


def test_an_untrained_adding_regressor_predicts_about_the_mean_sum() -> None:
    module = adding_regressor()
    assert module.net.head.bias.item() == 1.0
    with pytest.raises(ConfigError, match=r"task.module.tolerance must be a number > 0"):
        adding_regressor(tolerance=0)


def sequence_copier(alphabet: int = 8, length: int = 3, **encoder: object) -> SequenceCopier:
    front_end = {"_target_": "rnnlab.models.front_ends.TokenEmbedding", "vocab_size": alphabet + 2, "embedding_dim": 4}
    settings = {"cell": "torch.nn.GRU", "hidden_size": 8, "pooling": ["mean", "last"], **encoder}
    return SequenceCopier(front_end=front_end, encoder=settings, optimizer=OPTIMIZER, scheduler=None, alphabet=alphabet, length=length)


def test_copy_metrics_count_recalled_symbols_and_whole_sequences(tmp_path: Path) -> None:
    targets = torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 0]])
    predicted = torch.tensor([[0, 1, 7], [3, 0, 5], [6, 7, 0]])  # 2, 2 and 3 of 3 right; one sequence whole
    logits = 3.0 * F.one_hot(predicted, 8).float()
    module = sequence_copier()
    module.net = Fixed([logits[:2], logits[2:]])  # batches of 2 and 1: the means weight by symbol and by sequence
    loader = DataLoader(TensorDataset(torch.zeros(3, 9, dtype=torch.long), targets), batch_size=2)
    result = quiet_trainer(tmp_path).test(module, dataloaders=loader, verbose=False)[0]
    assert result["test_acc"] == pytest.approx(7 / 9)
    assert result["test_seq_acc"] == pytest.approx(1 / 3)
    assert result["test_loss"] == pytest.approx(F.cross_entropy(logits.transpose(1, 2), targets).item(), rel=1e-6)
    recorded = module.test_predictions()  # one row per sequence and copied position
    assert recorded["example"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2] and recorded["horizon"].tolist() == [1, 2, 3] * 3
    assert recorded["target"].tolist() == targets.flatten().tolist() and recorded["prediction"].tolist() == predicted.flatten().tolist()


def test_the_copy_network_reads_its_outputs_at_the_recall_steps() -> None:
    torch.manual_seed(0)
    module = sequence_copier(alphabet=5, length=3)
    assert isinstance(module.net, CopyNet) and not hasattr(module.net.encoder, "attention")
    tokens = copy_tokens(torch.tensor([[1, 2, 3], [5, 4, 3]]), lag=4, alphabet=5)
    logits = module(tokens)
    assert logits.shape == (2, 3, 5)
    outputs, _ = module.net.encoder.unroll(module.net.front_end(tokens)[0])
    assert torch.allclose(logits, module.net.head(outputs[:, -3:]))


def test_a_copier_can_match_another_cell_s_parameter_count() -> None:
    gru = sequence_copier(hidden_size=64)
    lstm = sequence_copier(cell="torch.nn.LSTM", hidden_size=64, match_params="gru")
    assert lstm.net.encoder.hidden_size < 64
    assert abs(count_parameters(lstm.net) - count_parameters(gru.net)) <= 0.02 * count_parameters(gru.net)


# --- a training of each task (smoke profile) -------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("task", "metrics"), [("memory_adding", {"test_mse", "test_acc"}), ("memory_copy", {"test_acc", "test_seq_acc"})])
def test_a_smoke_training_of_each_memory_task(
    task: str, metrics: set[str], compose_cfg: Callable[..., DictConfig], adding_dir: Path, copy_dir: Path, tmp_path: Path
) -> None:
    processed = adding_dir if task == "memory_adding" else copy_dir
    cfg = compose_cfg(
        f"task={task}",
        "profile=smoke",
        "model=lstm",
        "task.data.lag=9",
        "callbacks.progress_bar=null",
        f"paths.processed={processed}",
        *isolated_outputs(tmp_path),
    )
    result = train(cfg)
    assert metrics <= result.keys()
    predictions = pd.read_csv(tmp_path / "predictions.csv")
    copied = 3 if task == "memory_copy" else 1
    assert len(predictions) == 12 * copied and predictions["group"].nunique() == 12
    test = load(processed, 9, "test")
    assert predictions["target"].to_numpy() == pytest.approx(test["targets"].flatten().numpy(), abs=1e-5)


# --- the lag sweep's report ------------------------------------------------------------------------------------


def write_sweep(metrics_dir: Path, values: dict[str, dict[str, dict[int, float]]], seed: int = 42) -> None:
    """Metrics files as the sweep's trainings write them: task -> model -> lag -> primary metric."""
    metric = {"memory_adding": "test_mse", "memory_copy": "test_acc"}
    for task, models in values.items():
        for model, by_lag in models.items():
            for lag, value in by_lag.items():
                path = metrics_dir / task / f"{model}_lag{lag}" / f"seed{seed}.json"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps({metric[task]: value, "test_loss": value, "epochs": 8}))


@pytest.fixture
def report_run(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> Callable[..., tuple[int, str]]:
    def run(*overrides: str) -> tuple[int, str]:
        args = [f"metrics_dir={tmp_path}/metrics", f"output_dir={tmp_path}/reports", "seed=42", "models=[gru,rnn]", *overrides]
        finished = run_main(memory_report.main, *args, run_dir=tmp_path / "hydra", capsys=capsys)
        return finished.returncode, finished.stderr

    return run


def test_the_report_tables_and_draws_each_task_against_the_lag(report_run: Callable[..., tuple[int, str]], tmp_path: Path) -> None:
    write_sweep(
        tmp_path / "metrics",
        {
            "memory_adding": {"gru": {5: 0.001, 10: 0.002, 20: 0.004}, "rnn": {5: 0.002, 10: 0.16, 20: 0.165}},
            "memory_copy": {"gru": {5: 1.0, 10: 0.2, 20: 0.9}, "rnn": {5: 0.9, 10: 0.13, 20: 0.12}},
        },
    )
    code, stderr = report_run("tasks=[memory_adding,memory_copy]", "lags=[20,5,10]")
    assert code == 0, stderr
    report = json.loads((tmp_path / "reports" / "memory_lags.json").read_text())
    adding, copy = report["tasks"]["memory_adding"], report["tasks"]["memory_copy"]
    assert adding["metric"] == "test_mse" and adding["chance"] == pytest.approx(1 / 6) and adding["lags"] == [5, 10, 20]
    assert copy["metric"] == "test_acc" and copy["chance"] == pytest.approx(1 / 8) and copy["mode"] == "max"
    assert adding["models"]["rnn"]["at_chance_from"] == 10 and adding["models"]["gru"]["at_chance_from"] is None
    # (0.2 - 1/8) / (7/8) = 0.086 closes less than a tenth of the gap at lag 10, but the GRU copies at 20 again.
    assert copy["models"]["gru"]["at_chance_from"] is None and copy["models"]["rnn"]["at_chance_from"] == 10
    text = (tmp_path / "reports" / "memory_lags.md").read_text()
    assert "| 10 | 0.0020 | 0.1600 |" in text and "| at chance from | — | 10 |" in text
    assert "![memory_copy](memory_lags/memory_copy.png)" in text
    assert {p.name for p in (tmp_path / "reports" / "memory_lags").iterdir()} == {"memory_adding.png", "memory_copy.png"}


def test_the_report_names_the_stage_of_a_missing_run(report_run: Callable[..., tuple[int, str]], tmp_path: Path) -> None:
    write_sweep(tmp_path / "metrics", {"memory_adding": {"gru": {5: 0.001}, "rnn": {5: 0.002}}})
    code, stderr = report_run("tasks=[memory_adding]", "lags=[5,10]")
    assert code == 2
    assert "gru_lag10/seed42.json is missing: train it with `dvc repro pipelines/lags/dvc.yaml:train_lag@memory_adding-gru-10`" in stderr
    code, stderr = report_run("tasks=[sentiment]", "lags=[5]")
    assert code == 2 and "task sentiment is not a memory task" in stderr


def test_skill_is_the_share_of_the_gap_to_a_perfect_score() -> None:
    assert memory_report.skill(1 / 12, 1 / 6, "min") == pytest.approx(0.5)
    assert memory_report.skill(0.125, 0.125, "max") == 0.0 and memory_report.skill(1.0, 0.125, "max") == 1.0
