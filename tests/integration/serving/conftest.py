"""Fixtures shared by the serving integration tests."""

from tests.integration.serving.test_server import serving_home  # noqa: F401  (a fixture)
