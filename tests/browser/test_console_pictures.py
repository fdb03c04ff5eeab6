"""The pictures of the console in the README and docs/console.md: the overview and the parked entries, on the
demo's own data (its sample, its correction, its drift finding and its pause), taken in a real browser.
`make screenshots` writes them to docs/images; every run checks what they show."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest

import demo
from service import service_of
from tests.browser.conftest import screenshot, sign_in
from tests.world import World


@pytest.fixture
def settings(settings):
    """The test's settings, with the demo's token, as the demo runs the service."""
    return replace(settings, api_token=demo.DEMO_TOKEN, api_tokens_file=None)


def test_the_overview_and_the_parked_page_on_the_demo_data(served, page, world: World, tmp_path) -> None:
    demo.load_sample(world.queue_uri, world.portfolio_uri)
    demo.stage_the_console(served.base, world.queue_uri, world.portfolio_uri)
    service_of(served.app).drift.run_due()  # the check the demo asked for: the service's thread is not started here
    tab, _ = page
    tab.set_viewport_size({"width": 1280, "height": 800})
    sign_in(tab, served.base, demo.DEMO_TOKEN)

    tab.goto(f"{served.base}/console/")
    state = dict(zip(tab.locator("dt").all_inner_texts(), tab.locator("dd").all_inner_texts(), strict=True))
    assert state["Parked entries"] == "1" and state["Corrections"] == "1"
    assert re.fullmatch(r"done, [1-9][0-9]* findings", state["Last drift check"])
    assert tab.locator("svg.chart rect").count() >= 1
    screenshot(tab, "console-overview", tmp_path)

    tab.goto(f"{served.base}/console/parked")
    assert tab.get_by_role("link", name=demo.ORPHAN_ACCOUNT).count() >= 1
    assert tab.get_by_role("button", name="Resolve", exact=True).count() == 1  # the one parked entry's
    screenshot(tab, "console-parked", tmp_path)
