"""Project root, config directory and the Hydra entry-point decorator shared by all commands."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from rnnlab.errors import RnnlabError

_SOURCE_CHECKOUT = Path(__file__).resolve().parents[2]


def _is_project(path: Path) -> bool:
    return (path / "conf" / "config.yaml").is_file()


def project_root() -> Path:
    """The rnnlab checkout: $RNNLAB_ROOT, else the nearest parent of the cwd holding
    conf/config.yaml, else the checkout this package was installed from (editable)."""
    env = os.environ.get("RNNLAB_ROOT")
    if env:
        root = Path(env).expanduser().resolve()
        if not _is_project(root):
            raise RnnlabError(f"RNNLAB_ROOT={env} has no conf/config.yaml; point it at an rnnlab checkout.")
        return root
    cwd = Path.cwd().resolve()
    for candidate in (cwd, *cwd.parents):
        if _is_project(candidate):
            return candidate
    if _is_project(_SOURCE_CHECKOUT):
        return _SOURCE_CHECKOUT
    raise RnnlabError("Cannot find the rnnlab project (conf/config.yaml): run from inside the checkout or set RNNLAB_ROOT.")


def config_dir() -> Path:
    return project_root() / "conf"


def pipeline_param(key: str) -> Any:
    """A value of the pipeline's params.yaml (e.g. `seeds`), for configs that must agree with what
    `dvc repro` trains: DVC cannot pass a list on a command line."""
    path = project_root() / "params.yaml"
    params = OmegaConf.load(path) if path.is_file() else OmegaConf.create()
    if key not in params:
        raise RnnlabError(f"{path} has no `{key}`; add it there or set {key}=... on the command line.")
    return OmegaConf.to_container(params, resolve=True)[key]


if not OmegaConf.has_resolver("rnnlab_root"):
    OmegaConf.register_new_resolver("rnnlab_root", lambda: str(project_root()))
    OmegaConf.register_new_resolver("pipeline_param", pipeline_param)


def _find_user_error(err: BaseException | None) -> RnnlabError | None:
    """The RnnlabError behind `err`, also when Hydra's instantiate wrapped it."""
    while err is not None:
        if isinstance(err, RnnlabError):
            return err
        err = err.__cause__ or err.__context__
    return None


@contextlib.contextmanager
def exit_on_user_error() -> Iterator[None]:
    """Turn an RnnlabError (a mistake the user can fix) into a one-line message and exit code 2."""
    try:
        yield
    except Exception as err:
        user_error = _find_user_error(err)
        if user_error is None:
            raise
        print(f"rnnlab: error: {user_error}", file=sys.stderr)
        sys.exit(2)


def hydra_entry(task_function: Callable[[DictConfig], Any] | None = None, *, config_name: str = "config") -> Any:
    """`hydra.main` over the project's conf/, printing RnnlabError as a one-line message
    with exit code 2 instead of a traceback. Use as `@hydra_entry` or `@hydra_entry(config_name=...)`."""
    if task_function is None:
        return functools.partial(hydra_entry, config_name=config_name)

    @functools.wraps(task_function)
    def guarded(cfg: DictConfig) -> Any:
        with exit_on_user_error():
            return task_function(cfg)

    return hydra.main(version_base="1.3", config_path=str(config_dir()), config_name=config_name)(guarded)
