"""Atomic file writes: a killed stage never leaves an output that looks complete."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; on success it replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    tmp_path.chmod(0o644)  # mkstemp's 0600 would leave outputs unreadable to others
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def json_text(data: Any) -> str:
    """The project's JSON file format: indented, keys sorted (stable diffs), a final newline."""
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json_text(data))


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory that replaces `path` (and its old contents) on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    tmp.chmod(0o755)
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def staged_sibling(path: str | Path, folder: bool) -> Path:
    """A new temporary file or folder beside `path`, for publish() to move into its place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if folder:
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
        tmp.chmod(0o755)
        return tmp
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    Path(name).chmod(0o644)  # mkstemp's 0600 would leave outputs unreadable to others
    return Path(name)


def remove(path: Path) -> None:
    """Delete a file or a folder tree, if there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def publish(staged: list[tuple[Path, Path]]) -> None:
    """Move each staged (temporary, target) pair into place, in order, all or none: a target's earlier version is set
    aside until every move has succeeded, and put back if one fails (os.replace alone is atomic per path only)."""
    done: list[tuple[Path, Path | None]] = []
    try:
        for tmp, target in staged:
            aside = None
            if target.exists():
                aside = staged_sibling(target, folder=False)  # a free name; replaced by the old version below
                aside.unlink()
                os.replace(target, aside)
            done.append((target, aside))
            os.replace(tmp, target)
    except BaseException:
        for target, aside in reversed(done):  # each put back on its own: one that fails leaves the others restored
            with contextlib.suppress(OSError):
                remove(target)
                if aside is not None:
                    os.replace(aside, target)
        raise
    for _, aside in done:
        if aside is not None:
            remove(aside)


def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
