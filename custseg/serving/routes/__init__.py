"""The API's routes, one module per concern; each route parses, calls one function, formats.

Each module has its route functions (plain module-level functions whose collaborators are dependencies
from :mod:`custseg.serving.deps`) and an ``add_routes(app, settings)`` that registers them: the route
table. They are added to the app itself rather than through included ``APIRouter`` objects, which
FastAPI resolves through one more routing layer on every request (~8 us, a measurable share of a
one-row /predict). Errors are raised as custseg errors and rendered by the app's one handler
(:mod:`custseg.serving.errors`).
"""

from __future__ import annotations

from fastapi import FastAPI

from custseg.serving.routes import feedback, health, metrics, model, scoring
from custseg.settings import Settings

ROUTE_MODULES = (scoring, feedback, health, model, metrics)
"""In the order the OpenAPI document lists them (scoring first: the first routes matched, too)."""


def add_routes(app: FastAPI, settings: Settings) -> None:
    """Register every route of the API on ``app``."""
    for module in ROUTE_MODULES:
        module.add_routes(app, settings)
