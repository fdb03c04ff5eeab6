"""The operators' console at /console: server-rendered pages (Jinja, autoescaped) over the service layer, plain
HTML forms, no script of its own. Every action goes through the same service methods as the API, as the
credential of the signed-in session, so it is checked and audited alike.

Sessions (sessions.py): a random id in an HttpOnly, SameSite=Strict cookie, a CSRF token in every form, an idle
expiry, and the token re-checked at every request, so that a token rotated out ends its sessions. This module
holds the blueprint, the session check and what every page shares; each part of the console is a module of
its own (overview, parked, accounts, drift, audit, applying), which registers its pages on the blueprint.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar, cast
from urllib.parse import urlencode

from flask import Blueprint, Response, current_app, g, redirect, render_template, request, url_for
from werkzeug.exceptions import HTTPException

import auth
import gate
from auth import OPERATE, READ
from db import DatabaseError
from models import POSITION_MAX
from service import INTERNAL_ERROR, Service, service_of
from sessions import Session
from tiers import TiersNotStored

View = TypeVar("View", bound=Callable[..., Any])

log = logging.getLogger(__name__)

COOKIE = "cm_session"
bp = Blueprint("console", __name__, url_prefix="/console", template_folder="templates", static_folder="static")


def service() -> Service:
    """Return the service this app serves."""
    return service_of(current_app)


def session() -> Session:
    """Return the signed-in session of the current request."""
    current: Session = g.console_session
    return current


@bp.before_request
def refuse_unstorable_text() -> Response | None:
    """Refuse text PostgreSQL cannot store in any form field or parameter, as the API's gate does, as a page."""
    name = gate.unstorable_field()
    return None if name is None else refused(400, f"{name}: {gate.UNSTORABLE_TEXT}", "Not accepted")


@bp.errorhandler(HTTPException)
def http_problem(err: HTTPException) -> Response:
    """Answer an HTTP error of a console page (a body too large, a form that cannot be read) as a page."""
    return refused(err.code or 500, err.description or err.name, err.name)


@bp.errorhandler(DatabaseError)
def database_problem(err: DatabaseError) -> Response:
    """Answer as a page when a database cannot serve a console page, naming it (503)."""
    return refused(503, f"{err.database} is unavailable: {err.detail}", "Unavailable")


@bp.errorhandler(TiersNotStored)
def state_missing(err: TiersNotStored) -> Response:
    """Answer as a page while the service's state is not set up yet (503)."""
    return refused(503, f"the service state is not initialised yet: {err}", "Unavailable")


@bp.errorhandler(Exception)
def failed(err: Exception) -> Response:
    """Answer an unexpected failure of a console page as a page, with the details in the log only (500)."""
    log.exception("unhandled error on a console page")
    return refused(500, INTERNAL_ERROR, "Failed")


@bp.route("/<path:rest>", methods=["GET", "POST"])
def no_such_page(rest: str) -> Response:
    """Answer a console path that names no page (404) as a page, not as the API's JSON."""
    return refused(404, "There is no such page in the console.", "Not found")


def page(view: View) -> View:
    """Let a page through only for a signed-in session; send anyone else to the sign-in form."""

    @wraps(view)
    def checked(*args: Any, **kwargs: Any) -> Any:
        if not _signed_in():
            return moved(url_for("console.signin", next=request.full_path), 302)
        return view(*args, **kwargs)

    return checked  # type: ignore[return-value]


def action(view: View) -> View:
    """Let an action (a POST) through only for a signed-in session whose role may operate, with its CSRF token."""

    @wraps(view)
    def checked(*args: Any, **kwargs: Any) -> Any:
        if not _signed_in():
            return refused(401, "sign in first")
        if not hmac.compare_digest(request.form.get("csrf", ""), session().csrf):
            return refused(403, "this form is not one of this session's: reload the page and try again")
        if not session().credential.may(OPERATE):
            return refused(403, f"the token of {session().credential.name} has the read role: it may not act")
        return view(*args, **kwargs)

    return checked  # type: ignore[return-value]


def _signed_in() -> bool:
    """Find the request's session, as its token's credential is now; note it for the page and the audit trail."""
    session_id = request.cookies.get(COOKIE)
    if not session_id:
        return False
    found = service().sessions.find(session_id, auth.tokens_of(current_app).current())
    if found is None:
        return False
    g.console_session = found
    g.credential = found.credential  # auth.actor() names it in the audit trail
    return True


