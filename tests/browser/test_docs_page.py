"""The API's document as a page: Swagger UI renders every operation from files the service serves itself, with no
other host asked for anything, no inline script, and nothing on its console."""

from __future__ import annotations

from urllib.parse import urlsplit

from docs import CSP
from tests.document import openapi_document


def test_swagger_ui_renders_every_operation_with_no_network_and_no_inline_script(served, page) -> None:
    tab, watched = page
    answer = tab.goto(f"{served.base}/api/v1/docs/swagger")

    tab.wait_for_selector(".opblock", timeout=20_000)
    shown = tab.locator(".opblock-summary-path").all_inner_texts()
    operations = [(method, path) for path, item in openapi_document()["paths"].items() for method in item]

    assert answer is not None and answer.headers["content-security-policy"] == CSP
    assert "'unsafe-inline'" not in CSP and "default-src 'self'" in CSP  # scripts: only files of the service
    assert len(shown) == len(operations)
    assert {p.replace("\u200b", "") for p in shown} == {path for _, path in operations}
    hosts = {urlsplit(url).netloc for url in watched.requests if not url.startswith("data:")}
    assert hosts == {urlsplit(served.base).netloc}, watched.requests
    assert [m for m in watched.console if m.startswith(("error", "pageerror"))] == [], watched.console
    assert "<script>" not in tab.content().replace("<script src=", "")
