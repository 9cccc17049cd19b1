"""The API's one pure-ASGI middleware: what every HTTP request goes through before and after its route.

Request ids (the server's UUIDv7 and the caller's X-Request-ID), the trusted-Host check, the body limit
(declared and streamed), API keys and their scopes, JSON-only POSTs, metrics, the JSON access log and a
last-resort JSON 500. Early refusals answer through the same renderer as the routes' errors
(:func:`custseg.serving.errors.render_error`). Pure ASGI rather than Starlette's BaseHTTPMiddleware: it
adds no task or stream per request on the scoring path.

``POST /predict`` and ``/score`` (``direct``) are handed straight to their endpoint from here, with the
same errors rendered the same way: the router, the exception middleware and FastAPI's request wrapper
cost ~60-100 us a request, a quarter of the API's time, and do nothing for a route that parses its own
body and takes no dependencies. The routes stay registered on the app as they are (the OpenAPI document,
other methods' 405, the tests that call them through the router).
"""

from __future__ import annotations

import hmac
import logging
import os
import re
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from custseg.errors import (
    AuthenticationError,
    CustsegError,
    DataError,
    ForbiddenError,
    InputTooLargeError,
    UnsupportedMediaTypeError,
    UntrustedHostError,
)
from custseg.serving.errors import HANDLED, render_error
from custseg.serving.metrics import ApiMetrics
from custseg.serving.security import (
    ANONYMOUS,
    HOST_CHECK_EXEMPT,
    LOOPBACK_HOSTS,
    PATH_SCOPES,
    ApiKey,
    _host_name,
    configured_keys,
)
from custseg.settings import Settings

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Endpoint = Callable[[Request], Awaitable[Response]]

logger = logging.getLogger(__name__)

access_logger = logging.getLogger("custseg.access")

OPEN_PATHS = frozenset(
    {"/", "/health/live", "/health/ready", "/docs", "/docs/oauth2-redirect", "/openapi.json"}
)
"""Paths served without an API key: liveness, readiness and the (secret-free) API description."""

KNOWN_PATHS = frozenset({*OPEN_PATHS, "/model", "/metrics", "/predict", "/score", "/feedback"})
JSON_BODY_PATHS = frozenset({"/predict", "/score", "/feedback"})
"""The POST routes; each takes a JSON body (other paths answer POST with 404 or 405)."""
STREAMED_BODY_PATHS = frozenset({"/ui/upload"})
"""Routes that stream their body to disk and enforce their own limit (the Upload page's
``ui_upload_max_mb``, with a page-friendly message), so ``max_body_bytes`` does not apply to them."""
CLIENT_CLOSED = 499
"""Status recorded in metrics and the access log when the client left mid-request (nginx's convention)."""
RID_HEADER = b"x-request-id"
_SANE_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:\-]{1,128}")
_METHODS = frozenset({"GET", "POST", "HEAD", "OPTIONS", "PUT", "DELETE", "PATCH"})


class _RandomBytes:
    """The operating system's random bytes, fetched 4 KiB at a time and handed out in pieces.

    ``os.urandom`` per request was a system call that released the interpreter lock mid-request: with
    the prediction log's writer thread waiting for it, the request then waited for the writer's turn to
    end (bench/bench_app.py: the request thread's CPU with the log on). A new process (or a fork) starts
    from fresh bytes: the pool remembers the process that filled it."""

    SIZE = 4096

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool = b""
        self._at = 0
        self._pid = 0

    def take(self, n: int) -> bytes:
        with self._lock:
            if self._at + n > len(self._pool) or self._pid != os.getpid():
                self._pool, self._at, self._pid = os.urandom(self.SIZE), 0, os.getpid()
            piece = self._pool[self._at : self._at + n]
            self._at += n
            return piece


_RANDOM = _RandomBytes()


