"""A throw-away PostgreSQL server of the test's own, so an outage can be staged without harming the others."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from devkit.net import free_port


def _bindir() -> Path:
    """Find initdb and pg_ctl: Debian's PostgreSQL, else the binaries pgserver ships."""
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if (Path(candidate) / "pg_ctl").exists():
            return Path(candidate)
    import pgserver

    return Path(pgserver.__file__).parent / "pginstall" / "bin"


def _server_user() -> str | None:
    """Return the unprivileged user to run the server as when we are root (PostgreSQL refuses root)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "pgserver"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise RuntimeError("running as root, but there is no 'postgres' or 'pgserver' user to run PostgreSQL as")


class Cluster:
    """A PostgreSQL server in a temporary directory, stopped and started at will with pg_ctl."""

    def __init__(self, **settings: str) -> None:
        self.bindir = _bindir()
        self.settings = settings  # server settings, such as timezone or max_prepared_transactions
        self.user = _server_user()
        self.root = Path(tempfile.mkdtemp(prefix="cm-outage-"))
        self.data = self.root / "data"
        self.port = free_port()
        if self.user:
            record = pwd.getpwnam(self.user)
            os.chown(self.root, record.pw_uid, record.pw_gid)
            self.root.chmod(0o755)
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")
        self.start()

    @property
    def uri(self) -> str:
        """The URI of its postgres database."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        """Run one of the server's tools as the server's user."""
        command = [str(self.bindir / tool), *args]
        if self.user:
            command = ["runuser", "-u", self.user, "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=60)

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} -c fsync=off"
        options += "".join(f" -c {name}={value}" for name, value in self.settings.items())
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.root / "log"), "-w", "start")

    def stop(self) -> None:
        """Stop the server the way an outage does: fast shutdown, every session cut."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def destroy(self) -> None:
        """Stop the server if it runs, and remove its files."""
        with contextlib.suppress(subprocess.CalledProcessError):  # already stopped
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
