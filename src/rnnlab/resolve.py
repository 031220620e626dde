"""Write what each pipeline stage runs as DVC params: `python -m rnnlab.resolve` (the `resolve` stage).

For the profile and the tasks and models of params.yaml, it composes every stage's Hydra config
as the stage's command would and writes, under resolved/:

- <task>/data.yaml: the fetch and preprocess settings and the code each of them runs;
- <task>/<model>.yaml: the training's main hyperparameters (`hparams`, shown by `dvc exp show`),
  its whole composed config, the code it runs, and a `digest` of both (what the stage lists, with hparams);
- <task>/baselines.yaml: the settings and code of the task's baseline (tasks in `baseline_tasks`);
- <task>/<model>_lag<L>.yaml: a training of the memory tasks' lag sweep (`memory_tasks` x `models` x `memory_lags`);
- compare.yaml: the comparison's settings, its code and every task's serving code;
- memory_report.yaml: the lag sweep report's settings, what it reads of each memory task's config, its code;
- studies/<task>.yaml: per task of `studied`, what its studies' report reads: the hash of each model's journal
  (optuna/<task>_<model>.log), the task's metric, whether the pipeline trains its tuned cells, and the report's code.

The stages list these files under `params:`, so DVC compares values, not file bytes: a comment
in a config stales nothing, a changed learning rate stales that model's runs only, and an edit
to a source file stales exactly the stages whose code (`code_deps.closure`) holds it.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from rnnlab import code_deps, io
from rnnlab.baselines import baseline_node
from rnnlab.config import config_dir, exit_on_user_error, project_root
from rnnlab.errors import ConfigError

OUT_DIR = "resolved"
# Hydra imports every plugin module on start, so each Hydra command runs the sweeper's module body;
# what the sweeper imports inside its methods runs only in a search, which no stage is.
HYDRA_PLUGINS = ("hydra_plugins.rnnlab_optuna_sweeper",)
# Where a run writes and logs (machine-specific paths), not what it computes.
NOT_RESULTS = ("paths", "tracking", "search", "seed", "resume")
# The main hyperparameters of a training, as `dvc exp show` columns: name -> config key.
HPARAMS = {
    "lr": "optimizer.lr",
    "weight_decay": "optimizer.weight_decay",
    "hidden_size": "model.encoder.hidden_size",
    "num_layers": "model.encoder.num_layers",
    "dropout": "model.encoder.dropout",
    "batch_size": "task.data.batch_size",
    "max_epochs": "trainer.max_epochs",
}
# The settings of conf/memory_report.yaml that decide the lag report (the others say where it reads and writes).
MEMORY_REPORT_SETTINGS = ("tasks", "models", "lags", "seed", "at_chance")


@contextlib.contextmanager
def project_configs() -> Iterator[None]:
    """Hydra's compose API over the project's conf/: initialised once for many composes, or reused if it is."""
    if GlobalHydra.instance().is_initialized():
        yield
        return
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        yield


def compose_run(overrides: Sequence[str], config_name: str = "config") -> DictConfig:
    """The config a command with these overrides runs, with paths relative to the project root
    so that the same checkout gives the same values on any machine."""
    with project_configs():
        return compose(config_name=config_name, overrides=[*overrides, "paths.root=."])


def code_of(entry: str, cfg: Any) -> dict[str, str]:
    """Source file -> hash of everything a command runs: its entry module, Hydra's plugins and every
    rnnlab class or function the config names (`_target_`, `cell`), with all they import."""
    return code_deps.file_hashes({*code_deps.closure([entry, *code_deps.named_modules(cfg)]), *HYDRA_PLUGINS})


def result_config(cfg: DictConfig) -> dict[str, Any]:
    """The part of a training's config that decides its result: no paths, tracking or seed, nor other stages' settings."""
    config = _without_paths(cfg)
    for key in NOT_RESULTS:
        config.pop(key, None)
    # Other stages' settings (training reads their outputs) and what the report says the test set is: no part of a result.
    for key in ("fetch", "preprocess", "baselines", "predictor", "test_set", "test_set_by_source"):
        config["task"].pop(key, None)
    return config


def training_params(cfg: DictConfig) -> dict[str, Any]:
    """A training's DVC params: its main hyperparameters, the config that decides its result, its code."""
    config = result_config(cfg)
    hparams = {name: OmegaConf.select(cfg, key) for name, key in HPARAMS.items()}
    code = code_of("rnnlab.train", config)
    # What the training stages (pipelines/*/dvc.yaml) list as params: the hyperparameters, and a digest of the config and
    # of the code. Listing the whole file would copy ~100 lines per training into their dvc.lock, which DVC rewrites
    # after every stage; `git diff resolved/` shows what a changed digest stands for.
    digest = {"config": _digest(config), "code": _digest(code)}
    return {"hparams": hparams, "digest": digest, "config": config, "code": code}


