"""The C++ loops of rnnlab's cells (fused_scan.cpp), built once per venv: `python -m rnnlab.models.fused build`.

`make install` runs the build, which compiles fused_scan.cpp with torch's C++ extension tools into
<venv>/rnnlab-kernels/<key>, the key naming the torch version and a hash of the source and the compile flags: a
build is only ever loaded by the torch and the source it was made from. `kernels()` returns the loaded build, or
None when there is none (never built, the source changed since, no compiler on the machine) or RNNLAB_FUSED=0 is
set (A/B benchmarks, bisecting); the cells then run their Python loops, which compute the same.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.util
import logging
import os
import shutil
import sys
import sysconfig
import warnings
from pathlib import Path
from types import ModuleType

import torch

SOURCE = Path(__file__).with_name("fused_scan.cpp")
NAME = "rnnlab_fused_scan"
ROOT = Path(sys.prefix) / "rnnlab-kernels"  # inside the venv, so a new venv builds afresh
SWITCH = "RNNLAB_FUSED"

# Per build file: the module, or None for one that failed to load (warned once). A missing file is not cached:
# `make install` may build it while this process runs.
_loaded: dict[Path, ModuleType | None] = {}


# The instruction sets of each vector width ATen runs at (torch.backends.cpu.get_cpu_capability()).
VECTOR_FLAGS = {
    "AVX512": ("-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mfma", "-mf16c"),
    "AVX2": ("-mavx2", "-mfma", "-mf16c"),
}


@functools.cache
def _flags() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(compiler flags, linker flags). With AVX2 or AVX-512, the vector width ATen itself runs at here, ATen's Vectorized
    exp and tanh are SLEEF's, exported by libtorch_cpu, as in torch's own CPU kernels (the flags torch.compile's C++
    kernels use); without either, ATen's portable vector type. OpenMP, as torch's Linux wheels use it, lets
    at::parallel_for split a large step across threads."""
    compile_flags = ["-O3"]
    capability = torch.backends.cpu.get_cpu_capability()  # ATEN_CPU_CAPABILITY=avx2 picks the narrower build
    if capability in VECTOR_FLAGS:
        compile_flags += [*VECTOR_FLAGS[capability], f"-DCPU_CAPABILITY={capability}", f"-DCPU_CAPABILITY_{capability}"]
    link_flags: list[str] = []
    if sys.platform == "linux" and torch.backends.openmp.is_available():
        compile_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    return tuple(compile_flags), tuple(link_flags)


@functools.cache
def _digest(source: Path) -> str:
    """The build key's hash: the source's bytes and the flags, so that a changed source or flag is never loaded."""
    compile_flags, link_flags = _flags()
    return hashlib.sha256(source.read_bytes() + "\0".join((*compile_flags, *link_flags)).encode()).hexdigest()[:16]


def build_directory(root: Path | None = None) -> Path:
    """Where the build for this torch, this source and this machine's flags lives, under `root` (the venv's by default)."""
    return (root or ROOT) / f"torch-{torch.__version__}-{_digest(SOURCE)}"


def build(build_dir: Path | None = None) -> ModuleType:
    """Compile fused_scan.cpp into `build_dir` (this venv's build directory by default) and load it; raises if either fails."""
    from torch.utils import cpp_extension  # imports setuptools and the compiler checks: only when building

    directory = build_dir or build_directory()
    directory.mkdir(parents=True, exist_ok=True)
    if shutil.which("ninja") is None:  # the venv's python run without activating the venv: its ninja is not on PATH
        os.environ["PATH"] = sysconfig.get_path("scripts") + os.pathsep + os.environ.get("PATH", "")
    compile_flags, link_flags = _flags()
    return cpp_extension.load(
        name=NAME,
        sources=[str(SOURCE)],
        build_directory=str(directory),
        extra_cflags=list(compile_flags),
        extra_ldflags=list(link_flags),
        verbose=False,
    )


def installed() -> ModuleType | None:
    """This venv's build for the current torch and source, loaded; None if there is none."""
    if not SOURCE.is_file():  # a copy of the package without its C++ source: no build can be matched to it
        return None
    path = build_directory() / f"{NAME}.so"
    if path not in _loaded:
        if not path.is_file():
            return None
        _loaded[path] = _import(path)
    return _loaded[path]


def kernels() -> ModuleType | None:
    """The C++ loops the cells call, or None (RNNLAB_FUSED=0, or no build): the cells then run their Python loops."""
    return None if os.environ.get(SWITCH) == "0" else installed()


def _import(path: Path) -> ModuleType | None:
    """The extension module built at `path`, or None with a warning if it does not load."""
    spec = importlib.util.spec_from_file_location(NAME, path)
    assert spec is not None and spec.loader is not None  # a path ending in .so always has a loader
    try:
        module = importlib.util.module_from_spec(spec)  # an extension module is loaded (dlopen) here
        spec.loader.exec_module(module)
    except (ImportError, OSError) as error:  # a build this torch cannot load: say so once, and run the Python loops
        warnings.warn(
            f"rnnlab: the fused kernels at {path} do not load ({error}); the cells run their Python loops. "
            "Rebuild them with: python -m rnnlab.models.fused build",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    return module


def _reason(error: BaseException) -> str:
    """The line of a build failure that names its cause: the compiler's first error, else the message's first line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    return next((line for line in lines if "error:" in line), lines[0])[:300]


def _logged(error: BaseException, directory: Path) -> str:
    """'; full message in <log>' once the whole message is written there, else '' (the folder may be what failed)."""
    log = directory / "build.log"
    try:
        log.write_text(f"{type(error).__name__}: {error}\n", encoding="utf-8")
    except OSError:
        return ""
    return f"; full message in {log}"


def main(argv: list[str] | None = None) -> int:
    """`python -m rnnlab.models.fused build [--strict] [--root DIR]`: one line, built where or why not; the exit code."""
    parser = argparse.ArgumentParser(prog="python -m rnnlab.models.fused", description="Build the C++ loops of rnnlab's cells.")
    parser.add_argument("command", choices=["build"])
    parser.add_argument("--strict", action="store_true", help="exit 2 if the build fails (else 0: the Python loops still work)")
    parser.add_argument("--root", type=Path, help=f"build under this folder instead of {ROOT}")
    args = parser.parse_args(argv)
    directory = build_directory(args.root)
    # One line of output: cpp_extension's notes (compiler version, ABI) go to warnings and its logger.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            build(directory)
    except Exception as error:  # whatever failed, the cells still run their Python loops
        print(f"rnnlab.models.fused: not built ({_reason(error)}{_logged(error, directory)}); the cells run their Python loops")
        return 2 if args.strict else 0
    print(f"rnnlab.models.fused: built {directory}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
