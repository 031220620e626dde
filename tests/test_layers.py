"""The package's layers, read from the source (rnnlab.code_deps) and checked at import time.

Data modules (fetch, preprocess, DataModules) sit below the models, the predictors, serving and tracking:
they import none of them, nor MLflow or Lightning's loggers, not even inside a function. The predictors
(rnnlab.predictors) sit with serving, above the data modules and the models. And no module of rnnlab
imports itself back through others: there is no import cycle.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping

import pytest

from rnnlab import code_deps, serving
from rnnlab.config import config_dir

GRAPH = code_deps.import_graph()
DATA_MODULES = sorted(module for module in GRAPH if module.startswith("rnnlab.data."))
TASK_DATA_MODULES = ["rnnlab.data.sentiment", "rnnlab.data.textgen", "rnnlab.data.speech", "rnnlab.data.forecast", "rnnlab.data.memory"]
# What a data module must not import, directly or through another rnnlab module.
ABOVE_DATA = ("rnnlab.models", "rnnlab.predictors", "rnnlab.serving", "rnnlab.serving_code", "rnnlab.tracking", "rnnlab.callbacks")
THIRD_PARTY_ABOVE_DATA = ("mlflow", "lightning.pytorch.loggers", "pytorch_lightning.loggers")


def within(module: str, prefixes: tuple[str, ...]) -> bool:
    """`module` is one of `prefixes` or a module inside one of them."""
    return any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes)


def import_cycles(graph: Mapping[str, frozenset[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm), each sorted.

    An edge to one of a module's own ancestor packages is left out: code_deps adds the parents of every
    import (importing a.b runs a/__init__.py first), and a package that imports its submodules while they
    import the package is how Python packages work, not a cycle.
    """
    edges = {
        module: sorted(t for t in targets if t in graph and t != module and not module.startswith(t + "."))
        for module, targets in graph.items()
    }
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in edges[module]:
            if target not in index:
                connect(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for module in sorted(edges):
        if module not in index:
            connect(module)
    return sorted(components)


def test_the_cycle_finder_finds_cycles_and_ignores_parent_packages() -> None:
    # data.text <-> models.lm: the cycle this layering removed (data.textgen imported models.language_model inside a
    # function, which imported PAD and UNK from data.textgen), with the parent packages code_deps adds to each import.
    graph = {
        "p": frozenset(),
        "p.data": frozenset({"p"}),
        "p.models": frozenset({"p"}),
        "p.data.text": frozenset({"p", "p.models", "p.models.lm"}),
        "p.models.lm": frozenset({"p", "p.models", "p.data", "p.data.text"}),
    }
    assert import_cycles(graph) == [["p.data.text", "p.models.lm"]]
    # A package that imports its submodule, which imports the package: how packages work, not a cycle.
    graph["p.models"] = frozenset({"p", "p.models.lm"})
    graph["p.models.lm"] = frozenset({"p", "p.models", "p.data"})
    assert import_cycles(graph) == []
    # A cycle through another package's __init__ is one.
    graph["p.data"] = frozenset({"p", "p.models"})
    graph["p.models.lm"] = frozenset({"p", "p.models", "p.data"})
    assert import_cycles(graph) == [["p.data", "p.models", "p.models.lm"]]


def test_rnnlab_has_no_import_cycle() -> None:
    cycles = import_cycles(GRAPH)
    assert not cycles, f"import cycles in src/rnnlab (imports inside functions count): {cycles}"


def test_the_graph_covers_the_layers() -> None:
    # Guards the tests below against passing on an empty or mis-rooted graph.
    assert set(TASK_DATA_MODULES) <= set(DATA_MODULES)
    assert {"rnnlab.vocab", "rnnlab.predictors.base", "rnnlab.serving", "rnnlab.models.language_model"} <= set(GRAPH)
    assert "rnnlab.data.sentiment" in GRAPH["rnnlab.predictors.sentiment"]


@pytest.mark.parametrize("module", DATA_MODULES)
def test_data_modules_import_nothing_above_them(module: str) -> None:
    reached = code_deps.closure([module])
    above = sorted(m for m in reached if within(m, ABOVE_DATA))
    assert not above, f"{module} imports {above} (directly or through {sorted(reached - {module})})"
    third_party = sorted(
        (m, name) for m in reached for name in code_deps.external_imports(m, dotted=True) if within(name, THIRD_PARTY_ABOVE_DATA)
    )
    assert not third_party, f"{module} imports, through (rnnlab module, import): {third_party}"


def test_the_settings_checks_sit_below_the_models() -> None:
    # validation checks a composed config's values before anything is built: it needs neither the models nor torch.
    reached = code_deps.closure(["rnnlab.validation"])
    assert not [m for m in reached if within(m, ("rnnlab.models", "rnnlab.data", *ABOVE_DATA))], sorted(reached)
    assert not any(within(name, ("torch", "lightning")) for m in reached for name in code_deps.external_imports(m, dotted=True))


def test_vocab_is_a_leaf() -> None:
    assert GRAPH["rnnlab.vocab"] == frozenset()
    assert code_deps.external_imports("rnnlab.vocab") == frozenset()


def test_predictors_base_is_free_of_mlflow() -> None:
    reached = code_deps.closure(["rnnlab.predictors.base"])
    assert not [m for m in reached if within(m, ("rnnlab.serving", "rnnlab.tracking", "rnnlab.models"))]
    assert not [(m, name) for m in reached for name in code_deps.external_imports(m) if name == "mlflow"]


@pytest.mark.parametrize("task", sorted(p.stem for p in (config_dir() / "task").glob("*.yaml")))
def test_every_task_names_a_predictor_of_rnnlab_predictors(task: str) -> None:
    target = serving._task_file_predictor(task)
    assert target is not None and target.startswith("rnnlab.predictors."), target
    assert issubclass(serving.predictor_class(target), serving.TaskPredictor)


def test_importing_the_data_modules_loads_neither_mlflow_nor_serving() -> None:
    # A fresh interpreter: this one has long imported MLflow for other tests.
    watched = ["mlflow", "rnnlab.serving", "rnnlab.predictors", "rnnlab.tracking", "rnnlab.models"]
    code = f"import json, sys\nimport {', '.join(TASK_DATA_MODULES)}\nprint(json.dumps([m for m in {watched!r} if m in sys.modules]))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


def test_the_training_command_imports_no_training_library_before_hydra_composes() -> None:
    # `python -m rnnlab.train` answers a misspelt override before torch, Lightning or MLflow load (rnnlab.training does).
    watched = ["torch", "lightning", "mlflow", "rnnlab.training"]
    code = f"import json, sys\nimport rnnlab.train\nprint(json.dumps([m for m in {watched!r} if m in sys.modules]))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


@pytest.mark.parametrize("old", sorted(serving.MOVED_PREDICTORS))
def test_models_registered_before_the_predictors_moved_still_load(old: str) -> None:
    # Their predictor.json and their run's config.yaml name the class where it was: in the task's data module.
    moved = serving.predictor_class(old)
    assert f"{moved.__module__}.{moved.__qualname__}" == serving.MOVED_PREDICTORS[old]