def _digest(values: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()


def data_params(cfg: DictConfig) -> dict[str, Any]:
    """Fetch's and preprocess's DVC params: each one's settings and code."""
    fetch = OmegaConf.to_container(cfg.task.fetch, resolve=True)
    preprocess = OmegaConf.to_container(cfg.task.preprocess, resolve=True)
    return {
        "fetch": fetch,
        "fetch_code": code_of("rnnlab.fetch", fetch),
        "preprocess": preprocess,
        "preprocess_code": code_of("rnnlab.preprocess", preprocess),
    }


def baseline_params(cfg: DictConfig) -> dict[str, Any]:
    """A baseline stage's DVC params: the task's baseline settings, the data module's (its limits decide the splits,
    its layout the test units), its code."""
    if baseline_node(cfg.task) is None:
        raise ConfigError(
            f"baseline_tasks lists {cfg.task.name}, whose config has no `baselines:` with a `_target_`: add one "
            f"(docs/development.md, Adding a task) or drop {cfg.task.name} from baseline_tasks in params.yaml."
        )
    settings = OmegaConf.to_container(cfg.task.baselines, resolve=True)
    data = {key: value for key, value in OmegaConf.to_container(cfg.task.data, resolve=True).items() if key != "processed_dir"}
    return {"baselines": settings, "data": data, "code": code_of("rnnlab.baselines", [settings, data])}


def compare_params(profile: str, tasks: Iterable[str]) -> dict[str, Any]:
    """The comparison's settings and code, with each task's serving code (the champions' predictors)."""
    cfg = compose_run([f"profile={profile}"], config_name="compare")
    # Its own settings (conf/compare.yaml's keys), not those of the training config it extends, which it never reads (a
    # default task's would make that task's baseline code and config a dependency of the comparison).
    own = set(OmegaConf.load(config_dir() / "compare.yaml")) - {"defaults", "hydra", "metrics_dir", "output_dir"}
    settings = {key: value for key, value in OmegaConf.to_container(cfg, resolve=True).items() if key in own}
    settings["tracking"].pop("registered_model", None)  # the default task's and model's name: compare names its own
    predictors = [OmegaConf.to_container(compose_run([f"task={task}"]).task.predictor, resolve=True) for task in tasks]
    return {"compare": settings, "code": code_of("rnnlab.compare", [settings, predictors])}


def memory_report_params(profile: str, params: dict[str, Any]) -> dict[str, Any]:
    """The lag sweep report's settings, what it reads of each memory task's config (rnnlab.memory_report.task_settings:
    the primary metric, its direction and the problem that sets the chance level), and its code."""
    # The sweep as the stage's command reads it from params.yaml (conf/memory_report.yaml's ${pipeline_param:...}).
    sweep = {"tasks": params["memory_tasks"], "models": params["models"], "lags": params["memory_lags"]}
    overrides = [f"{key}=[{','.join(map(str, values))}]" for key, values in sweep.items()]
    cfg = compose_run([f"profile={profile}", *overrides], config_name="memory_report")
    settings = {key: OmegaConf.to_container(cfg, resolve=True)[key] for key in MEMORY_REPORT_SETTINGS}
    tasks = {}
    for task in settings["tasks"]:
        task_cfg = compose_run([f"task={task}", f"profile={profile}"]).task
        fetch = {key: value for key, value in OmegaConf.to_container(task_cfg.fetch, resolve=True).items() if key != "out_dir"}
        tasks[task] = {"primary_metric": task_cfg.primary_metric, "monitor_mode": task_cfg.monitor_mode, "fetch": fetch}
    return {"report": settings, "tasks": tasks, "code": code_of("rnnlab.memory_report", settings)}


def lag_run(task: str, model: str, lag: int) -> tuple[str, str, list[str]]:
    """A training of the lag sweep, as pipelines/lags/dvc.yaml's train_lag runs it: model <model>_lag<L>
    (conf/experiment/memory_lag.yaml)."""
    name = f"{model}_lag{lag}"
    return task, name, ["experiment=memory_lag", f"task={task}", f"model={model}", f"task.data.lag={lag}", f"model.name={name}"]


def stage_models(params: dict[str, Any]) -> list[tuple[str, str, list[str]]]:
    """(task, model name, overrides) of every training the pipeline runs, as the pipeline's dvc.yaml files list them."""
    defaults = [*params["models"], *params["single_seed_models"]]
    runs = [(task, model, [f"task={task}", f"model={model}"]) for task in params["default_tasks"] for model in defaults]
    runs += [(task, f"{model}_tuned", [f"experiment={task}_{model}_tuned"]) for task, model in tuned_pairs(params)]
    runs += [lag_run(task, model, lag) for task in params["memory_tasks"] for model in params["models"] for lag in params["memory_lags"]]
    return runs


def tuned_pairs(params: dict[str, Any]) -> list[tuple[str, str]]:
    """(task, model) of every tuned configuration the pipeline trains: each model of `models` on each task of `tuned`,
    so that the tuned cells of a task are compared with each other (each searched with the same budget)."""
    return [(task, model) for task in params["tuned"] for model in params["models"]]


def tuned_default(task: str, tuned_model: str, composed: Mapping[str, dict[str, Any]] | None = None) -> str | None:
    """The default model that `tuned_model` (<model>_tuned, conf/experiment/<task>_<model>_tuned.yaml) equals on `task`,
    if its study found nothing better than the default configuration; else None (also for a model of no study).
    A fact about the study, so decided on the default profile: the smoke profile's width and epochs would make
    configurations that differ only there look equal. `composed`: default-profile result configs already at hand, by
    `<task>/<model>` (the others are composed: ~0.3 s each)."""
    model = tuned_model.removesuffix("_tuned")
    if model == tuned_model or not (config_dir() / "experiment" / f"{task}_{tuned_model}.yaml").is_file():
        return None
    composed = composed or {}

    def config(name: str, overrides: list[str]) -> dict[str, Any]:
        return composed[name] if name in composed else result_config(compose_run([*overrides, "profile=default"]))

    with project_configs():
        tuned = config(f"{task}/{tuned_model}", [f"experiment={task}_{tuned_model}"])
        default = config(f"{task}/{model}", [f"task={task}", f"model={model}"])
    return model if _unnamed(tuned) == _unnamed(default) else None


def write_all(root: Path) -> list[Path]:
    """Resolve every stage of params.yaml into root/resolved (replaced as a whole)."""
    params = pipeline_params(root / "params.yaml")
    _check_studies_exist(root, params)
    profile = params["profile"]
    files: dict[str, dict[str, Any]] = {}
    with project_configs():
        for task in params["tasks"]:
            files[f"{task}/data.yaml"] = data_params(compose_run([f"task={task}", f"profile={profile}"]))
        for task in params["baseline_tasks"]:
            files[f"{task}/baselines.yaml"] = baseline_params(compose_run([f"task={task}", f"profile={profile}"], "baselines"))
        for task, model in tuned_pairs(params):
            _check_tuned_exists(root, task, model)
        _check_lag_sweep(params, files)
        for task, model, overrides in stage_models(params):
            files[f"{task}/{model}.yaml"] = training_params(compose_run([*overrides, f"profile={profile}"]))
        # Per tuned model, the default it equals (or null): the report marks it; listed among compare's params, a change
        # of that fact reruns the comparison.
        at_hand = {name.removesuffix(".yaml"): values["config"] for name, values in files.items() if "hparams" in values}
        composed = at_hand if profile == "default" else None
        same = {f"{task}/{model}_tuned": tuned_default(task, f"{model}_tuned", composed) for task, model in tuned_pairs(params)}
        for task, model in tuned_pairs(params):
            if task in params["default_tasks"] and same[f"{task}/{model}_tuned"]:
                _refuse_tuned_twice(task, model)
        files["compare.yaml"] = {**compare_params(profile, params["tasks"]), "tuned_as_default": same}
        files["memory_report.yaml"] = memory_report_params(profile, params)
        report_code = code_of("rnnlab.study_report", {})  # one module for every task's report: hashed once
        for task in params["studied"]:
            files[f"studies/{task}.yaml"] = study_report_params(root, task, params, report_code)
    with io.atomic_dir(root / OUT_DIR) as tmp:
        for name, values in files.items():
            path = tmp / name
            path.parent.mkdir(parents=True, exist_ok=True)
            header = f"# python -m rnnlab.resolve (profile {profile}): what this stage runs. Edit conf/ and params.yaml, not this file.\n"
            path.write_text(header + OmegaConf.to_yaml(OmegaConf.create(values)))
    return [root / OUT_DIR / name for name in files]


def study_report_params(root: Path, task: str, params: dict[str, Any], code: dict[str, str]) -> dict[str, Any]:
    """What the report of a task's studies reads (rnnlab.study_report): each model's journal, by hash, the metric its
    title names, whether the pipeline trains the tuned cells (the report says where their test scores are), its code."""
    journals = [_journal(root, task, model) for model in params["models"]]
    return {
        "journals": {str(path.relative_to(root)): io.sha256(path) for path in journals},
        "metric": studied_metric(task),
        "pipeline_trains_tuned": task in params["tuned"],
        "code": code,
    }


def studied_metric(task: str) -> str:
    """The validation metric a task's studies optimise: its `monitor`."""
    return str(compose_run([f"task={task}"]).task.monitor)


def _check_studies_exist(root: Path, params: dict[str, Any]) -> None:
    """Every tuned task is studied (its report is how a reader checks the tuning), and every task of `studied` has a
    journal for every model of `models`, so that its report sets the cells side by side."""
    unreported = [task for task in params["tuned"] if task not in params["studied"]]
    if unreported:
        raise ConfigError(
            f"tuned in params.yaml lists {', '.join(unreported)}, which studied lacks: add it to studied, so that the "
            "study_report stage reports the studies its tuned configurations come from."
        )
    unknown = [task for task in params["studied"] if not (root / "conf" / "task" / f"{task}.yaml").is_file()]
    if unknown:
        raise ConfigError(f"studied in params.yaml lists {', '.join(unknown)}, which conf/task/ does not hold: check the spelling.")
    missing = [(task, model) for task in params["studied"] for model in params["models"] if not _journal(root, task, model).is_file()]
    if missing:
        tasks = ", ".join(dict.fromkeys(task for task, _ in missing))
        journals = ", ".join(str(_journal(root, task, model).relative_to(root)) for task, model in missing)
        task, model = missing[0]
        raise ConfigError(
            f"studied in params.yaml lists {tasks}, whose journals {journals} do not exist: run each missing study, e.g. "
            f"{study_command(task, model)}; or drop {tasks} from studied."
        )


def _journal(root: Path, task: str, model: str) -> Path:
    return root / "optuna" / f"{task}_{model}.log"


def study_command(task: str, model: str) -> str:
    """The command that runs `model`'s study on `task`: its search config is conf/hparams_search/<task>.yaml, or that of
    the family the task's name starts with (forecast for forecast_stock)."""
    searches = sorted(path.stem for path in (config_dir() / "hparams_search").glob("*.yaml"))
    search = next((name for name in (task, task.split("_")[0]) if name in searches), "<a config of conf/hparams_search/>")
    return f"python -m rnnlab.train -m hparams_search={search} task={task} model={model}"


def _check_tuned_exists(root: Path, task: str, model: str) -> None:
    if not (root / "conf" / "experiment" / f"{task}_{model}_tuned.yaml").is_file():
        raise ConfigError(
            f"tuned in params.yaml lists {task}, but conf/experiment/{task}_{model}_tuned.yaml does not exist: run its study "
            f"({study_command(task, model)}) or remove {task} from `tuned`."
        )


def _refuse_tuned_twice(task: str, model: str) -> None:
    """A tuned configuration equal to the default of a task that default_tasks also trains would train the same runs
    twice under two names: refuse it. (On a task of `tuned` alone it is that cell's tuned entry, marked in the report.)"""
    raise ConfigError(
        f"tuned in params.yaml lists {task}, but conf/experiment/{task}_{model}_tuned.yaml is model={model}'s default "
        f"configuration for task={task} (its study found nothing better) and default_tasks trains that default too, so "
        f"{model}_tuned's runs would repeat {model}'s: drop {task} from default_tasks (the report then marks {model}_tuned "
        f"as the default), or from `tuned`."
    )


def _unnamed(config: dict[str, Any]) -> dict[str, Any]:
    """A training's result config without its model name, to compare two configurations."""
    return {**config, "model": {key: value for key, value in config["model"].items() if key != "name"}}


def _check_lag_sweep(params: dict[str, Any], files: dict[str, dict[str, Any]]) -> None:
    """Refuse a lag sweep that would train on data the pipeline never makes: a memory task outside `tasks` (not
    fetched nor preprocessed) or a lag that its task.preprocess.lags does not generate."""
    for task in params["memory_tasks"]:
        if task not in params["tasks"]:
            raise ConfigError(
                f"memory_tasks in params.yaml has {task}, which is not in `tasks` (its data is not made): add it to tasks, or drop "
                "it from memory_tasks (memory_tasks=[] sweeps no lag)."
            )
        generated = files[f"{task}/data.yaml"]["preprocess"].get("lags")
        if not isinstance(generated, list):
            raise ConfigError(f"memory_tasks in params.yaml has {task}, which has no task.preprocess.lags: list only memory tasks there.")
        missing = [lag for lag in params["memory_lags"] if lag not in generated]
        if missing:
            raise ConfigError(
                f"memory_lags in params.yaml has {', '.join(map(str, missing))}, which conf/task/{task}.yaml does not preprocess "
                f"(task.preprocess.lags: {generated}); add them there or drop them from memory_lags."
            )


def pipeline_params(path: Path) -> dict[str, Any]:
    """params.yaml's pipeline lists, checked (each refusal names the key and the fix), with the optional ones filled in."""
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: run from the rnnlab checkout, which holds params.yaml.")
    params = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    missing = [key for key in ("profile", "tasks", "models", "single_seed_models", "tuned") if key not in params]
    if missing:
        raise ConfigError(f"{path} lacks {', '.join(missing)}: restore them from git (git checkout -- params.yaml).")
    params["tuned"] = _task_list(params, "tuned", "tasks", path, "[forecast]", " whose every model has a tuned configuration")
    _check_default_tasks(params, path)
    _check_more_seeds(params, path)
    _check_studied(params, path)
    params["baseline_tasks"] = _task_list(params, "baseline_tasks", "tasks", path, "[sentiment]")
    params.setdefault("memory_tasks", [])
    params.setdefault("memory_lags", [])
    return params


def _task_list(params: dict[str, Any], key: str, within: str, path: Path, example: str, which: str = "") -> list[str]:
    """params[key] (none if absent or null), refused unless it lists tasks of params[within]."""
    tasks = params.get(key) or []
    if not isinstance(tasks, list) or not set(tasks) <= set(params[within]):
        raise ConfigError(f"{key} in {path} must list tasks of `{within}`{which}, e.g. {example}; got {tasks!r}.")
    return tasks


def _check_studied(params: dict[str, Any], path: Path) -> None:
    """`studied` (none if absent; then `tuned` must be empty too): the tasks whose studies the study_report stage reports."""
    studied = params.get("studied") or []
    if not isinstance(studied, list) or not all(isinstance(task, str) for task in studied) or len(set(studied)) < len(studied):
        raise ConfigError(
            f"studied in {path} must be a list of distinct tasks whose every model has a study, e.g. [forecast]; got {studied!r}."
        )
    params["studied"] = studied


def _check_default_tasks(params: dict[str, Any], path: Path) -> None:
    """`default_tasks` (every task of `tasks` if absent) train their models' default configurations (pipelines/train/dvc.yaml's
    train and train_single_seed), the tasks of `tuned` their tuned ones; a task in neither would be fetched for nothing."""
    params.setdefault("default_tasks", params["tasks"])
    default_tasks = _task_list(params, "default_tasks", "tasks", path, "[sentiment, speech]")
    untrained = [task for task in params["tasks"] if task not in default_tasks and task not in params["tuned"]]
    if untrained:
        raise ConfigError(
            f"tasks in {path} lists {', '.join(untrained)}, which neither default_tasks nor tuned lists, so no model would train "
            "on it: add it to default_tasks (or to tuned), or drop it from tasks."
        )
    params["default_tasks"] = default_tasks


def _check_more_seeds(params: dict[str, Any], path: Path) -> None:
    """`more_seeds` trains the default models of the tasks of `more_seeds_tasks` over more seeds (pipelines/train/dvc.yaml's
    train_more), and the tuned models of the tasks of `more_seeds_tuned` (train_tuned_more): a task with both default and
    tuned models must be in both lists or in neither, or one kind would have seeds the other lacks and compare could not
    pair them."""
    more_seeds = params.get("more_seeds") or []
    more_tasks = _task_list(params, "more_seeds_tasks", "default_tasks", path, "[speech]")
    more_tuned = _task_list(params, "more_seeds_tuned", "tuned", path, "[speech]")
    uneven = [task for task in params["tuned"] if task in params["default_tasks"] and (task in more_tasks) != (task in more_tuned)]
    if more_seeds and uneven:
        raise ConfigError(
            f"{', '.join(uneven)} in {path} trains default and tuned models, but only one of more_seeds_tasks and more_seeds_tuned "
            "lists it, so one kind would lack seeds of more_seeds: list it in both, or in neither (or set more_seeds: [])."
        )
    params["more_seeds_tasks"], params["more_seeds_tuned"] = more_tasks, more_tuned


def _without_paths(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config without the values taken from `paths` (where a run reads and writes, such as
    its checkpoint folder, which names the seed): DVC tracks the data itself, and outputs are not inputs."""
    cfg = cfg.copy()
    OmegaConf.set_struct(cfg, False)
    _drop_path_values(cfg)
    return OmegaConf.to_container(cfg, resolve=True)


def _drop_path_values(node: DictConfig) -> None:
    for key in list(node.keys()):
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            _drop_path_values(child)
        elif child._is_interpolation() and "${paths." in str(child._value()):
            del node[key]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    with exit_on_user_error():
        written = write_all(project_root())
    print(f"resolved {len(written)} stage configs into {OUT_DIR}/")


if __name__ == "__main__":
    main()
