"""Vega-Lite specs for the pages' charts, built on the server as plain dicts (rendered by vega-embed)."""

from __future__ import annotations

from typing import Any

SCHEMA = "https://vega.github.io/schema/vega-lite/v6.json"
"""The spec's ``$schema``: an identifier vega-embed reads to pick the compiler, never fetched."""


def probabilities_spec(probabilities: dict[str, float], segment: str) -> dict[str, Any]:
    """A horizontal bar per segment: the model's probability, the predicted segment highlighted."""
    values = [
        {"segment": name, "probability": round(p, 6), "predicted": name == segment}
        for name, p in probabilities.items()
    ]
    return {
        "$schema": SCHEMA,
        "title": "Probability of each segment",
        "width": "container",
        "height": {"step": 28},
        "data": {"values": values},
        "mark": {"type": "bar"},
        "encoding": {
            "y": {"field": "segment", "type": "nominal", "title": "Segment", "sort": "-x"},
            "x": {
                "field": "probability",
                "type": "quantitative",
                "title": "Probability (0 to 1)",
                "scale": {"domain": [0, 1]},
            },
            "color": {
                "field": "predicted",
                "type": "nominal",
                "title": "Predicted",
                "scale": {"domain": [True, False], "range": ["#1f6feb", "#9aa4b2"]},
            },
            "tooltip": [
                {"field": "segment", "title": "Segment"},
                {"field": "probability", "title": "Probability", "format": ".3f"},
            ],
        },
    }


def reasons_spec(reasons: list[dict[str, Any]], segment: str) -> dict[str, Any]:
    """A horizontal bar per reason: its contribution to the predicted segment's probability."""
    values = [
        {
            "reason": r["text"],
            "contribution": round(float(r["contribution"]), 6),
            "direction": "towards" if r["contribution"] >= 0 else "away from",
        }
        for r in reasons
    ]
    return {
        "$schema": SCHEMA,
        "title": f"Why {segment}: the top reasons",
        "width": "container",
        "height": {"step": 28},
        "data": {"values": values},
        "mark": {"type": "bar"},
        "encoding": {
            "y": {
                "field": "reason",
                "type": "nominal",
                "title": None,
                "sort": None,
                "axis": {"labelLimit": 360},
            },
            "x": {
                "field": "contribution",
                "type": "quantitative",
                "title": f"Contribution to the probability of {segment}",
            },
            "color": {
                "field": "direction",
                "type": "nominal",
                "title": f"Pushes {segment}",
                "scale": {"domain": ["towards", "away from"], "range": ["#1a7f37", "#cf222e"]},
            },
            "tooltip": [
                {"field": "reason", "title": "Reason"},
                {"field": "contribution", "title": "Contribution", "format": "+.3f"},
            ],
        },
    }
