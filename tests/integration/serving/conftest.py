"""Fixtures shared by the serving integration tests."""

from pathlib import Path
from typing import Any

from custseg.settings import Settings
from tests.integration.serving.test_server import serving_home  # noqa: F401  (a fixture)


def ui_settings(home: Path, **overrides: Any) -> Settings:
    """Settings for an in-process app (TestClient): the embedded registry, no model polling, the test
    client's Host trusted, no prediction log unless a test turns it on."""
    values = {
        "home": home,
        "tracking_uri": None,
        "model_poll_seconds": 0,
        "trusted_hosts": "testserver",
        "prediction_log_enabled": False,
    }
    return Settings(**(values | overrides))
