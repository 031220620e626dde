"""rnnlab's Optuna sweeper keeps hydra-optuna-sweeper's config meaning: the distribution each
sweep override maps to, the sweeper keys it accepts (or refuses, naming the fix), and the
objective as the task function's return value, for a plain Hydra app."""

from __future__ import annotations

import contextlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import optuna
import pytest
import yaml
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.test_utils.test_utils import TSweepRunner
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from hydra_plugins.rnnlab_optuna_sweeper import SAMPLERS
from rnnlab.errors import ConfigError
from rnnlab.search import Search, directions_of, distribution_of, parse_search_space
from rnnlab.trial import open_storage, open_trial, trial_objective

# ---------------------------------------------------------------------------- sweep syntax -> distribution

# hydra-optuna-sweeper's create_optuna_distribution_from_override, written out: a range's stop is
# included (Optuna's high), a float anywhere in a range makes it a FloatDistribution with that step,
# an interval of two ints is an IntDistribution, tag(log, ...) makes an interval log-scaled.
HYDRA_OPTUNA_SWEEPER_MAPPING = [
    ("choice(1, 2, 3)", CategoricalDistribution([1, 2, 3])),
    ("choice(a, b)", CategoricalDistribution(["a", "b"])),
    ("choice(false, true)", CategoricalDistribution([False, True])),
    ("range(1, 3)", IntDistribution(1, 3)),
    ("range(0, 10, 2)", IntDistribution(0, 10, step=2)),
    ("range(0.0, 1.0, 0.25)", FloatDistribution(0.0, 1.0, step=0.25)),
    ("range(1, 2.5, 0.5)", FloatDistribution(1.0, 2.5, step=0.5)),
    ("float(range(1, 3))", FloatDistribution(1.0, 3.0, step=1.0)),
    ("range(3, 3)", IntDistribution(3, 3)),
    ("interval(0, 1)", FloatDistribution(0.0, 1.0)),  # Hydra reads interval's ends as floats
    ("interval(0.1, 0.5)", FloatDistribution(0.1, 0.5)),
    ("int(interval(8, 64))", IntDistribution(8, 64)),
    ("tag(log, interval(1e-4, 1e-2))", FloatDistribution(1e-4, 1e-2, log=True)),
    ("tag(log, int(interval(1, 64)))", IntDistribution(1, 64, log=True)),
    ("int(tag(log, interval(1, 64)))", IntDistribution(1, 64, log=True)),
]


def parse(spec: str) -> Any:
    return OverridesParser.create().parse_override(f"x={spec}")


@pytest.mark.parametrize(("spec", "expected"), HYDRA_OPTUNA_SWEEPER_MAPPING)
def test_each_sweep_maps_to_the_distribution_hydra_optuna_sweeper_gives(spec: str, expected: BaseDistribution) -> None:
    got = distribution_of(parse(spec))
    assert type(got) is type(expected) and got == expected


def test_a_shuffled_range_is_a_categorical_of_the_values_hydra_sweeps() -> None:
    got = distribution_of(parse("shuffle(range(1, 4))"))
    # As in hydra-optuna-sweeper: shuffle() goes through Hydra's own iteration, which stops before 4.
    assert isinstance(got, CategoricalDistribution) and sorted(got.choices) == [1, 2, 3]


@pytest.mark.parametrize(
    ("spec", "fix"),
    [
        ("range(3, 1)", "write range(1, 3) (the stop is included)"),
        ("range(1, 5, -1)", "the step must be positive"),
        ("tag(log, range(1, 8))", "write tag(log, int(interval(1, 8)))"),
        ("interval(1.0, 0.5)", "write interval(0.5, 1.0)"),
        ("tag(log, interval(0.0, 1.0))", "a log-scaled interval needs a positive low end"),
    ],
)
def test_a_sweep_no_distribution_holds_is_refused_in_one_line_with_the_fix(spec: str, fix: str) -> None:
    with pytest.raises(ConfigError) as err:
        distribution_of(parse(spec))
    assert fix in str(err.value) and "\n" not in str(err.value)


