"""gunicorn settings, picked up by `gunicorn consistency_manager_svc:app` from this folder.

The master must not import prometheus_client (through `service` or `metrics`) before on_starting has named
the metrics directory: the workers it forks would inherit a single-process client. So the service is
imported inside the hooks that run in a worker, and this file imports only config and logs.
"""

from __future__ import annotations

import gc
import shutil
import signal
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import logs
from config import load_settings_or_exit, share_metrics_dir

_settings = load_settings_or_exit()
# The directory where the workers keep their metrics, chosen when the master starts.
_metrics: dict[str, Any] = {"dir": None, "made": False}
# Whether this worker has begun to stop: set by its first SIGINT or SIGQUIT, or when worker_exit runs.
_stop = {"begun": False}
Handler = Callable[[int, FrameType | None], None]

bind = f"0.0.0.0:{_settings.port}"
workers = 2
worker_class = "gthread"
# A thread for each keep-alive connection a worker may be answering at once: two workers, 100 connections.
threads = 50
# Each worker runs its own poller; the poller's threads and connections must not cross a fork.
preload_app = False
# A cycle finishes its batch on SIGTERM, SIGINT or SIGQUIT; gunicorn waits this long before it kills a worker.
graceful_timeout = 20
timeout = 60
# No gunicornc control socket: nothing uses it, and it would write under $HOME.
control_socket_disable = True
accesslog = "-"
errorlog = "-"
loglevel = _settings.log_level.lower()
# In JSON mode gunicorn's own lines (master, workers, access) are JSON objects on stdout as well.
logconfig_dict = logs.gunicorn_config(_settings.log_level) if _settings.log_format == "json" else {}


def on_starting(server: Any) -> None:
    """Give the workers an empty metrics directory: PROMETHEUS_MULTIPROC_DIR, or a new one under worker_tmp_dir."""
    if _settings.metrics_dir:
        path = Path(_settings.metrics_dir)
        for stale in path.glob("*.db"):  # counters of a previous run would add up with this run's
            stale.unlink()
    else:
        path = Path(tempfile.mkdtemp(prefix="consistency-metrics-", dir=server.cfg.worker_tmp_dir))
        _metrics["made"] = True
    _metrics["dir"] = str(path)
    share_metrics_dir(str(path))


def post_worker_init(worker: Any) -> None:
    """Start the poller of a freshly booted worker, and have only its first SIGINT or SIGQUIT count."""
    from service import service_of

    # The app's objects (its routes, models, schemas, the OpenAPI document) live as long as the worker. Frozen,
    # they are left out of every full garbage collection, which would otherwise stop every thread to scan them
    # again: 25 ms each time, which is what the slowest requests waited.
    gc.freeze()
    quit_once = _first_quit_only(worker.handle_quit)
    for sig in (signal.SIGINT, signal.SIGQUIT):
        signal.signal(sig, quit_once)
    service_of(worker.wsgi).start()


def _first_quit_only(handle_quit: Handler) -> Handler:
    """Wrap gunicorn's quick-shutdown handler so that a later SIGINT or SIGQUIT does nothing.

    Ctrl-C reaches a worker twice: the terminal's SIGINT, then the master's SIGQUIT. Gunicorn's handler raises
    SystemExit each time, and a second one, raised while the first unwinds, cut worker_exit short: the poller
    was never stopped and went on with its cycle, holding the lease, while the process was torn down.
    """

    def quit_once(sig: int, frame: FrameType | None) -> None:
        if _stop["begun"]:
            return
        _stop["begun"] = True
        handle_quit(sig, frame)

    return quit_once


def worker_exit(server: Any, worker: Any) -> None:
    """Stop the poller of an exiting worker (its cycle ends at a batch boundary) and close its pools."""
    if not hasattr(worker, "wsgi"):  # called in the master for a worker already gone, or one that never loaded
        return
    _stop["begun"] = True  # a SIGINT or SIGQUIT from now on must not cut the stop short
    from service import service_of

    service_of(worker.wsgi).close()


def child_exit(server: Any, worker: Any) -> None:
    """Drop a dead worker's live gauges (its pool connections) from the metrics; its counters stay."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid, _metrics["dir"])


def on_exit(server: Any) -> None:
    """Remove the metrics directory the master made for this run."""
    if _metrics["made"]:
        shutil.rmtree(_metrics["dir"], ignore_errors=True)