def new_request_id() -> str:
    """A UUIDv7 as 32 hex digits: time-ordered, so the prediction log's unique index on request_id
    grows at its end. Random uuid4 ids made every logged batch rewrite pages all over that index,
    which cost more CPU than the rest of the logging as the table grew (see bench/bench_api.py)."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(_RANDOM.take(10), "big")
    high, low = rand >> 68, rand & (2**62 - 1)  # 12 and 62 random bits around the version and variant
    value = (ms & 0xFFFF_FFFF_FFFF) << 80 | 0x7 << 76 | high << 64 | 0b10 << 62 | low
    return f"{value:032x}"


# -- the middleware -------------------------------------------------------------------------------


class ApiMiddleware:
    """Request ids, trusted Host, body limit, API keys and scopes, JSON-only POSTs, metrics and the
    access log, for every HTTP request (pure ASGI)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        settings: Settings,
        metrics: ApiMetrics,
        direct: Mapping[str, Endpoint] | None = None,
    ) -> None:
        self.app = app
        self.direct = dict(direct or {})  # POST path -> endpoint, called without the router
        self.metrics = metrics
        self.max_body = settings.max_body_bytes
        self.keys = configured_keys(settings)
        self.open_paths = OPEN_PATHS | ({"/metrics"} if settings.metrics_open else set())
        trusted = {h.strip().lower() for h in settings.trusted_hosts}
        self.any_host = "*" in trusted
        self.hosts = frozenset({*LOOPBACK_HOSTS, *trusted})
        self._hosts_seen: set[bytes] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        client_id = content_length = presented = host = content_type = None
        for name, value in scope["headers"]:
            if name == RID_HEADER:
                if _SANE_REQUEST_ID.fullmatch(value):
                    client_id = value.decode()
            elif name == b"content-length":
                content_length = value
            elif name == b"content-type":
                content_type = value
            elif name == b"host":
                host = value
            elif name == b"x-api-key":
                presented = value
            elif name == b"authorization" and presented is None and value[:7].lower() == b"bearer ":
                presented = value[7:].strip()
        # The server's own id is the log's key (unique by construction); a client's id is kept beside it.
        request_id = new_request_id()
        scope["custseg.request_id"] = request_id
        scope["custseg.client_request_id"] = client_id
        scope["custseg.started"] = started
        path = scope["path"]
        route = path if path in KNOWN_PATHS else "other"
        rid_header = (RID_HEADER, (client_id or request_id).encode())
        status_holder = [500]
        started_response = [False]

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder[0] = message["status"]
                started_response[0] = True
                message["headers"] = [*message.get("headers", ()), rid_header]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            early = self._refuse(scope, host, presented, content_type, content_length)
            if early is not None:
                await send_error(send_with_id, early, request_id, client_id)
            else:
                limited = receive if path in STREAMED_BODY_PATHS else self._limited(receive)
                endpoint = self.direct.get(path) if scope["method"] == "POST" else None
                if endpoint is not None:
                    await call_direct(endpoint, scope, limited, send_with_id)
                else:
                    await self.app(scope, limited, send_with_id)
        except ClientDisconnect:
            # The client left before sending its whole body: nothing to answer, and not a server error.
            status_holder[0] = CLIENT_CLOSED
            logger.info("request %s: the client disconnected before the body was complete", request_id)
        except Exception as exc:
            if isinstance(exc, CustsegError):
                logger.info("request %s refused: %s", request_id, exc)
            else:
                logger.exception("request %s (client id %s) failed", request_id, client_id)
            if not started_response[0]:
                await send_error(send_with_id, exc, request_id, client_id)
        finally:
            self.metrics.in_flight.dec()
            elapsed = time.perf_counter() - started
            status = status_holder[0]
            method = scope["method"] if scope["method"] in _METHODS else "other"
            self.metrics.count_request(method, route, status, elapsed)
            if access_logger.isEnabledFor(logging.INFO):
                access_logger.info(
                    orjson.dumps(
                        {
                            "ts": time.time(),
                            "request_id": request_id,
                            "client_request_id": client_id,
                            "method": scope["method"],
                            "path": path,
                            "status": status,
                            "latency_ms": round(elapsed * 1000, 3),
                            "model_version": scope.get("custseg.model_version"),
                            "key": scope.get("custseg.key"),
                            "client": (scope.get("client") or (None,))[0],
                        }
                    ).decode()
                )

    def _refuse(
        self,
        scope: Scope,
        host: bytes | None,
        presented: bytes | None,
        content_type: bytes | None,
        content_length: bytes | None,
    ) -> Exception | None:
        """The first reason to answer without running the route, or None (sets the caller's key)."""
        path = scope["path"]
        if not self.any_host and host is not None and host not in self._hosts_seen:
            name = _host_name(host)
            if name in self.hosts:
                if len(self._hosts_seen) < 64:  # Host headers seen and trusted, as sent: checked once
                    self._hosts_seen.add(host)
            elif path not in HOST_CHECK_EXEMPT:
                return UntrustedHostError(
                    f"this server does not answer to the host name {name[:100]!r}; "
                    "the operator can add it to CUSTSEG_TRUSTED_HOSTS"
                )
        if not self.keys:
            scope["custseg.key"] = ANONYMOUS
        elif path not in self.open_paths and not is_ui_path(path):
            key = self._authenticate(presented)
            if key is None:
                return AuthenticationError("a valid API key is required (X-API-Key or Authorization: Bearer)")
            scope["custseg.key"] = key.name
            needed = PATH_SCOPES.get(path)
            if needed is not None and needed not in key.scopes:
                return ForbiddenError(
                    f"API key {key.name} may not use {path}: it needs the '{needed}' scope "
                    f"(a key in CUSTSEG_{needed.upper()}_KEYS or CUSTSEG_API_KEYS); "
                    f"this key has: {', '.join(sorted(key.scopes))}"
                )
        if scope["method"] == "POST" and path in JSON_BODY_PATHS and not _is_json(content_type):
            return UnsupportedMediaTypeError(
                "send the body as JSON with the header Content-Type: application/json"
            )
        if content_length is not None and path not in STREAMED_BODY_PATHS:
            try:
                declared = int(content_length)
            except ValueError:
                return DataError("invalid Content-Length header")
            if declared > self.max_body:
                return InputTooLargeError(f"request body is larger than {self.max_body} bytes")
        return None

    def _authenticate(self, presented: bytes | None) -> ApiKey | None:
        if not presented:
            return None
        matched = None
        for key in self.keys:  # compare with every key: timing says nothing about which matched
            if hmac.compare_digest(key.secret, presented):
                matched = key
        return matched

    def _limited(self, receive: Receive) -> Receive:
        limit = self.max_body
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:  # chunked bodies have no Content-Length: count as they stream in
                    raise InputTooLargeError(f"request body is larger than {limit} bytes")
            return message

        return counted