def test_fixed_values_and_command_line_sweeps_split_as_hydra_optuna_sweeper_splits_them() -> None:
    config = OmegaConf.create({"x": 0.0, "y": 0, "z": "a", "w": 1, "m": "???"})
    space = parse_search_space(
        {"x": "interval(0, 1)", "y": "3", "z": "choice(a, b)", "w": "range(1, 4)", "m": "choice(1, 2)"},
        config,
        ["y=choice(1, 2)", "z=b", "+extra=range(0, 2)"],
    )
    by_name = {p.name: p for p in space.params}
    # The command line comes last: y becomes a searched choice, z a fixed value that leaves the space.
    assert by_name["y"].distribution == CategoricalDistribution([1, 2])
    assert "z" not in by_name and space.fixed == ["z=b"]
    assert by_name["w"].distribution == IntDistribution(1, 4)
    assert by_name["extra"].add and by_name["extra"].override(2) == "+extra=2"
    # A mandatory key (`???`) is a key: swept as it is written, without the + that Hydra would refuse for it.
    assert by_name["m"].distribution == CategoricalDistribution([1, 2]) and by_name["m"].override(2) == "m=2"
    # Not a key under a mandatory parent: a misspelling there is still refused.
    with pytest.raises(ConfigError, match=r"`m.hiden` is not a key of the config; check its spelling, or write `\+m.hiden`"):
        parse_search_space({"m.hiden": "choice(1, 2)"}, config, [])


def test_directions_accept_names_enums_and_lists() -> None:
    direction = SimpleNamespace(name="maximize")  # hydra-optuna-sweeper's Direction enum has .name
    assert directions_of("minimize") == ["minimize"]
    assert directions_of(direction) == ["maximize"]
    assert directions_of(OmegaConf.create({"d": ["minimize", "maximize"]}).d) == ["minimize", "maximize"]
    with pytest.raises(ConfigError, match=r"write minimize or maximize, or a list such as \[minimize, maximize\]"):
        directions_of("up")


# ---------------------------------------------------------------------------- sweeper settings refused


def sweeper(**settings: Any) -> SimpleNamespace:
    """The sweeper's keys as Hydra hands them to it: hydra-optuna-sweeper's defaults, then rnnlab's."""
    defaults = {
        "sampler": OmegaConf.create({"_target_": "optuna.samplers.TPESampler", "seed": None}),
        "direction": "minimize",
        "storage": None,
        "study_name": None,
        "n_trials": 20,
        "n_jobs": 2,
        "max_failure_rate": 0.0,
        "search_space": None,
        "params": {"x": "interval(0, 1)"},
        "custom_search_space": None,
        "timeout": None,
        "total_trials": None,
        "enqueue_defaults": False,
    }
    return SimpleNamespace(**{**defaults, **settings})


def preset(name: str) -> DictConfig:
    """The sampler node that `hydra/sweeper/sampler=<name>` selects."""
    return OmegaConf.create(ConfigStore.instance().load(f"hydra/sweeper/sampler/{name}.yaml").node)


@pytest.mark.parametrize("name", sorted(set(SAMPLERS) - {"grid"}))  # grid: built from its space, tested below
def test_every_sampler_preset_builds_its_optuna_sampler(tmp_path: Path, name: str) -> None:
    search = Search(plain_config(tmp_path), launcher=None, sweeper=sweeper(sampler=preset(name)))
    assert type(search.sampler).__name__ == SAMPLERS[name]


def plain_config(tmp_path: Path, **extra: Any) -> DictConfig:
    return OmegaConf.create({"x": 0.5, "y": 0, "hydra": {"sweep": {"dir": str(tmp_path)}}, **extra})


