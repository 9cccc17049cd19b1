"""The web app's routes: the Score and Models pages, placeholders for the pages to come, and /docs.

Each handler parses, calls the function the JSON API calls, and renders a template. The Score form is
validated by :func:`custseg.serving.parsing.parse_records` (so a wrong value reads exactly like the API's
422) and scored by :func:`custseg.serving.routes.scoring.score_records`. Every answer carries the
security headers of :data:`SECURITY_HEADERS`; form posts carry a CSRF token (double-submit cookie).
With API keys configured, pages need a sign-in (:mod:`custseg.serving.ui.sessions`) and the key's scope.
"""

from __future__ import annotations

import hmac
import re
import secrets
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.staticfiles import StaticFiles

from custseg import schema
from custseg.errors import DataValidationError, ExplanationError
from custseg.serving.deps import get_served_model, request_context
from custseg.serving.parsing import parse_records
from custseg.serving.routes.scoring import score_records
from custseg.serving.security import ApiKey, configured_keys
from custseg.serving.ui import charts, sessions
from custseg.settings import Settings

HERE = Path(__file__).parent
STATIC_URL = "/ui/static"
CSRF_COOKIE = "custseg_csrf"
CSRF_FIELD = "csrf_token"
TOP_REASONS = 5
"""Reasons shown for the scored customer (the API's ``?explain=K`` default range is 1-10)."""

CSP = (
    "default-src 'self'; script-src 'self'; "
    # Swagger UI and vega-embed (its tooltip) set style attributes and <style> elements at run time.
    "style-src 'self' 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; "
    "font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
}
NAVIGATION = (
    ("score", "Score"),
    ("upload", "Upload"),
    ("segments", "Segments"),
    ("monitoring", "Monitoring"),
    ("models", "Models"),
)
PLACEHOLDERS: dict[str, str] = {}
"""Pages linked from the navigation that are not built yet, and what they will show."""
_WORDS = {"num": "number of", "avg": "average", "proba": "probability of"}
_JSON_NUMBER = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")
"""A JSON number literal (what the API would have received for a number typed in the field)."""

templates = Environment(
    loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(), auto_reload=False
)


# -- the form's fields, from the schema ---------------------------------------------------------------


def label(name: str) -> str:
    """A feature's (or a scored column's) name in words: ``days_since_last_purchase`` -> ``Days since last
    purchase``, ``proba_high_value`` -> ``Probability of high value``."""
    text = " ".join(_WORDS.get(word, word) for word in name.split("_"))
    return text[:1].upper() + text[1:]


def range_text(feature: schema.Feature) -> str:
    """The valid values as a person reads them: ``0 to 120``, ``0 or more``, ``Female or Male``."""
    if feature.categories is not None:
        return " or ".join(feature.categories)
    low, high = feature.minimum, feature.maximum
    if low is not None and high is not None:
        return f"{low:g} to {high:g}"
    if low is not None:
        return f"{low:g} or more"
    return f"{high:g} or less" if high is not None else "any number"


def form_fields(values: dict[str, str], errors: dict[str, list[str]]) -> list[dict[str, Any]]:
    """What the Score template needs for each feature, in schema order."""
    return [
        {
            "name": f.name,
            "label": label(f.name),
            "range": range_text(f),
            "description": f.description,
            "kind": f.kind,
            "categories": f.categories,
            "min": None if f.minimum is None else f"{f.minimum:g}",
            "max": None if f.maximum is None else f"{f.maximum:g}",
            "step": "1" if f.kind == "int" else "any",
            "value": values.get(f.name, ""),
            "errors": errors.get(f.name, []),
        }
        for f in schema.FEATURES
    ]


def record_body(form: dict[str, str]) -> bytes:
    """The API's JSON body for a form: numbers as JSON numbers when they read as one, else as text
    (so the API's own validation says what is wrong with them); empty fields are left out."""
    parts = []
    for feature in schema.FEATURES:
        text = form.get(feature.name, "").strip()
        if not text:
            continue
        value = orjson.dumps(text).decode()
        if feature.is_numeric and _is_json_number(text):
            value = text
        parts.append(f"{orjson.dumps(feature.name).decode()}: {value}")
    return ("{" + ", ".join(parts) + "}").encode()


def _is_json_number(text: str) -> bool:
    return _JSON_NUMBER.fullmatch(text) is not None


# -- rendering --------------------------------------------------------------------------------------