@bp.app_template_filter("when")
def when(moment: Any) -> str:
    """Show a time (ISO 8601 text or a datetime) to the second, as a person reads it: 2026-12-07 12:08:23 UTC."""
    text = moment.isoformat() if hasattr(moment, "isoformat") else str(moment or "")
    day, _, rest = text.partition("T")
    clock = rest[:8]
    zone = " UTC" if rest.endswith(("+00:00", "Z")) else (f" {rest[-6:]}" if len(rest) > 8 else "")
    return f"{day} {clock}{zone}".strip()


def page_position(name: str = "before", below: int = POSITION_MAX + 1) -> int | None:
    """Read a page's position (the `next_before` of the page before, say) from the query; None for the first page.

    Raises ValueError, with what is wrong, when it is not a whole number below `below`.
    """
    text = request.args.get(name, "").strip()
    if not text:
        return None
    if not text.isascii() or not text.isdigit() or int(text) >= below:
        raise ValueError(f"{name} must be the position a page gave for the next one: a whole number below {below}")
    return int(text)


def render(template: str, code: int = 200, **context: Any) -> Response:
    """Render a console page with what every page shows: who is signed in, the CSRF token, and the pause."""
    status_now = service().status()
    html = render_template(
        template,
        credential=session().credential,
        may_act=session().credential.may(OPERATE),
        csrf=session().csrf,
        pause=status_now["pause"],
        notice=_notice(),
        **context,
    )
    return Response(html, status=code, mimetype="text/html")


def refused(status: int, message: str, title: str = "Refused") -> Response:
    """Answer an action that is refused, or a request that cannot be served, as a page that needs no session."""
    html = render_template("console/refused.html", status=status, message=message, title=title)
    return Response(html, status=status, mimetype="text/html")


def done(endpoint: str, notice: str, **values: Any) -> Response:
    """Send the browser back to a page after an action, with a line saying what was done, signed for this session."""
    target = url_for(endpoint, **values)
    joiner = "&" if "?" in target else "?"
    return moved(f"{target}{joiner}{urlencode({'notice': notice, 'signed': _signature(notice)})}")


def moved(target: str, code: int = 303) -> Response:
    """Send the browser to another console page (303 after a form: the next request is a GET)."""
    return cast(Response, redirect(target, code=code))  # Flask's redirect makes the app's response class


def _signature(notice: str) -> str:
    """Sign a line with the session's CSRF token, so that a page shows only what an action of this session said."""
    return hmac.new(session().csrf.encode(), notice.encode(), hashlib.sha256).hexdigest()


def _notice() -> str | None:
    """Read the line an action left for the page, if this session's action signed it; a crafted link shows none."""
    notice = request.args.get("notice")
    if notice is None or not hmac.compare_digest(request.args.get("signed", ""), _signature(notice)):
        return None
    return notice


@bp.get("/signin")
def signin() -> Response:
    """The sign-in form: a bearer token."""
    return Response(render_template("console/signin.html", problem=None), mimetype="text/html")


@bp.post("/signin")
def sign_in() -> Response:
    """Open a session for the token given, and go to the page asked for (the overview by default)."""
    token = request.form.get("token", "").strip()
    credential = auth.authenticate(f"Bearer {token}", auth.tokens_of(current_app).current())
    if credential is None:
        html = render_template("console/signin.html", problem="That token is not one this service accepts.")
        return Response(html, status=401, mimetype="text/html")
    wanted = request.args.get("next", "")
    target = wanted if wanted.startswith("/console/") and not wanted.startswith("//") else url_for("console.overview")
    response = moved(target)
    response.set_cookie(
        COOKIE,
        service().sessions.open(credential),
        httponly=True,
        samesite="Strict",
        secure=request.is_secure,
        path="/console",
    )
    return response


@bp.post("/signout")
def sign_out() -> Response:
    """End the session and forget its cookie."""
    session_id = request.cookies.get(COOKIE)
    if session_id:
        service().sessions.close(session_id)
    response = moved(url_for("console.signin"))
    response.delete_cookie(COOKIE, path="/console")
    return response


def register(app: Any) -> None:
    """Serve the console from the app."""
    app.register_blueprint(bp)


# The parts of the console register their pages on the blueprint.
from console import accounts, applying, audit, drift, entries, overview, parked  # noqa: E402, F401

__all__ = ["READ", "action", "bp", "done", "page", "refused", "render", "service", "session"]
