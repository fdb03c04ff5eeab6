"""gunicorn settings, picked up by `gunicorn consistency_manager_svc:app` from this folder."""

from __future__ import annotations

from typing import Any

from config import load_settings_or_exit
from service import service_of

_settings = load_settings_or_exit()

bind = f"0.0.0.0:{_settings.port}"
workers = 2
worker_class = "gthread"
threads = 4
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


def post_worker_init(worker: Any) -> None:
    """Start the poller of a freshly booted worker."""
    service_of(worker.wsgi).poller.start()


def worker_exit(server: Any, worker: Any) -> None:
    """Stop the poller of an exiting worker and close its pools."""
    service_of(worker.wsgi).close()
