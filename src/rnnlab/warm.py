"""Run a module in a process forked from a server that has imported it already: a light start.

`python -m rnnlab.warm rnnlab.train task=forecast seed=42` does what `python -m rnnlab.train task=forecast seed=42`
does (the same arguments, working directory, environment, standard streams, signals and exit code), but in a
process forked from a server: the first call starts it, it imports a module the first time one is asked for (torch,
Lightning and MLflow: about 5 s) and forks a child per call. One server serves every module, so what fetch,
preprocess, the baselines and training share (torch, Lightning, pandas) is imported once. The pipeline runs each
training (and each fetch, preprocess, baseline and study report) as its own process, so that each stays its own DVC
stage and MLflow run; this keeps that, without paying the imports 200 times.

Why a server of our own: Python's multiprocessing forkserver serves its own children, not another command's.

Safety, kept small on purpose:
- the server imports a module, then runs its `warm_up()` if it has one (more imports, caches); it runs no torch
  computation (whose OpenMP threads would not survive a fork), and it forks from its one thread; a module that
  fails to import there is left to the fork, which fails as a plain process would;
- a server is keyed by the interpreter, the source files' sizes and times and the environment variables read at
  import (KEY_ENV): after an edit or with other thread settings a new server starts;
- a child whose client is gone (killed, say, with its process group, which the server is not in) gets SIGTERM,
  as a plain process would have ended with the group;
- it exits after IDLE_SECONDS without children; `RNNLAB_WARM=0` (or any failure to reach a server) runs the
  module in a plain process instead (os.execv), which gives the same results.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import hashlib
import importlib
import importlib.util
import json
import os
import random
import runpy
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Environment variables that change what importing the module does (thread pools, module search path).
KEY_ENV = ("PYTHONPATH", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "PYTHONHASHSEED", "CUDA_VISIBLE_DEVICES")
IDLE_SECONDS = float(os.environ.get("RNNLAB_WARM_IDLE", "120"))
START_SECONDS = 60.0  # how long a client waits for a server it started to listen
CLIENT_PID = "RNNLAB_CLIENT_PID"  # set in the child: the process that asked for it (rnnlab.callbacks watches it)
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
_INT = struct.Struct("!i")


def server_key() -> str:
    """What a server must share with its client for a fork to behave as a fresh process would."""
    sources = sorted(Path(__file__).parent.rglob("*.py"))  # rnnlab's own: an edit starts a new server
    stamp = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in sources]
    parts = [sys.executable, stamp, [os.environ.get(key) for key in KEY_ENV], sys.path]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:20]


def socket_path(key: str) -> Path:
    return Path(tempfile.gettempdir()) / f"rnnlab-warm-{os.getuid()}-{key}.sock"


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        print("usage: python -m rnnlab.warm <module> [arguments...]   (RNNLAB_WARM=0: a plain process)", file=sys.stderr)
        sys.exit(2)
    module, args = argv[0], argv[1:]
    if os.environ.get("RNNLAB_WARM") == "0":
        _run_plain(module, args)
    path = socket_path(server_key())
    connection = _connect(path) or _start_server(path)
    if connection is None:
        _run_plain(module, args)
    sys.exit(_ask(connection, module, args, path.with_suffix(".log")))


# ---------------------------------------------------------------------------- the client


def _run_plain(module: str, args: list[str]) -> None:
    os.execv(sys.executable, [sys.executable, "-m", module, *args])


def _connect(path: Path) -> socket.socket | None:
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.connect(str(path))
    except OSError:
        connection.close()
        return None
    return connection


def _start_server(path: Path) -> socket.socket | None:
    """Start a server in its own session (it outlives this client) and wait until it listens."""
    with path.with_suffix(".log").open("ab") as log:  # the server's own errors, if any, for whoever debugs it
        server = subprocess.Popen(
            [sys.executable, "-m", "rnnlab.warm", "--serve", str(path)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline and server.poll() is None:
        connection = _connect(path)
        if connection is not None:
            return connection
        time.sleep(0.05)
    return None


def _ask(connection: socket.socket, module: str, args: list[str], server_log: Path) -> int:
    """Have the server fork a child that runs the module with this process's arguments, directory, environment and
    streams; forward the signals this process gets to it; return its exit code, as a shell reports it. `server_log`: where
    the server writes its own errors."""
    request = json.dumps({"module": module, "args": args, "cwd": os.getcwd(), "env": dict(os.environ), "client": os.getpid()})
    # The child may run (and be signalled through this process) before its pid arrives here: a signal in between waits,
    # blocked, for the handler that forwards it, rather than ending this process alone.
    unblocked = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
    try:
        socket.send_fds(connection, [_INT.pack(len(request)) + request.encode()], [_open_or_null(fd) for fd in (0, 1, 2)])
        child = _INT.unpack(_receive(connection, _INT.size))[0]
        for signum in FORWARDED:
            signal.signal(signum, lambda received, frame: os.kill(child, received))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, unblocked)
    raw = _receive(connection, _INT.size)
    if not raw:  # the server died before its child ended: its status is lost
        print(
            f"rnnlab.warm: the server ended before process {child} did, so its exit status is unknown; see {server_log}, "
            "or run plain processes with RNNLAB_WARM=0.",
            file=sys.stderr,
        )
        return 1
    status = _INT.unpack(raw)[0]
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)  # end as the child did, so that a caller sees the same signal
    return os.waitstatus_to_exitcode(status)


def _open_or_null(fd: int) -> int:
    """`fd` if this process has it open, else /dev/null (a stage may run without a standard input)."""
    try:
        os.fstat(fd)
    except OSError:
        return os.open(os.devnull, os.O_RDWR)
    return fd


def _receive(connection: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = connection.recv(size - len(data))
        if not chunk:
            return b""
        data += chunk
    return data


# ---------------------------------------------------------------------------- the server


def serve(path: Path) -> None:
    """Fork a child per request, its module imported first (once), until IDLE_SECONDS pass without one running."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # a dead server's; a live one would have answered the client
    listener.bind(str(path))
    listener.listen()
    # A child's end wakes the loop at once (SIGCHLD writes to this pipe), so that its client, and the DVC stage
    # waiting on it, hears of it without a polling delay.
    child_ended, wake = os.pipe()
    os.set_blocking(wake, False)
    signal.set_wakeup_fd(wake)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    prepared: set[str] = set()
    children: dict[int, socket.socket] = {}
    stopping: set[int] = set()  # children sent SIGTERM because their client is gone
    idle_since = time.monotonic()
    try:
        while children or time.monotonic() - idle_since < IDLE_SECONDS:
            watched = [listener, child_ended, *(children[pid] for pid in set(children) - stopping)]
            readable, _, _ = select.select(watched, [], [], 1.0)  # a client that closes its connection makes it readable
            if child_ended in readable:
                os.read(child_ended, 4096)
            for pid in set(children) - stopping:
                if children[pid] in readable and _client_gone(children[pid]):
                    stopping.add(pid)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGTERM)
            for pid in list(children):
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    with contextlib.suppress(OSError):
                        children[pid].sendall(_INT.pack(status))
                    children.pop(pid).close()
                    stopping.discard(pid)
                    idle_since = time.monotonic()
            if listener not in readable:
                continue
            connection, _ = listener.accept()
            message, fds, _, _ = socket.recv_fds(connection, 1 << 16, 3)
            length = _INT.unpack(message[: _INT.size])[0]
            body = message[_INT.size :]
            request = json.loads(body + _receive(connection, length - len(body)))
            _prepare(request["module"], prepared)
            pid = os.fork()
            if pid == 0:
                for other in (listener, *children.values()):  # the server's, not this child's
                    other.close()
                signal.set_wakeup_fd(-1)  # as in a fresh interpreter
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                os.close(child_ended)
                os.close(wake)
                _child(request, fds, connection)
            for fd in fds:
                os.close(fd)
            connection.sendall(_INT.pack(pid))
            children[pid] = connection
    finally:
        with contextlib.suppress(FileNotFoundError):
            if os.getpid() == _SERVER_PID:
                path.unlink()


