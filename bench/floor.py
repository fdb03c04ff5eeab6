"""The floor for HTTP latency here: a WSGI app that does no work, served with the service's own gunicorn settings.

`gunicorn -c python:bench.floor bench.floor:app` reads the worker settings below from the shipped
gunicorn.conf.py (workers, worker class, threads, logging), so that the benchmark can put
the least any app under this server can answer beside what the service answers, under the same load.
"""

from __future__ import annotations

import runpy
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

_SHIPPED = runpy.run_path(str(Path(__file__).resolve().parent.parent / "gunicorn.conf.py"))
bind = _SHIPPED["bind"]
workers = _SHIPPED["workers"]
worker_class = _SHIPPED["worker_class"]
threads = _SHIPPED["threads"]
accesslog = _SHIPPED["accesslog"]
errorlog = _SHIPPED["errorlog"]
loglevel = _SHIPPED["loglevel"]
logconfig_dict = _SHIPPED["logconfig_dict"]
BODY = b'{"status":"ok"}'


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """Answer every request with a fixed JSON body, as /health does, without any work."""
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(BODY)))])
    return [BODY]
