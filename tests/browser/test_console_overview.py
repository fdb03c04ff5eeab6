"""The console's sign-in and overview in a real browser: a session from the token form, the overview's queues,
chart and cycles, nothing from another host, nothing on the console, and a width a phone has."""

from __future__ import annotations

from urllib.parse import urlsplit

from docs import CSP
from service import service_of
from tests.browser.conftest import sign_in
from tests.conftest import API_TOKEN
from tests.world import World


def test_signing_in_shows_the_overview_with_its_chart_and_nothing_from_elsewhere(served, page, world: World) -> None:
    world.portfolio_for("1000000001")
    for status in ("COMPLETED", "COMPLETED", "FAILED"):
        world.request("investment", "1000000001", status)
    world.request("withdrawal", "1000000002", txn=False)  # parked: no portfolio
    service_of(served.app).poller.run_once()
    tab, watched = page

    sign_in(tab, served.base, API_TOKEN)
    answer = tab.goto(f"{served.base}/console/")

    assert answer is not None and answer.headers["content-security-policy"] == CSP
    assert tab.get_by_role("heading", name="Overview").is_visible()
    assert tab.locator("svg.chart rect.investment").count() == 1
    assert tab.get_by_text("Signed in as").inner_text().startswith("Signed in as api-token")
    assert tab.get_by_role("link", name="1").first.is_visible()  # one parked entry, linked to the list
    tab.set_viewport_size({"width": 360, "height": 740})  # a phone: the page still fits, tables scroll inside
    assert tab.evaluate("document.documentElement.scrollWidth") <= 360
    hosts = {urlsplit(url).netloc for url in watched.requests if not url.startswith("data:")}
    assert hosts == {urlsplit(served.base).netloc}
    assert [m for m in watched.console if m.startswith(("error", "pageerror"))] == [], watched.console


def test_signing_out_ends_the_session(served, page) -> None:
    tab, _ = page
    sign_in(tab, served.base, API_TOKEN)
    tab.get_by_role("button", name="Sign out").click()
    tab.wait_for_url(f"{served.base}/console/signin")
    tab.goto(f"{served.base}/console/")
    assert tab.url.startswith(f"{served.base}/console/signin?next=")
