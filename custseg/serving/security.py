"""API keys and their scopes, and which Host names and bind addresses are safe to serve.

Keys come from the settings (``CUSTSEG_API_KEYS`` has every scope; ``CUSTSEG_SCORING_KEYS`` and the
others one each) and are named in logs and feedback by a digest prefix, never by the key. The checks
themselves run in :mod:`custseg.serving.middleware`.
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass, field

from custseg.settings import Settings

SCOPES = ("scoring", "feedback", "admin")
"""What an API key may do: score, record feedback, operate (metrics, admin actions)."""
PATH_SCOPES = {"/predict": "scoring", "/score": "scoring", "/feedback": "feedback", "/metrics": "admin"}
"""The scope each path needs; other keyed paths (``/model``) accept a key of any scope."""
ANONYMOUS = "anonymous"
"""The caller's identity when no API keys are configured (loopback serving)."""
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})
HOST_CHECK_EXEMPT = frozenset({"/", "/health/live", "/health/ready"})
"""Probes (load balancers, Kubernetes) use the pod address as Host; these paths reveal nothing."""


# -- API keys and their scopes ----------------------------------------------------------------------


@dataclass(frozen=True)
class ApiKey:
    """One accepted key: the secret, a short non-secret name for logs and feedback, its scopes."""

    secret: bytes = field(repr=False)
    name: str
    scopes: frozenset[str]


def key_name(key: str) -> str:
    """``key#`` and the first 8 hex digits of the key's SHA-256: says which key, reveals nothing."""
    return "key#" + hashlib.sha256(key.encode()).hexdigest()[:8]


def configured_keys(settings: Settings) -> list[ApiKey]:
    """Every configured key with the union of its scopes; ``api_keys`` (the original list) means all."""
    scopes: dict[str, set[str]] = {}
    for key in settings.api_keys:
        scopes.setdefault(key, set()).update(SCOPES)
    for scope, keys in (
        ("scoring", settings.scoring_keys),
        ("feedback", settings.feedback_keys),
        ("admin", settings.admin_keys),
    ):
        for key in keys:
            scopes.setdefault(key, set()).add(scope)
    return [ApiKey(k.encode(), key_name(k), frozenset(v)) for k, v in scopes.items()]


def _host_name(host: bytes) -> str:
    """The name part of a Host header, lower case: ``[::1]:8000`` -> ``[::1]``, ``a.b:80`` -> ``a.b``."""
    text = host.decode("latin-1").strip().lower()
    if text.startswith("["):
        return text.split("]", 1)[0] + "]"
    return text.rsplit(":", 1)[0] if text.count(":") == 1 else text


# -- running it -----------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def is_wildcard(host: str) -> bool:
    """0.0.0.0 or :: (every address of the machine)."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        return False


def serving_hosts(settings: Settings, host: str) -> list[str]:
    """The Host names to answer: the configured ones, else the bind address (any for a wildcard bind,
    which needs API keys or --insecure, so a DNS-rebinding page gains nothing); loopback always."""
    if settings.trusted_hosts:
        return list(settings.trusted_hosts)
    return ["*"] if is_wildcard(host) else [host]
