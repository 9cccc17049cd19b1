"""GET /model: the model being served, where it came from, how it scored at training, its input schema."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.responses import Response

from custseg import schema
from custseg.serving.deps import ServedModel
from custseg.serving.holder import LoadedModel
from custseg.serving.models import ModelDetails, json_response
from custseg.serving.openapi import answers
from custseg.settings import Settings


async def model_details(loaded: ServedModel) -> Response:
    return json_response(describe(loaded))


def describe(loaded: LoadedModel) -> dict[str, Any]:
    """The answer (ModelDetails) for the loaded model."""
    ref = loaded.ref
    return {
        "name": ref.name,
        "version": ref.version,
        "run_id": ref.run_id,
        "trained_at": ref.created_at,
        "loaded_at": loaded.loaded_at,
        "aliases": list(ref.aliases),
        "backend": loaded.scorer.backend,
        "classes": list(loaded.scorer.classes),
        "holdout_metrics": {
            k.removeprefix("holdout_"): v for k, v in sorted(ref.metrics.items()) if k.startswith("holdout_")
        },
        "features": [
            {
                "name": f.name,
                "kind": f.kind,
                "description": f.description,
                "domain": f.domain_text(),
                "minimum": f.minimum,
                "maximum": f.maximum,
                "categories": list(f.categories) if f.categories else None,
            }
            for f in schema.FEATURES
        ],
    }


def add_routes(app: FastAPI, settings: Settings) -> None:
    app.add_api_route(
        "/model",
        model_details,
        methods=["GET"],
        response_class=Response,
        responses=answers(ModelDetails, 400, 401, 503),
        summary="The model being served and its input schema",
        tags=["model"],
    )