async def call_direct(endpoint: Endpoint, scope: Scope, receive: Receive, send: Send) -> None:
    """Run a route's endpoint without the router: its errors answer as the app's exception handler
    answers them (:data:`~custseg.serving.errors.HANDLED`, rendered by ``render_error``); anything else
    reaches the middleware's last-resort 500, as it does through the router."""
    try:
        response = await endpoint(Request(scope, receive))
    except HANDLED as exc:
        response = render_error(exc, scope["custseg.request_id"], scope["custseg.client_request_id"])
    await response(scope, receive, send)


def is_ui_path(path: str) -> bool:
    """The web app (``/ui``, ``/ui/...``): its pages decide access themselves (custseg.serving.ui.pages),
    and its form posts carry a CSRF token instead of being JSON."""
    return path == "/ui" or path.startswith("/ui/")


def _is_json(content_type: bytes | None) -> bool:
    """``application/json``, parameters (charset) allowed: a type browsers never send cross-site
    without asking first (CORS preflight), unlike text/plain or a form."""
    if content_type is None:
        return False
    return content_type.split(b";", 1)[0].strip().lower() == b"application/json"


async def send_error(send: Send, exc: BaseException, request_id: str, client_id: str | None) -> None:
    """Answer ``exc`` as the routes' error handler would, straight on the ASGI channel."""
    response = render_error(exc, request_id, client_id)
    await send(
        {"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers}
    )
    await send({"type": "http.response.body", "body": response.body})
