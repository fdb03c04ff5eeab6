"""Log lines: one JSON object per line (or the human text format), never a database password."""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

from domain import CycleResult, Standing

_URI_PASSWORD = re.compile(r"(postgres(?:ql)?://[^:/@\s]*:)[^@\s]*@")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Attributes every LogRecord has; anything else on a record came from `extra=` and becomes a field.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object: time, level, logger, message, pid, then any extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        """Return the record as one line of JSON."""
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        line.update((key, value) for key, value in vars(record).items() if key not in _STANDARD)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return mask_uri(json.dumps(line, default=str, ensure_ascii=False))  # the message and every field


class TextFormatter(logging.Formatter):
    """The human format for a terminal, with URI passwords masked as well."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        """Return the record as text."""
        return mask_uri(super().format(record))


def mask_uri(text: str) -> str:
    """Return the text with the password of every database URI in it replaced by ***."""
    return _URI_PASSWORD.sub(r"\1***@", text)


def formatter(fmt: str) -> logging.Formatter:
    """Return the formatter of a LOG_FORMAT value."""
    return JsonFormatter() if fmt == "json" else TextFormatter()


class StdoutHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to sys.stdout as it is when a line is written, so a redirected stdout gets every line."""

    @property
    def stream(self) -> Any:
        """Return the current standard output."""
        return sys.stdout

    @stream.setter
    def stream(self, value: Any) -> None:
        """Ignore the stream StreamHandler.__init__ sets."""


def configure(level: str, fmt: str) -> None:
    """Send every log line to stdout, at the configured level and in the configured format; safe to repeat."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, StdoutHandler)]:
        root.removeHandler(handler)
    handler = StdoutHandler()
    handler.setFormatter(formatter(fmt))
    if fmt == "text":
        handler.addFilter(IdleCycleFilter())
    root.addHandler(handler)
    root.setLevel(level)


def gunicorn_config(level: str) -> dict[str, Any]:
    """gunicorn's logconfig_dict for JSON: its error and access logs as JSON lines on stdout.

    The root logger is left alone: each worker's app gives it its own handler (configure), and a second
    one here would print every line twice.
    """
    own = {"handlers": ["stdout"], "propagate": False}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonFormatter}},
        "handlers": {"stdout": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stdout"}},
        "root": {"level": level, "handlers": []},
        "loggers": {"gunicorn.error": {"level": level, **own}, "gunicorn.access": {"level": "INFO", **own}},
    }


def cycle_fields(result: CycleResult, standing: Standing | None) -> dict[str, Any]:
    """Return the fields of a cycle's summary line."""
    fields = {"event": "cycle", **result.to_json()}
    if standing is not None:
        fields.update(
            watermarks=standing.watermarks,
            parked_entries=standing.parked,
            corrections=standing.corrections,
            reused_entries=standing.reused,
        )
    return fields


def cycle_message(result: CycleResult) -> str:
    """Describe a cycle in one sentence for the text format."""
    told = {
        "error": "failed",
        "skipped": "skipped (another process has the turn, or started a cycle within the interval)",
        "paused": "paused (an operator paused applying: POST /api/v1/consistency/resume ends it)",
    }
    text = "consistency cycle " + told.get(result.outcome, result.outcome)
    text += f" in {result.duration_ms:g} ms"
    if result.work is not None:
        text += f" ({result.work.mode} mode)"
        for queue, counts in result.work.counts.items():
            text += f"; {queue} " + " ".join(f"{key}={value}" for key, value in counts.items())
    if result.error:
        text += f"; error: {result.error}"
    return text


def log_cycle(result: CycleResult, standing: Standing | None = None) -> None:
    """Write a cycle's one summary line: INFO when it ran, ERROR when it failed, DEBUG when skipped or paused."""
    level = {"ok": logging.INFO, "error": logging.ERROR}.get(result.outcome, logging.DEBUG)
    if result.outcome == "paused" and result.work is not None:
        level = logging.INFO  # it applied entries before it found applying paused
    logging.getLogger("cycle").log(level, cycle_message(result), extra=cycle_fields(result, standing))


class IdleCycleFilter(logging.Filter):
    """Leaves out the summary line of a cycle that found nothing to do: for the text format, read by a person.

    Such a cycle went through without an error and applied, corrected and reconciled no entry. Reading entries
    already applied does not count, nor parking again the entries its retry still finds blocked: it parks
    every one of them each cycle, so only more parked than in this process's previous cycle is news.
    """

    def __init__(self) -> None:
        super().__init__()
        self._parked = 0

    def filter(self, record: logging.LogRecord) -> bool:
        """Tell whether to write the record: every one but an idle cycle's summary."""
        counts = getattr(record, "counts", None)
        if record.name != "cycle" or getattr(record, "result", None) != "ok" or not isinstance(counts, dict):
            return True
        before, self._parked = self._parked, sum(queue.get("parked", 0) for queue in counts.values())
        busy = any(n for queue in counts.values() for key, n in queue.items() if key not in ("read", "parked"))
        return busy or self._parked > before or bool(getattr(record, "error", None))
