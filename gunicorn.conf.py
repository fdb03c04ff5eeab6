"""gunicorn settings, picked up by `gunicorn consistency_manager_svc:app` from this folder.

The master must not import prometheus_client (through `service` or `metrics`) before on_starting has named
the metrics directory: the workers it forks would inherit a single-process client. So the service is
imported inside the hooks that run in a worker, and this file imports only config and logs.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import logs
from config import load_settings_or_exit, share_metrics_dir

_settings = load_settings_or_exit()
# The directory where the workers keep their metrics, chosen when the master starts.
_metrics: dict[str, Any] = {"dir": None, "made": False}

bind = f"0.0.0.0:{_settings.port}"
workers = 2
worker_class = "gthread"
# A thread for each keep-alive connection a worker may be answering at once: two workers, 100 connections.
threads = 50
# Each worker runs its own poller; the poller's threads and connections must not cross a fork.
preload_app = False
# A cycle finishes its batch on SIGTERM; gunicorn waits this long before it kills a worker.
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
    """Start the poller of a freshly booted worker."""
    from service import service_of

    service_of(worker.wsgi).start()


def worker_exit(server: Any, worker: Any) -> None:
    """Stop the poller of an exiting worker and close its pools."""
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
