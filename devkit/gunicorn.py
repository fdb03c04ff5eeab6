"""The service as a child process, under gunicorn or any other command: started, and stopped with SIGTERM."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from devkit import ROOT

APP = "consistency_manager_svc:app"
STOP_TIMEOUT = 30.0  # seconds a stop waits after SIGTERM before it sends SIGKILL
# Where a process's stdout and stderr go: appended to a log file, subprocess.DEVNULL, or None for this terminal.
Output = Path | int | None


def command(*args: str, app: str = APP) -> list[str]:
    """Return the command that runs gunicorn of this interpreter on an app (the service's by default)."""
    return [sys.executable, "-m", "gunicorn", app, *args]


def start(
    cmd: list[str], env: dict[str, str], output: Output = None, cwd: Path = ROOT, own_group: bool = False
) -> subprocess.Popen[bytes]:
    """Start a command, by default in the project's folder; own_group gives it a group that os.killpg reaches."""
    with output.open("a") if isinstance(output, Path) else contextlib.nullcontext(output) as out:
        stderr = subprocess.STDOUT if isinstance(output, Path) else out
        # The callers' own commands: gunicorn of this interpreter, the service's entry point, the image's CMD.
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=stderr, start_new_session=own_group)  # noqa: S603


def stop(process: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT) -> int:
    """SIGTERM a process that still runs and return its exit status; SIGKILL it if it outlasts the timeout."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill(process)
        return process.wait(timeout=timeout)


def kill(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL a process, with its whole group when it leads one (gunicorn's workers as well)."""
    with contextlib.suppress(ProcessLookupError):
        if os.getpgid(process.pid) == process.pid:
            os.killpg(process.pid, signal.SIGKILL)
        else:
            process.kill()


@contextmanager
def running(
    cmd: list[str],
    env: dict[str, str],
    output: Output = None,
    cwd: Path = ROOT,
    own_group: bool = False,
    timeout: float = STOP_TIMEOUT,
) -> Iterator[subprocess.Popen[bytes]]:
    """Run a command until the block ends, then stop it (see stop) unless it has already exited."""
    process = start(cmd, env, output, cwd, own_group)
    try:
        yield process
    finally:
        stop(process, timeout)