def page(request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
    """A rendered template with the security headers and a CSRF cookie for its forms."""
    token = request.cookies.get(CSRF_COOKIE) or secrets.token_urlsafe(32)
    html = templates.get_template(template).render(
        static=STATIC_URL,
        navigation=NAVIGATION,
        csrf_field=CSRF_FIELD,
        csrf_token=token,
        signed_in=request.scope.get("custseg.ui_key") is not None,
        **context,
    )
    response = HTMLResponse(html, status, headers=SECURITY_HEADERS)
    response.set_cookie(CSRF_COOKIE, token, httponly=True, samesite="strict", path="/ui")
    return response


def locked(request: Request, scope: str | None = None) -> Response | None:
    """None when the caller may see the page: no API keys on this server, or a session whose key has
    ``scope``; else the sign-in page (303) or a 403 saying which scope is missing."""
    keys = keys_of(request)
    if not keys:
        return None
    key = sessions.read(keys, request.cookies.get(sessions.SESSION_COOKIE))
    if key is None:
        return RedirectResponse("/ui/sign-in", 303, headers=SECURITY_HEADERS)
    request.scope["custseg.ui_key"] = key.name
    if scope is not None and scope not in key.scopes:
        message = (
            f"You are signed in with API key {key.name}, which does not have the '{scope}' scope this page "
            f"needs. Sign out and sign in with a key from CUSTSEG_{scope.upper()}_KEYS or CUSTSEG_API_KEYS."
        )
        return page(request, "message.html", 403, active="", title="Not allowed", message=message)
    return None


def keys_of(request: Request) -> list[ApiKey]:
    keys = getattr(request.app.state, "ui_keys", None)
    if keys is None:
        keys = request.app.state.ui_keys = configured_keys(request.app.state.settings)
    return keys


# -- routes -----------------------------------------------------------------------------------------


async def home(request: Request) -> Response:
    return RedirectResponse("/ui/score", 303, headers=SECURITY_HEADERS)


async def score_form(request: Request) -> Response:
    refused = locked(request, "scoring")
    if refused is not None:
        return refused
    defaults = {f.name: str(f.example) for f in schema.FEATURES}
    return page(request, "score.html", active="score", fields=form_fields(defaults, {}), form_errors=[])


async def score_submit(request: Request) -> Response:
    refused = locked(request, "scoring")
    if refused is not None:
        return refused
    form = await read_form(request)
    if not _csrf_ok(request, form):
        return csrf_refused(request)
    try:
        records, _ = parse_records(record_body(form), 1)
    except DataValidationError as exc:
        errors: dict[str, list[str]] = {}
        general = []
        for problem in exc.problems:
            if problem.column in schema.FEATURES_BY_NAME:
                errors.setdefault(problem.column, []).append(problem.message)
            else:
                general.append(
                    problem.message if problem.column is None else f"{problem.column}: {problem.message}"
                )
        fields = form_fields(form, errors)
        return page(request, "score.html", 422, active="score", fields=fields, form_errors=general)
    loaded = await get_served_model(request)
    result = await score_one(request, loaded, records)
    return page(
        request, "score.html", active="score", fields=form_fields(form, {}), form_errors=[], result=result
    )


async def score_one(request: Request, loaded: Any, records: list[Any]) -> dict[str, Any]:
    """Score one validated record like /predict does (metrics, prediction log) and explain it."""
    reasons: list[dict[str, Any]] = []
    reasons_problem = None
    try:
        scores, explanations = await score_records(loaded.scorer, records, TOP_REASONS)
        if explanations:
            reasons = [
                {
                    "code": r.code,
                    "feature": r.feature,
                    "value": r.value,
                    "contribution": r.contribution,
                    "text": r.text,
                }
                for r in explanations[0].reasons
            ]
    except ExplanationError as exc:  # a model without an explainer still scores
        reasons_problem = str(exc)
        scores, _ = await score_records(loaded.scorer, records)
    labels: list[str] = scores.labels.tolist()
    state = request.app.state
    state.metrics.count_predictions(labels)
    context = request_context(request)
    if state.recorder is not None:
        state.recorder.record(records, scores, loaded, context.request_id, context.started, None)
    segment = labels[0]
    probabilities = dict(zip(scores.classes, scores.probabilities[0].tolist(), strict=True))
    return {
        "segment": segment,
        "probabilities": sorted(probabilities.items(), key=lambda kv: -kv[1]),
        "probability_spec": charts.probabilities_spec(probabilities, segment),
        "reasons": reasons,
        "reasons_spec": charts.reasons_spec(reasons, segment) if reasons else None,
        "reasons_problem": reasons_problem,
        "model": loaded.summary,
        "request_id": context.request_id,
    }


async def read_form(request: Request) -> dict[str, str]:
    """A form-encoded body as a dict (the last value of a repeated field)."""
    return {k: v[-1] for k, v in parse_qs((await request.body()).decode("utf-8", "replace")).items()}


def csrf_refused(request: Request) -> Response:
    message = "This form has expired or did not come from this page: open the page again and resubmit."
    return page(request, "message.html", 403, active="", title="Form refused", message=message)


async def sign_in_form(request: Request) -> Response:
    if not keys_of(request):
        return RedirectResponse("/ui/score", 303, headers=SECURITY_HEADERS)
    return page(request, "sign_in.html", active="", title="Sign in", problem=None)


async def sign_in(request: Request) -> Response:
    """Exchange an API key for a signed, HttpOnly, SameSite=Strict session cookie."""
    keys = keys_of(request)
    if not keys:
        return RedirectResponse("/ui/score", 303, headers=SECURITY_HEADERS)
    form = await read_form(request)
    if not _csrf_ok(request, form):
        return csrf_refused(request)
    key = sessions.find_key(keys, form.get("api_key", ""))
    if key is None:
        problem = "That key is not valid on this server. Check it and try again, or ask the operator for one."
        return page(request, "sign_in.html", 401, active="", title="Sign in", problem=problem)
    response = RedirectResponse("/ui/score", 303, headers=SECURITY_HEADERS)
    response.set_cookie(
        sessions.SESSION_COOKIE,
        sessions.issue(keys, key),
        max_age=sessions.SESSION_SECONDS,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/ui",
    )
    return response


async def sign_out(request: Request) -> Response:
    form = await read_form(request)
    if not _csrf_ok(request, form):
        return csrf_refused(request)
    response = RedirectResponse("/ui/sign-in", 303, headers=SECURITY_HEADERS)
    response.delete_cookie(sessions.SESSION_COOKIE, path="/ui", httponly=True, samesite="strict")
    return response


def _csrf_ok(request: Request, form: dict[str, str]) -> bool:
    """The form's token equals the SameSite=Strict cookie set with the page (double-submit), and the
    Origin, when the browser sends one, is this server."""
    cookie, sent = request.cookies.get(CSRF_COOKIE, ""), form.get(CSRF_FIELD, "")
    if not cookie or not hmac.compare_digest(cookie.encode(), sent.encode()):
        return False
    origin = request.headers.get("origin")
    # "null": what browsers send on a form post from a page with Referrer-Policy: no-referrer
    return origin in (None, "null") or urlsplit(origin).netloc == request.headers.get("host")


async def placeholder(request: Request) -> Response:
    refused = locked(request)
    if refused is not None:
        return refused
    name = request.url.path.rstrip("/").rsplit("/", 1)[-1]
    title = dict(NAVIGATION)[name]
    return page(request, "placeholder.html", active=name, title=title, planned=PLACEHOLDERS[name])


async def docs(request: Request) -> Response:
    """Swagger UI for /openapi.json, from the vendored swagger-ui-dist (no CDN)."""
    html = templates.get_template("docs.html").render(static=STATIC_URL, openapi_url="/openapi.json")
    return HTMLResponse(html, headers=SECURITY_HEADERS)


class WithSecurityHeaders:
    """The static files' ASGI app, with the pages' security headers on every answer."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.headers = [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *self.headers]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def add_routes(app: FastAPI, settings: Settings) -> None:
    """The web app's pages, its static files and /docs (the app is created with ``docs_url=None``)."""
    hidden: dict[str, Any] = {"include_in_schema": False, "response_class": HTMLResponse}
    app.add_api_route("/docs", docs, methods=["GET"], **hidden)
    app.add_api_route("/ui", home, methods=["GET"], **hidden)
    app.add_api_route("/ui/", home, methods=["GET"], **hidden)
    app.add_api_route("/ui/score", score_form, methods=["GET"], **hidden)
    app.add_api_route("/ui/score", score_submit, methods=["POST"], **hidden)
    app.add_api_route("/ui/sign-in", sign_in_form, methods=["GET"], **hidden)
    app.add_api_route("/ui/sign-in", sign_in, methods=["POST"], **hidden)
    app.add_api_route("/ui/sign-out", sign_out, methods=["POST"], **hidden)
    for name in PLACEHOLDERS:
        app.add_api_route(f"/ui/{name}", placeholder, methods=["GET"], **hidden)
    app.mount(STATIC_URL, WithSecurityHeaders(StaticFiles(directory=HERE / "static")), name="ui-static")
