"""rnnlab.exp_run (`make smoke`, `make quick`): params set as `dvc exp run -S` sets them, `dvc repro`, `dvc exp save`,
and params.yaml restored byte for byte whatever happens. A fake `dvc` on PATH records each call and the params
it ran with."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from rnnlab import exp_run

PARAMS = "# the pipeline's knobs\nprofile: default # default | quick | smoke\nseeds: [42, 43, 44]\nmore_seeds: [47, 48]\n"
FAKE_DVC = """#!/bin/sh
echo "dvc $*" >> calls.log
cp params.yaml "params_at_$1.yaml"
if [ "$1" = repro ] && [ -n "$REPRO_WAITS" ]; then
    trap 'echo "got TERM" >> calls.log; exit 143' TERM
    touch repro_started
    sleep 30 & wait
fi
[ "$1" = repro ] && exit "${REPRO_STATUS:-0}"
exit 0
"""


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "params.yaml").write_text(PARAMS)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "dvc").write_text(FAKE_DVC)
    (bin_dir / "dvc").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def calls(project: Path) -> list[str]:
    log = project / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


def test_the_pipeline_runs_with_the_overrides_is_saved_and_params_come_back(project: Path) -> None:
    assert exp_run.run(["profile=smoke", "seeds=[42]", "more_seeds=[]"], name="smoke-1") == 0
    assert calls(project) == ["dvc repro", "dvc exp save --force --name smoke-1 resolve"]
    ran_with = (project / "params_at_repro.yaml").read_text()
    assert yaml.safe_load(ran_with) == {"profile": "smoke", "seeds": [42], "more_seeds": []}
    assert "# the pipeline's knobs" in ran_with  # as dvc exp run -S leaves it: comments kept
    assert (project / "params_at_exp.yaml").read_text() == ran_with  # the experiment records the params it ran with
    assert (project / "params.yaml").read_text() == PARAMS


def test_a_failed_run_is_not_saved_and_its_status_comes_back(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REPRO_STATUS", "3")
    assert exp_run.run(["profile=smoke"]) == 3
    assert calls(project) == ["dvc repro"]
    assert (project / "params.yaml").read_text() == PARAMS


@pytest.mark.parametrize(
    ("override", "reason"), [("nosuch=1", "Could not override 'nosuch'"), ("seeds=[42", "no viable alternative at input '[42'")]
)
def test_a_bad_override_is_one_line_and_runs_nothing(project: Path, capsys: pytest.CaptureFixture[str], override: str, reason: str) -> None:
    with pytest.raises(SystemExit) as stop:
        exp_run.main(["-S", "profile=smoke", "-S", override])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"-S profile=smoke -S {override}" in err and reason in err and "KEY=VALUE" in err
    assert calls(project) == []
    assert (project / "params.yaml").read_text() == PARAMS


def test_outside_a_project_it_says_where_to_run_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert exp_run.run(["profile=smoke"]) == 2
    assert "params.yaml not found; run this from the project root" in capsys.readouterr().err


@pytest.mark.slow
def test_a_sigterm_stops_the_pipeline_and_params_come_back(project: Path) -> None:
    # A scheduler's stop: the SIGTERM reaches `dvc repro` (the fake's trap), whose status is this command's.
    environment = {**os.environ, "REPRO_WAITS": "1"}
    command = [sys.executable, "-m", "rnnlab.exp_run", "-S", "profile=smoke"]
    process = subprocess.Popen(command, cwd=project, env=environment)
    deadline = time.monotonic() + 60
    while not (project / "repro_started").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 143
    assert calls(project) == ["dvc repro", "got TERM"]
    assert (project / "params.yaml").read_text() == PARAMS
