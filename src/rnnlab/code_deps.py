"""Which of rnnlab's source files a command runs: the static import graph of the package.

The pipeline's stages depend on the code they execute, no more (`python -m rnnlab.resolve`
writes it per stage), and the layering test reads the same graph. Imports are read from the
source with `ast`, never executed, so nothing heavy loads; imports inside functions count too,
which errs on the side of a dependency too many, never one too few. Standard-library `ast`
rather than modulefinder or importlib: only rnnlab's own modules matter, and they need not import.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

PACKAGE = "rnnlab"
SRC = Path(__file__).resolve().parent.parent  # src/: rnnlab/ and hydra_plugins/ live here
# Files a module compiles or reads as code rather than importing: they change what it runs as much as its own bytes.
COMPANION_SOURCES = {"rnnlab.models.fused": ("rnnlab/models/fused_scan.cpp",)}


def source_file(module: str) -> Path | None:
    """The .py file of a module under src/ (a package's __init__.py), or None if there is none."""
    base = SRC.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def module_of(dotted: str) -> str | None:
    """The longest prefix of a dotted path (a module, or an object in one) that is a module under src/."""
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        module = ".".join(parts[:end])
        if source_file(module) is not None:
            return module
    return None


@functools.cache
def imports_of(module: str) -> frozenset[str]:
    """The modules under src/ that `module` imports anywhere in its source, including their parent packages."""
    path = source_file(module)
    if path is None and SRC.joinpath(*module.split(".")).is_dir():
        return frozenset()  # a namespace package (hydra_plugins) has no code of its own
    if path is None:
        raise ModuleNotFoundError(f"no source file for {module!r} under {SRC}")
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, is_package, node.module, node.level)
            # `from a import b` imports a.b when b is a module, else the object b of a.
            names = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        for name in names:
            target = module_of(name)
            if target is not None:
                found.update(_with_parents(target))
    found.discard(module)
    return frozenset(found)


def external_imports(module: str, dotted: bool = False) -> frozenset[str]:
    """The third-party modules `module` imports anywhere in its source: neither under src/ nor in the standard
    library. Top-level package names (`mlflow`), or with `dotted` the imported paths (`lightning.pytorch.loggers`;
    `from a import b` gives both `a` and `a.b`, as b may be a module)."""
    path = source_file(module)
    if path is None:
        raise ModuleNotFoundError(f"no source file for {module!r} under {SRC}")
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:  # relative imports are the package's own
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names if alias.name != "*")]
        else:
            continue
        for name in names:
            top = name.partition(".")[0]
            if top not in sys.stdlib_module_names and module_of(top) is None:
                found.add(name if dotted else top)
    return frozenset(found)


def closure(modules: Iterable[str]) -> set[str]:
    """`modules` and everything under src/ they import, directly or not."""
    seen: set[str] = set()
    todo = [m for module in modules for m in _with_parents(module)]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(imports_of(module) - seen)
    return seen


def import_graph(package: str = PACKAGE) -> dict[str, frozenset[str]]:
    """Every module of `package` and the package's modules it imports."""
    root = SRC / package
    modules = [".".join(p.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__") for p in sorted(root.rglob("*.py"))]
    return {module: frozenset(m for m in imports_of(module) if m == package or m.startswith(package + ".")) for module in modules}


def named_modules(values: Any) -> set[str]:
    """The modules under src/ that dotted strings in a config name, at any depth (`rnnlab.models.cells.GRU` ->
    rnnlab.models.cells): what Hydra's instantiate and get_class import at run time, out of sight of `ast`."""
    if isinstance(values, Mapping):
        return set().union(*(named_modules(v) for v in values.values()))
    if isinstance(values, list | tuple):
        return set().union(*(named_modules(v) for v in values))
    if isinstance(values, str) and values.startswith((f"{PACKAGE}.", "hydra_plugins.")):
        module = module_of(values)
        return {module} if module else set()
    return set()


@functools.cache
def _providers() -> Mapping[str, list[str]]:
    """Top-level package -> the installed distributions that provide it. Scanning every installed distribution's
    files takes about a second; compare asks once per champion it registers."""
    from importlib.metadata import packages_distributions

    return packages_distributions()


def requirements(modules: Iterable[str]) -> list[str]:
    """`name==version` of every installed distribution that provides a third-party package these modules import."""
    from importlib.metadata import version

    providers = _providers()
    imported = set().union(*(external_imports(module) for module in modules))
    names = sorted({name for top in imported for name in providers.get(top, [])}, key=str.lower)
    return [f"{name}=={version(name).split('+')[0]}" for name in names]  # torch's local tag (+cpu, +cu128) is no PyPI version


def file_hashes(modules: Iterable[str]) -> dict[str, str]:
    """Source path (relative to src/) -> sha256 of its bytes, for each module and its COMPANION_SOURCES: what a
    stage's code is."""
    hashes = {}
    for module in sorted(modules):
        path = source_file(module)
        paths = [] if path is None else [path]
        paths += [SRC / name for name in COMPANION_SOURCES.get(module, ())]
        for path in paths:
            hashes[path.relative_to(SRC).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return hashes


def _absolute(module: str, is_package: bool, name: str | None, level: int) -> str:
    if level == 0:
        return name or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    base = package[: len(package) - (level - 1)]
    return ".".join([*base, name] if name else base)


def _with_parents(module: str) -> list[str]:
    """`a.b.c` -> a, a.b, a.b.c: importing a module runs its packages' __init__ first."""
    parts = module.split(".")
    return [".".join(parts[:end]) for end in range(1, len(parts) + 1)]
