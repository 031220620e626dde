"""rnnlab.warm: a module run in a fork of a warm server behaves as in its own `python -m` process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

TESTS = Path(__file__).parent


def warm(*args: str, cwd: Path, server: int, module: str = "warm_probe", **env: str) -> subprocess.Popen:
    """A probe module through rnnlab.warm; tests running at once (pytest-xdist) keep apart by `server`, a
    PYTHONHASHSEED, which is part of a server's key."""
    path = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    environment = {**os.environ, "PYTHONPATH": path, "RNNLAB_WARM_IDLE": "3", "PYTHONHASHSEED": str(server), **env}
    return subprocess.Popen(
        [sys.executable, "-m", "rnnlab.warm", module, *args],
        cwd=cwd,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def report(process: subprocess.Popen) -> tuple[int, dict, str]:
    out, err = process.communicate(timeout=60)
    return process.returncode, json.loads(out), err


def test_a_warm_run_gets_the_arguments_directory_environment_and_exit_code_of_a_plain_one(tmp_path: Path) -> None:
    runs, results = [], []
    for _ in range(2):  # one after the other, as DVC runs stages: the second finds the first's server
        runs.append(warm("report", "3", "extra", cwd=tmp_path, server=1, PROBE="x"))
        results.append(report(runs[-1]))
    codes, reports, errors = zip(*results, strict=True)
    assert codes == (3, 3) and errors == ("", "")  # nothing printed besides the module's own output
    for run, seen in zip(runs, reports, strict=True):
        assert seen["args"] == ["report", "3", "extra"] and seen["cwd"] == str(tmp_path) and seen["probe"] == "x"
        assert seen["pid"] != run.pid  # a fork of the server, not the client
        assert seen["warmed_in"] == seen["ppid"]  # the server ran the module's warm_up() once, before forking
    assert reports[0]["ppid"] == reports[1]["ppid"]  # the second run reused the first's server
    plain = warm("report", "0", cwd=tmp_path, server=1, RNNLAB_WARM="0")
    code, seen, _ = report(plain)
    assert code == 0 and seen["pid"] == plain.pid  # RNNLAB_WARM=0: the client becomes the module's process
    assert seen["warmed_in"] is None  # warm_up() prepares a server only; a plain run does the work when it needs it


def test_one_server_serves_every_module_and_outlives_one_that_cannot_be_imported(tmp_path: Path) -> None:
    first = report(warm("report", "0", cwd=tmp_path, server=5))[1]
    failed = warm(cwd=tmp_path, server=5, module="no_such_probe")
    _, err = failed.communicate(timeout=60)
    assert failed.returncode == 1 and "No module named no_such_probe" in err
    out, _ = warm(cwd=tmp_path, server=5, module="warm_probe_peer").communicate(timeout=60)
    peer = json.loads(out)
    assert peer["ppid"] == first["ppid"]  # the same server, still up after the failed import
    assert peer["probe_imported"]  # what the server imported for one module, a fork for another finds ready


def test_other_thread_settings_get_another_server(tmp_path: Path) -> None:
    one, two = (report(warm("report", "0", cwd=tmp_path, server=2, OMP_NUM_THREADS=str(n)))[1] for n in (1, 2))
    assert one["ppid"] != two["ppid"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_client_reaches_the_run(tmp_path: Path, signum: int) -> None:
    run = warm("wait", cwd=tmp_path, server=3 + signum)
    assert run.stdout.readline().startswith("ready ")
    run.send_signal(signum)
    out, _ = run.communicate(timeout=60)
    if signum == signal.SIGTERM:
        assert run.returncode == 143 and out == "got SIGTERM\n"  # the module's own handler ran, its exit code came back
    else:
        assert run.returncode == -signal.SIGINT  # killed by the signal, as the module was: the client ends the same way


def test_a_signal_that_reaches_the_client_before_the_childs_pid_is_forwarded_once_the_pid_arrives(tmp_path: Path) -> None:
    # The server's child runs as soon as it is forked, so a stage's SIGTERM can reach the client before the child's pid
    # does (seen once in CI under load: the client died of the signal, the run's own handler never ran). Here the
    # signal comes in exactly that window: the server's answer is replaced by one that signals the client first.
    script = """
import os, signal, socket, subprocess, sys
from rnnlab import warm
handler = "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *_: sys.exit(143)); print(flush=True); time.sleep(60)"
child = subprocess.Popen([sys.executable, "-c", handler], stdout=subprocess.PIPE)
child.stdout.readline()  # its handler is set
answers = iter([
    lambda: (os.kill(os.getpid(), signal.SIGTERM), warm._INT.pack(child.pid))[1],  # the signal, then the child's pid
    lambda: warm._INT.pack(child.wait() << 8),  # its wait status, as the server sends it
])
warm._receive = lambda connection, size: next(answers)()
client, _ = socket.socketpair()
sys.exit(warm._ask(client, "warm_probe", [], tmp_log))
"""
    run = subprocess.run([sys.executable, "-c", f"tmp_log = {str(tmp_path / 'log')!r}" + script], timeout=60)
    assert run.returncode == 143  # the child got the signal and its exit code came back; not -15, the client killed


def test_a_run_whose_client_is_killed_is_stopped(tmp_path: Path) -> None:
    # SIGKILL to a stage's process group reaches the client, not the run forked from the server (in its own session):
    # the server sees the client's connection close and sends the run SIGTERM, as a plain process would have died.
    run = warm("wait", cwd=tmp_path, server=40)
    child = int(run.stdout.readline().split()[1])
    run.kill()
    run.communicate(timeout=60)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and _running(child):
        time.sleep(0.1)
    assert not _running(child)  # it would sleep on for a minute


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # also true for a child that ended but is not yet reaped: the server reaps it at once
    except ProcessLookupError:
        return False
    return True


def test_a_module_that_cannot_be_imported_fails_as_in_a_plain_process(tmp_path: Path) -> None:
    environment = {**os.environ, "RNNLAB_WARM_IDLE": "3", "PYTHONHASHSEED": "99"}
    command = [sys.executable, "-m", "rnnlab.warm", "no_such_probe"]
    failed = subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=30)
    assert failed.returncode == 1 and "No module named no_such_probe" in failed.stderr  # as `python -m no_such_probe` fails


def test_the_training_servers_warm_up_prepares_mlflow() -> None:
    # A warm_up() that failed would leave every pipeline training in a plain, slower process, without a word.
    from rnnlab import train

    train.warm_up()
    assert {"mlflow.pytorch", "mlflow.store.tracking.sqlalchemy_store"} <= set(sys.modules)
