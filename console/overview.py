"""The console's overview: each queue's watermark and backlog, the entries applied per minute over the last hour
as a chart drawn on the server (SVG), the mode, the lease, the counts, and the last cycles."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from flask import Response

from activity import Activity
from console import bp, page, render, service

# The chart's size, in SVG units: a bar per minute and queue, side by side, for the 60 minutes of the hour.
BAR, HEIGHT = 4, 120
WIDTH = 60 * 2 * BAR


@dataclass(frozen=True)
class Bar:
    """One bar of the chart: where it stands, how tall, whose queue, and its count for the title."""

    x: int
    y: int
    height: int
    queue: str
    entries: int
    minute: str


def bars(activity: Activity) -> tuple[list[Bar], int]:
    """Lay the last hour's counts out as bars, scaled to the busiest minute; return them and that count."""
    busiest = max((n for counts in activity.per_minute.values() for n in counts), default=0)
    top = busiest or 1  # an idle hour draws no bar
    laid = []
    for shift, (queue, counts) in enumerate(activity.per_minute.items()):
        for slot, entries in enumerate(counts):
            height = round(HEIGHT * entries / top)
            minute = f"{activity.since + timedelta(minutes=slot):%H:%M} UTC"
            laid.append(Bar(slot * 2 * BAR + shift * BAR, HEIGHT - height, height, queue, entries, minute))
    return laid, busiest


@bp.get("/")
@page
def overview() -> Response:
    """The overview."""
    activity = service().activity()
    laid, top = bars(activity)
    drift = service().drift.page(1, None)["entries"]
    return render(
        "console/overview.html",
        status=service().status(),
        bars=laid,
        top=top,
        width=WIDTH,
        height=HEIGHT,
        bar_width=BAR,
        cycles=activity.cycles,
        drift=drift[0] if drift else None,
    )
