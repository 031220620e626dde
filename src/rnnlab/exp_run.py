"""`dvc exp run -S ...`, without its cost per stage: `make smoke` and `make quick` run the pipeline through this.

    python -m rnnlab.exp_run -S profile=smoke -S 'seeds=[42]' -S 'more_seeds=[]'

sets params.yaml as `dvc exp run -S` does (the same parser), runs `dvc repro`, records the result as a DVC
experiment (`dvc exp save`: `dvc exp show` lists it with the params it ran with) and restores params.yaml
byte for byte, whether the run succeeded, failed or was interrupted.

Why not `dvc exp run` itself: after every stage its executor looks up the stage's files through an index of the
whole project, which re-reads every dvc.yaml and dvc.lock (DVC 3.67, `_repro_and_track`); with this project's
~380 KB of locks that is about 1 s a stage, which `dvc repro` does not spend (docs/pipeline.md has the
measurement). The outputs, the locks and the recorded experiment are the same.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

PARAMS = Path("params.yaml")


def _run(command: list[str]) -> int:
    """Run `command` to its end, passing on a SIGTERM this process gets (a scheduler's stop) so that it stops too;
    a Ctrl-C reaches it with the terminal's process group."""
    process = subprocess.Popen(command)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: process.send_signal(signum))
    try:
        while True:
            try:
                return process.wait()
            except KeyboardInterrupt:
                continue  # the command got the same SIGINT: wait until it has stopped, then report its status
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(overrides: Sequence[str], name: str | None = None, params: Path = PARAMS) -> int:
    """The pipeline with `overrides` applied to `params`, saved as an experiment; `params` is restored afterwards."""
    from dvc.exceptions import InvalidArgumentError
    from dvc.utils.hydra import apply_overrides  # DVC's own `-S` (comments and layout kept): both read an override alike

    if not params.is_file():
        print(f"rnnlab.exp_run: {params} not found; run this from the project root.", file=sys.stderr)
        return 2
    original = params.read_bytes()
    try:
        try:
            apply_overrides(params, list(overrides))
        except InvalidArgumentError as error:
            cause = f" ({str(error.__cause__).splitlines()[0]})" if error.__cause__ else ""
            applied = " -S ".join(overrides)
            print(f"rnnlab.exp_run: cannot apply -S {applied}{cause}: use KEY=VALUE with a key of {params}.", file=sys.stderr)
            return 2
        status = _run(["dvc", "repro"])
        if status != 0:
            return status
        # `dvc repro` cached every output already: naming one small stage keeps `exp save` from hashing them all
        # again; the experiment still holds every change git tracks (locks, metrics, reports, params).
        return _run(["dvc", "exp", "save", "--force", *(["--name", name] if name else []), "resolve"])
    finally:
        params.write_bytes(original)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m rnnlab.exp_run", description="dvc exp run -S ..., with dvc repro's speed (see the module's docstring)."
    )
    parser.add_argument("-S", "--set-param", action="append", default=[], metavar="KEY=VALUE", help="as dvc exp run -S")
    parser.add_argument("-n", "--name", help="the experiment's name (default: one DVC makes up)")
    args = parser.parse_args(argv)
    sys.exit(run(args.set_param, args.name))


if __name__ == "__main__":
    main()