def _prepare(module: str, prepared: set[str]) -> None:
    """Import `module` into the server and run its `warm_up()`, if it has one, the first time it is asked for."""
    if module in prepared:
        return
    prepared.add(module)
    try:
        warm_up = getattr(importlib.import_module(module), "warm_up", None)
        if callable(warm_up):
            warm_up()
    except Exception:  # the fork imports it again and fails as a plain process would; this log is for whoever debugs
        traceback.print_exc()
    gc.freeze()  # the imported objects stay shared with the children instead of being copied by their collector


def _client_gone(connection: socket.socket) -> bool:
    """Whether the client at the other end of a connection that `select` found readable has closed it (a client
    sends nothing after its request, so a readable connection is a closed one or, rarely, a stray byte)."""
    try:
        return connection.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


def _child(request: dict[str, Any], fds: list[int], connection: socket.socket) -> None:
    """In the fork: become the client's process (streams, directory, environment, arguments), run the module as
    `python -m` would, and exit with its code; never return into the server's loop."""
    code, interrupted = 1, False
    try:
        connection.close()
        warnings.filterwarnings("ignore", message=".*found in sys.modules after import of package", category=RuntimeWarning)
        for target, fd in zip((0, 1, 2), fds, strict=True):
            os.dup2(fd, target)
            os.close(fd)
        sys.stdout.reconfigure(line_buffering=os.isatty(1))  # as a fresh interpreter buffers it: the server's is a log file
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        os.environ[CLIENT_PID] = str(request["client"])
        # A fresh interpreter seeds Python's and NumPy's global generators from the OS; forks would share the server's.
        # (torch's starts from a fixed seed in every process, and the server never draws from it.)
        random.seed()
        if "numpy" in sys.modules:
            sys.modules["numpy"].random.seed()
        for signum in FORWARDED:  # as in a fresh interpreter: KeyboardInterrupt on SIGINT, the default for the others
            signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
        spec = importlib.util.find_spec(request["module"])
        sys.argv = [spec.origin if spec and spec.origin else request["module"], *request["args"]]
        try:
            runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
            if not isinstance(stop.code, int | None):
                print(stop.code, file=sys.stderr)
    except KeyboardInterrupt:  # uncaught, it ends a Python process by SIGINT itself, which the client passes on
        traceback.print_exc()
        interrupted = True
    except BaseException:
        traceback.print_exc()
    finally:
        with contextlib.suppress(BaseException):
            atexit._run_exitfuncs()  # what a normal exit runs (MLflow's handlers, say): os._exit skips them
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        if interrupted:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        os._exit(code)


_SERVER_PID = os.getpid()

if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        serve(Path(sys.argv[2]))
    else:
        main()
