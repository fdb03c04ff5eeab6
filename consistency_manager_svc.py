"""Consistency Manager Service: the Flask app, its module-level `app` for gunicorn, and `main()`."""

from __future__ import annotations

import signal
from types import FrameType

from flask import Flask
from flask_openapi3.models.info import Info
from flask_openapi3.openapi import OpenAPI

import auth
import console
import docs
import logs
from api import bp, on_invalid
from config import Settings, load_settings, load_settings_or_exit
from gate import ApiRequest, OrderedJSON
from models import Error
from service import EXTENSION, build_service, service_of

MAX_BODY_BYTES = 4096


def create_app(settings: Settings | None = None) -> Flask:
    """Build the Flask app around a service; the poller is started by the server, not here."""
    settings = settings or load_settings()
    logs.configure(settings.log_level, settings.log_format)
    app = OpenAPI(
        __name__,
        info=Info(title="Consistency Manager Service", version="1.0.0"),
        security_schemes={"bearer": {"type": "http", "scheme": "bearer"}},
        doc_prefix=docs.PREFIX,
        validation_error_status=400,
        validation_error_model=Error,
        validation_error_callback=on_invalid,
    )
    app.request_class = ApiRequest
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.json = OrderedJSON(app)
    app.extensions[EXTENSION] = build_service(settings)
    app.extensions[auth.EXTENSION] = auth.Tokens.from_settings(settings)
    app.register_api(bp)
    console.register(app)
    docs.serve(app)
    return app


app = create_app(load_settings_or_exit())


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def main() -> None:
    """Run the service with Flask's server until SIGTERM or Ctrl-C: the poller starts now, the first cycle at once."""
    svc = service_of(app)
    for signum in STOP_SIGNALS:
        signal.signal(signum, stop_on_signal)
    svc.start()
    try:
        app.run(host="0.0.0.0", port=svc.settings.port, threaded=True)  # noqa: S104 - a container listens on all interfaces
    finally:
        svc.close()  # outside the signal handler: the poller's cycle ends at a batch boundary, the lease given back


def stop_on_signal(signum: int, frame: FrameType | None) -> None:
    """End the server on the first SIGTERM or SIGINT; a second one must not cut the stop short."""
    for each in STOP_SIGNALS:
        signal.signal(each, ignore_signal)
    raise SystemExit(0)


def ignore_signal(signum: int, frame: FrameType | None) -> None:
    """Take a stop signal that arrives while the service is already stopping, and do nothing."""


if __name__ == "__main__":
    main()
