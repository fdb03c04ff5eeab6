"""The API's document as pages: Swagger UI from the pinned flask-openapi3-swagger package, served by the service
itself (nothing from a CDN), and the security headers every answer carries."""

from __future__ import annotations

from flask import Flask, Response

# Where the document and its pages live: /api/v1/docs/openapi.json, /api/v1/docs/swagger.
PREFIX = "/api/v1/docs"
# No inline script, no other host: every script, style and image comes from the service. The one inline style is the
# <style> element Swagger UI's bundle (flask-openapi3-swagger 5.31.0) adds, allowed by its hash; a new version of it
# that adds another shows as a CSP error in tests/browser/test_docs_page.py.
SWAGGER_STYLE = "'sha256-RL3ie0nH+Lzz2YNqQN83mnU0J1ot4QL7b99vMdIX99w='"
CSP = (
    f"default-src 'self'; style-src 'self' {SWAGGER_STYLE}; img-src 'self' data:; object-src 'none'; "
    "base-uri 'none'; frame-ancestors 'none'"
)

# The package's page, less its inline script and style: Swagger UI starts from static/swagger-init.js.
SWAGGER_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="UTF-8">
<title>Consistency Manager Service API</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="swagger/css/swagger-ui.css">
</head>
<body>
<div id="swagger-ui" data-url="{{ doc_url }}"></div>
<script src="swagger/js/swagger-ui-bundle.js"></script>
<script src="swagger/js/swagger-ui-standalone-preset.js"></script>
<script src="/static/swagger-init.js"></script>
</body>
</html>
"""
# The index of the pages, in place of the package's (which has inline style).
INDEX_PAGE = """<!DOCTYPE html>
<html lang="en">
<head><meta charset="UTF-8"><title>Consistency Manager Service API</title><link rel="icon" href="data:,"></head>
<body>
<h1>Consistency Manager Service API</h1>
<ul>
<li><a href="swagger">Swagger UI</a></li>
<li><a href="openapi.json">The OpenAPI document (JSON)</a></li>
</ul>
</body>
</html>
"""


SECURITY_HEADERS = (("Content-Security-Policy", CSP), ("X-Content-Type-Options", "nosniff"))


def serve(app: Flask) -> None:
    """Serve the pages without inline script, and put the security headers on every answer."""
    app.config["SWAGGER_HTML_STRING"] = SWAGGER_PAGE
    app.config["OPENAPI_HTML_STRING"] = INDEX_PAGE
    app.after_request(protect)


def protect(response: Response) -> Response:
    """Add the security headers: the Content-Security-Policy, and no sniffing of content types."""
    response.headers.extend(SECURITY_HEADERS)  # nothing else sets them: no need to look first
    return response