@pytest.mark.parametrize(
    ("settings", "fix"),
    [
        ({"search_space": {"x": {"type": "float", "low": 0, "high": 1}}}, "write the space under hydra.sweeper.params"),
        ({"n_jobs": 0}, "hydra.sweeper.n_jobs is 0; write the number of trials to launch at once"),
        ({"max_failure_rate": 1.5}, "write a fraction from 0.0"),
        ({"custom_search_space": "no_such_module.extend"}, "write the dotted path of a function (config, trial) -> None"),
        (
            {"sampler": OmegaConf.create({"_target_": "optuna.samplers.RandomSampler", "n_startup_trials": 6})},
            "remove the settings it does not take (~hydra.sweeper.sampler.<key>",
        ),
        ({"sampler": OmegaConf.create({"_target_": "optuna.samplers.GridSampler", "_partial_": True})}, "write choice(...) or range(...)"),
        (
            # hydra-optuna-sweeper's motpe preset, as its config files write it (not a preset here: the sweeper module's
            # body is hashed into every training stage, so its presets stay as they are).
            {"sampler": OmegaConf.create({"_target_": "optuna.samplers.MOTPESampler", "seed": None})},
            "which Optuna removed in version 4: its TPESampler searches several objectives too; write _target_: optuna.samplers.TPESampler",
        ),
        ({"params": {}}, "The search space is empty"),
        *(
            ({"sampler": OmegaConf.create({"_target_": "optuna.samplers.NSGAIISampler", "seed": seed})}, "must be a whole number from 0")
            for seed in ("abc", 2.5, 2**32, -1)
        ),
    ],
)
def test_settings_it_cannot_honour_are_refused_in_one_line_with_the_fix(tmp_path: Path, settings: dict[str, Any], fix: str) -> None:
    with pytest.raises(ConfigError) as err:
        Search(plain_config(tmp_path), launcher=None, sweeper=sweeper(**settings))
    assert fix in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("settings", "cost", "fix"),
    [
        (
            {"direction": ["minimize", "maximize"], "storage": "s.log", "study_name": "s"},
            None,
            "write one direction, or add search.cost=n_params",
        ),
        ({"storage": None, "study_name": "s"}, None, "write a journal file path or an RDB URL"),
        # A second objective needs the search.cost that names it, minimised, after the metric's direction.
        ({"direction": "maximize", "storage": "s.log", "study_name": "s"}, "n_params", "write hydra.sweeper.direction=[maximize,minimize]"),
        ({"direction": ["maximize", "maximize"], "storage": "s.log", "study_name": "s"}, "n_params", "direction=[maximize,minimize]"),
        ({"direction": ["maximize", "minimize"], "storage": "s.log", "study_name": "s"}, "latency", "write one of n_params, or null"),
    ],
)
def test_what_rnnlab_train_cannot_do_is_refused_in_one_line(tmp_path: Path, settings: dict[str, Any], cost: str | None, fix: str) -> None:
    search = {"trial": None, "parent_run_id": None, "study": "s", "storage": "s.log", "metric": "val_acc", "direction": "maximize"}
    config = plain_config(tmp_path, search={**search, "cost": cost})
    with pytest.raises(ConfigError) as err:
        Search(config, launcher=None, sweeper=sweeper(**settings))
    assert fix in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------------------- a plain Hydra app


ConfigStore.instance().store(name="sweeper_semantics_app", node={"x": 0.0, "y": 0, "z": 0, "mode": "one"})
# A config group of the app, `shape`, composed as steep: its option adds `k` to the objective.
ConfigStore.instance().store(group="shape", name="flat", node={"k": 1})
ConfigStore.instance().store(group="shape", name="steep", node={"k": 3})
ConfigStore.instance().store(
    name="sweeper_group_app", node={"defaults": ["_self_", {"shape": "steep"}], "x": 0.0, "y": 0, "z": 0, "mode": "one"}
)


def objective(cfg: DictConfig) -> Any:
    """The app's return value is the objective: one float, or two for two directions, or garbage."""
    first = (cfg.x - 0.5) ** 2 + cfg.y + cfg.z + (cfg.shape.k if "shape" in cfg else 0)
    if cfg.mode == "two":
        return [first, cfg.x * 10]
    if cfg.mode == "bad":
        return "not a number"
    return first


def extend(config: DictConfig, trial: optuna.Trial) -> None:
    """A custom_search_space function: suggests z itself."""
    trial.suggest_int("z", 5, 7)


def run_app(
    runner: TSweepRunner, tmp_path: Path, *overrides: str, config_name: str = "sweeper_semantics_app"
) -> tuple[optuna.Study, dict | None]:
    storage = f"sqlite:///{tmp_path}/study.db"
    sweep_dir = tmp_path / "sweep"
    base = ["hydra/sweeper=rnnlab_optuna", f"hydra.sweeper.storage='{storage}'", "hydra.sweeper.study_name=app"]
    with runner(
        calling_file=__file__,
        calling_module=None,
        task_function=objective,
        config_path=None,
        config_name=config_name,
        overrides=[*base, *overrides],
        temp_dir=sweep_dir,
    ):
        path = sweep_dir / "optimization_results.yaml"
        results = yaml.safe_load(path.read_text()) if path.exists() else None
    return optuna.load_study(study_name="app", storage=storage), results


def test_a_plain_hydra_app_gets_complete_trials_valued_by_what_it_returns(hydra_sweep_runner: TSweepRunner, tmp_path: Path) -> None:
    study, results = run_app(
        hydra_sweep_runner,
        tmp_path,
        "hydra/sweeper/sampler=random",
        "hydra.sweeper.sampler.seed=0",
        "hydra.sweeper.n_trials=5",  # in batches of n_jobs=2 (hydra-optuna-sweeper's default): 2, 2, 1
        "x=interval(0, 1)",
        "y=range(0, 2)",
    )
    trials = study.trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 5
    for trial in trials:
        assert trial.distributions == {"x": FloatDistribution(0.0, 1.0), "y": IntDistribution(0, 2)}
        assert trial.value == pytest.approx((trial.params["x"] - 0.5) ** 2 + trial.params["y"])
    best = min(trials, key=lambda t: t.value)
    assert results == {"name": "optuna", "best_params": best.params, "best_value": pytest.approx(best.value)}

    # Run again: hydra-optuna-sweeper's n_trials is what each run launches, into the same study.
    study, _ = run_app(hydra_sweep_runner, tmp_path, "hydra/sweeper/sampler=random", "hydra.sweeper.n_trials=2", "x=interval(0, 1)", "y=0")
    assert len(study.trials) == 7 and all(t.params.keys() == {"x"} for t in study.trials[5:])


