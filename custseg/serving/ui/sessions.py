"""Sign-in for the web app when the server has API keys: a key is exchanged for a signed session cookie.

The cookie holds the key's name (``key#...``, never the key) and an expiry, signed with HMAC-SHA256.
The signing secret is derived from every configured key, so all workers of one server agree on it with
nothing more to configure, and changing any key signs everyone out. A session whose key was removed is
refused; its scopes are read from the current keys, not from the cookie.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

import orjson

from custseg.serving.security import ApiKey

SESSION_COOKIE = "custseg_session"
SESSION_SECONDS = 8 * 3600
"""How long a sign-in lasts (a working day); then the pages ask for the key again."""
_LABEL = b"custseg web app session v1"


def signing_secret(keys: list[ApiKey]) -> bytes:
    """The session signing secret: an HMAC of every configured key (sorted), under a fixed label."""
    return hmac.new(_LABEL, b"\0".join(sorted(k.secret for k in keys)), hashlib.sha256).digest()


def find_key(keys: list[ApiKey], presented: str) -> ApiKey | None:
    """The configured key equal to ``presented`` (compared with every key, in constant time each)."""
    matched = None
    for key in keys:
        if hmac.compare_digest(key.secret, presented.strip().encode()):
            matched = key
    return matched


def issue(keys: list[ApiKey], key: ApiKey, now: float | None = None) -> str:
    """A session cookie value for ``key``, valid for :data:`SESSION_SECONDS`."""
    expires = int((now or time.time()) + SESSION_SECONDS)
    payload = _b64(orjson.dumps({"k": key.name, "e": expires}))
    return f"{payload}.{_sign(keys, payload)}"


def read(keys: list[ApiKey], value: str | None, now: float | None = None) -> ApiKey | None:
    """The key a valid, unexpired session cookie stands for; None for anything else."""
    if not value or value.count(".") != 1:
        return None
    payload, signature = value.split(".")
    if not hmac.compare_digest(signature, _sign(keys, payload)):
        return None
    try:
        data = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except ValueError:
        return None
    if not isinstance(data, dict) or int(data.get("e", 0)) < (now or time.time()):
        return None
    return next((k for k in keys if k.name == data.get("k")), None)


def _sign(keys: list[ApiKey], payload: str) -> str:
    return _b64(hmac.new(signing_secret(keys), payload.encode(), hashlib.sha256).digest())


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")
