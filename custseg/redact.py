"""Secrets never printed: URIs and messages with their credentials replaced by ``***``.

Use `redact_uri` on every tracking, registry or database URI before it reaches a log line, a CLI
message or an error; use `redact_text` on text that may embed one (a driver's or MLflow's error message).
"""

from __future__ import annotations

import re

MASK = "***"
SECRET_PARAMS = frozenset(
    {
        "password", "passwd", "pwd", "pass", "secret", "token", "access_token", "auth", "authorization",
        "api_key", "apikey", "key", "sas", "sig", "signature", "credential",
        "client_secret", "x-amz-signature", "x-amz-credential", "x-amz-security-token",
    }
)  # fmt: skip
"""Query parameters whose values are secrets (lower case); Azure SAS tokens and AWS presigned URLs
spread theirs over ``sig``/``se``/``sp``/``sv`` and ``X-Amz-*``."""

# greedy up to the last "@" of the authority: a password may contain an unencoded "@"
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/\s?#'\"]+)@")
_SECRET_QUERY = re.compile(
    r"(?P<name>[?&;](?:"
    + "|".join(re.escape(p) for p in sorted(SECRET_PARAMS))
    + r"))=(?P<value>[^&#\s'\"]*)",
    re.IGNORECASE,
)


def redact_uri(uri: str | None) -> str:
    """``uri`` without user, password and secret query values (``http://***@host/``, ``?token=***``).

    Only the secrets are replaced; everything else stays as written (``sqlite:///`` paths included)."""
    return redact_text(uri) if uri else ""


def redact_text(text: str) -> str:
    """``text`` with credentials inside any URI it contains replaced by ``***`` (for error messages)."""
    masked = _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    return _SECRET_QUERY.sub(lambda m: f"{m['name']}={MASK}", masked)