def test_a_config_group_is_searched_by_its_options_starting_from_the_composed_one(hydra_sweep_runner: TSweepRunner, tmp_path: Path) -> None:
    study, results = run_app(
        hydra_sweep_runner,
        tmp_path,
        "hydra/sweeper/sampler=random",
        "hydra.sweeper.sampler.seed=0",
        "hydra.sweeper.n_trials=6",
        "hydra.sweeper.enqueue_defaults=true",
        "shape=choice(flat,steep)",
        "x=interval(0, 1)",
        config_name="sweeper_group_app",
    )
    trials = study.trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 6
    assert trials[0].params == {"shape": "steep", "x": 0.0}  # the composed option and value, first
    assert {t.params["shape"] for t in trials} == {"flat", "steep"}
    for trial in trials:  # each trial composed the option it drew: the app's objective counts its k
        assert trial.value == pytest.approx((trial.params["x"] - 0.5) ** 2 + {"flat": 1, "steep": 3}[trial.params["shape"]])
    assert results is not None and results["best_params"]["shape"] == "flat"


def test_several_directions_take_one_returned_value_each(hydra_sweep_runner: TSweepRunner, tmp_path: Path) -> None:
    study, results = run_app(
        hydra_sweep_runner,
        tmp_path,
        "hydra/sweeper/sampler=nsgaii",
        "hydra.sweeper.direction=[minimize,maximize]",
        "hydra.sweeper.n_trials=4",
        "mode=two",
        "x=interval(0, 1)",
    )
    assert [d.name for d in study.directions] == ["MINIMIZE", "MAXIMIZE"]
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 4
    for trial in study.trials:
        assert trial.values == pytest.approx([(trial.params["x"] - 0.5) ** 2, trial.params["x"] * 10])
    assert results is not None and {tuple(s["values"]) for s in results["solutions"]} == {tuple(t.values) for t in study.best_trials}


def test_a_resumed_study_of_a_stateful_sampler_draws_new_values_reproducibly(hydra_sweep_runner: TSweepRunner, tmp_path: Path) -> None:
    # NSGA-II's first generation is random draws from its seeded generator: built with the same seed on resume, it
    # would draw the first run's values again. Each run is reproducible from the study's history.
    def two_runs(folder: Path) -> list[float]:
        settings = ("hydra/sweeper/sampler=nsgaii", "hydra.sweeper.sampler.seed=3", "hydra.sweeper.n_jobs=1", "x=interval(0, 1)", "y=0")
        run_app(hydra_sweep_runner, folder, *settings, "hydra.sweeper.n_trials=3")
        study, _ = run_app(hydra_sweep_runner, folder, *settings, "hydra.sweeper.n_trials=3")
        return [t.params["x"] for t in study.trials]

    drawn = two_runs(tmp_path / "first")
    assert len(drawn) == 6 and len(set(drawn)) == 6
    assert two_runs(tmp_path / "again") == drawn


def test_a_reseedable_sampler_draws_each_trial_from_seed_plus_trial_number(hydra_sweep_runner: TSweepRunner, tmp_path: Path) -> None:
    # Workers of one study that ask at the same instant get distinct trial numbers from the storage, so distinct draws;
    # anything read before asking (such as a count of trials) can be the same for both. Trial 0 belongs to another worker.
    optuna.create_study(study_name="app", storage=f"sqlite:///{tmp_path}/study.db").ask()
    study, _ = run_app(
        hydra_sweep_runner,
        tmp_path,
        "hydra/sweeper/sampler=random",
        "hydra.sweeper.sampler.seed=3",
        "hydra.sweeper.n_trials=3",
        "x=interval(0, 1)",
        "y=range(0, 9)",
    )
    space = {"x": FloatDistribution(0.0, 1.0), "y": IntDistribution(0, 9)}
    ours = study.trials[1:]
    assert [t.number for t in ours] == [1, 2, 3] and all(t.state == TrialState.COMPLETE for t in ours)
    for trial in ours:
        alone = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3 + trial.number)).ask(space)
        assert trial.params == alone.params


