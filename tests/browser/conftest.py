"""Fixtures of the browser tests: the service on a real port, and headless Chromium driven by Playwright, which
records every request a page makes and every message its console writes."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from werkzeug.serving import make_server

from devkit.browser import FLAGS, chromium
from service import service_of


@dataclass
class Served:
    """The app on 127.0.0.1 in a thread of this process: its address and the app."""

    base: str
    app: Any


@pytest.fixture
def served(app) -> Iterator[Served]:
    """Serve the test's app over HTTP, as a browser needs it."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield Served(f"http://127.0.0.1:{server.server_port}", app)
    server.shutdown()
    service_of(app).close()


@dataclass
class Watched:
    """What the pages of one browser context did: the URLs they asked for and what their consoles said."""

    requests: list[str] = field(default_factory=list)
    console: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """Headless Chromium, for the session."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium(), args=FLAGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser) -> Iterator[tuple[Any, Watched]]:
    """A fresh page whose requests, console messages, page errors and dialogs are recorded."""
    context = browser.new_context()
    watched = Watched()
    page = context.new_page()
    page.on("request", lambda request: watched.requests.append(request.url))
    page.on("console", lambda message: watched.console.append(f"{message.type}: {message.text}"))
    page.on("pageerror", lambda error: watched.console.append(f"pageerror: {error}"))
    page.on("dialog", lambda dialog: (watched.dialogs.append(dialog.message), dialog.dismiss()))
    yield page, watched
    context.close()


def screenshot(tab: Any, name: str, where: Any) -> None:
    """Take a screenshot of a page: into `where` (the test's tmp_path), and into $SCREENSHOTS when set, as
    `make screenshots` sets it to refresh the pictures of the README and docs/console.md."""
    import os
    from pathlib import Path

    tab.screenshot(path=str(where / f"{name}.png"), full_page=True)
    folder = os.environ.get("SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        tab.screenshot(path=str(Path(folder) / f"{name}.png"), full_page=True)


def sign_in(tab: Any, base: str, token: str) -> None:
    """Sign in to the console through its form, as a person would."""
    tab.goto(f"{base}/console/signin")
    tab.get_by_label("Bearer token").fill(token)
    tab.get_by_role("button", name="Sign in").click()
    tab.wait_for_url(f"{base}/console/**")