@pytest.mark.parametrize("sampler", ["grid", "qmc"])
def test_a_resumed_grid_or_qmc_study_goes_on_with_its_own_seed(hydra_sweep_runner: TSweepRunner, tmp_path: Path, sampler: str) -> None:
    # Their seed orders the grid or scrambles the one sequence the study continues: a resumed run keeps it.
    space = ("x=choice(0.0, 0.25, 0.5, 0.75)", "y=0")
    scrambled = ["+hydra.sweeper.sampler.scramble=true"] if sampler == "qmc" else []  # else QMC's seed decides nothing
    settings = (f"hydra/sweeper/sampler={sampler}", "hydra.sweeper.sampler.seed=3", "hydra.sweeper.n_jobs=1", *scrambled, *space)
    run_app(hydra_sweep_runner, tmp_path / "halves", *settings, "hydra.sweeper.n_trials=2")
    halves, _ = run_app(hydra_sweep_runner, tmp_path / "halves", *settings, "hydra.sweeper.n_trials=2")
    whole, _ = run_app(hydra_sweep_runner, tmp_path / "whole", *settings, "hydra.sweeper.n_trials=4")
    assert [t.params["x"] for t in halves.trials] == [t.params["x"] for t in whole.trials]
    if sampler == "grid":
        assert sorted(t.params["x"] for t in halves.trials) == [0.0, 0.25, 0.5, 0.75]


def test_grid_sampler_walks_every_value_of_the_space_once(hydra_sweep_runner: TSweepRunner, tmp_path: Path) -> None:
    study, _ = run_app(
        hydra_sweep_runner, tmp_path, "hydra/sweeper/sampler=grid", "hydra.sweeper.n_trials=100", "x=choice(0.0, 1.0)", "y=range(0, 2)"
    )
    assert sorted((t.params["x"], t.params["y"]) for t in study.trials) == [(x, y) for x in (0.0, 1.0) for y in (0, 1, 2)]


def test_custom_search_space_suggests_keys_the_trials_receive(hydra_sweep_runner: TSweepRunner, tmp_path: Path) -> None:
    study, _ = run_app(
        hydra_sweep_runner,
        tmp_path,
        f"hydra.sweeper.custom_search_space={__name__}.extend",
        "hydra.sweeper.n_trials=3",
        "x=0.5",
        "y=0",
    )
    for trial in study.trials:
        assert 5 <= trial.params["z"] <= 7 and trial.value == trial.params["z"]  # x, y fixed: the objective is z


def test_a_failed_trial_stops_the_sweep_at_max_failure_rate_zero(hydra_sweep_runner: TSweepRunner, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_:
        run_app(hydra_sweep_runner, tmp_path, "hydra.sweeper.n_jobs=1", "mode=bad", "x=interval(0, 1)")
    assert exit_.value.code == 2
    study = optuna.load_study(study_name="app", storage=f"sqlite:///{tmp_path}/study.db")
    assert [t.state for t in study.trials] == [TrialState.FAIL]
    assert "Return value must be float-castable. Got 'not a number'" in study.trials[0].user_attrs["error"]


def test_failures_under_max_failure_rate_are_recorded_and_the_sweep_goes_on(hydra_sweep_runner: TSweepRunner, tmp_path: Path) -> None:
    study, results = run_app(
        hydra_sweep_runner, tmp_path, "hydra.sweeper.max_failure_rate=1.0", "hydra.sweeper.n_trials=3", "mode=bad", "x=interval(0, 1)"
    )
    assert [t.state for t in study.trials] == [TrialState.FAIL] * 3
    assert results is None  # no complete trial, no best to write


# ---------------------------------------------------------------------------- the trial side, public API only


def test_a_training_job_opens_its_trial_and_returns_the_best_value_it_reported(tmp_path: Path) -> None:
    storage = str(tmp_path / "study.log")
    study = optuna.create_study(study_name="s", storage=open_storage(storage), direction="maximize")
    study.ask({"x": FloatDistribution(0.0, 1.0)})
    asked = study.ask({"x": FloatDistribution(0.0, 1.0)})
    cfg = OmegaConf.create({"search": {"trial": asked.number, "study": "s", "storage": storage, "pruner": None}})
    with contextlib.ExitStack() as scope:
        trial = open_trial(cfg, scope)
    assert trial is not None and trial.number == 1 and trial.params == asked.params
    for step, value in enumerate([0.5, 0.8, 0.7]):
        trial.report(value, step)
    assert trial_objective(trial) == 0.8
    assert optuna.load_study(study_name="s", storage=open_storage(storage)).trials[1].intermediate_values[1] == 0.8
