"""Vega-Lite specs for the pages' charts, built on the server as plain dicts (rendered by vega-embed).

One cohesive module: every page's charts follow the same conventions (a title, axis titles with units,
a legend, tooltips, the ``$schema`` identifier), which stay consistent only while they sit side by side.
"""

from __future__ import annotations

from datetime import UTC, datetime
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


# -- Upload and Segments pages (issue 14) ------------------------------------------------------------


def segment_counts_spec(counts: dict[str, int], title: str) -> dict[str, Any]:
    """A horizontal bar per segment: how many customers of a scored file it holds."""
    total = sum(counts.values()) or 1
    values = [{"segment": s, "customers": n, "share": round(n / total, 6)} for s, n in counts.items()]
    return {
        "$schema": SCHEMA,
        "title": title,
        "width": "container",
        "height": {"step": 28},
        "data": {"values": values},
        "mark": {"type": "bar"},
        "encoding": {
            "y": {"field": "segment", "type": "nominal", "title": "Segment", "sort": None},
            "x": {"field": "customers", "type": "quantitative", "title": "Customers (count)"},
            "color": {"field": "segment", "type": "nominal", "title": "Segment", "sort": None},
            "tooltip": [
                {"field": "segment", "title": "Segment"},
                {"field": "customers", "title": "Customers", "format": ","},
                {"field": "share", "title": "Share", "format": ".1%"},
            ],
        },
    }


def segment_sizes_spec(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Customers per segment on each snapshot date (lines with points), from ``segment_sizes`` rows."""
    values = [
        {
            "date": r["date"],
            "segment": r["segment"],
            "customers": int(r["count"]),
            "share": round(float(r["share"] or 0.0), 6),
            "change": "none (first date)" if r["count_change"] is None else f"{int(r['count_change']):+,}",
        }
        for r in rows
    ]
    return {
        "$schema": SCHEMA,
        "title": "Customers per segment on each snapshot date",
        "width": "container",
        "height": 260,
        "data": {"values": values},
        "mark": {"type": "line", "point": {"size": 60}},
        "encoding": {
            # ordinal: one tick per recorded date (snapshots are days apart, not a continuous series)
            "x": {"field": "date", "type": "ordinal", "title": "Snapshot date", "axis": {"labelAngle": 0}},
            "y": {"field": "customers", "type": "quantitative", "title": "Customers (count)"},
            "color": {"field": "segment", "type": "nominal", "title": "Segment"},
            "tooltip": [
                {"field": "date", "title": "Date"},
                {"field": "segment", "title": "Segment"},
                {"field": "customers", "title": "Customers", "format": ","},
                {"field": "share", "title": "Share", "format": ".1%"},
                {"field": "change", "title": "Change from the previous date"},
            ],
        },
    }


def migration_spec(moves: dict[str, Any]) -> dict[str, Any]:
    """The migration matrix as a heat map: customers per (segment on the earlier date, on the later date),
    from :func:`custseg.workflows.segments.segment_moves`; the count is written in each cell."""
    attribution = moves["attribution"]
    largest = max((n for row in moves["matrix"].values() for n in row.values()), default=0)
    values = [
        {
            "dark": n > largest / 2,
            "from": source,
            "to": target,
            "customers": int(n),
            "share": round(float(moves["shares"][source][target]), 6),
            "model_moves": int(attribution["model"][source][target]),
            "customer_moves": int(attribution["customer"][source][target]),
        }
        for source, row in moves["matrix"].items()
        for target, n in row.items()
    ]
    order = list(moves["matrix"])
    encoding = {
        "x": {
            "field": "to",
            "type": "nominal",
            "title": f"Segment on {moves['to']}",
            "sort": order,
            "axis": {"labelAngle": 0, "orient": "top"},
        },
        "y": {"field": "from", "type": "nominal", "title": f"Segment on {moves['from']}", "sort": order},
    }
    tooltip = [
        {"field": "from", "title": f"On {moves['from']}"},
        {"field": "to", "title": f"On {moves['to']}"},
        {"field": "customers", "title": "Customers", "format": ","},
        {"field": "share", "title": "Share of the row", "format": ".1%"},
        {"field": "model_moves", "title": "Moved by the model", "format": ","},
        {"field": "customer_moves", "title": "Moved by behaviour", "format": ","},
    ]
    return {
        "$schema": SCHEMA,
        "title": f"Customers by segment on {moves['from']} (rows) and {moves['to']} (columns)",
        "width": "container",
        "height": {"step": 56},
        "data": {"values": values},
        "encoding": encoding,
        "layer": [
            {
                "mark": {"type": "rect"},
                "encoding": {
                    "color": {
                        "field": "customers",
                        "type": "quantitative",
                        "title": "Customers (count)",
                        "scale": {"scheme": "blues"},
                    },
                    "tooltip": tooltip,
                },
            },
            {
                "mark": {"type": "text", "fontSize": 13},
                "encoding": {
                    "text": {"field": "customers", "type": "quantitative", "format": ","},
                    "color": {
                        "condition": {"test": "datum.dark", "value": "white"},
                        "value": "black",
                    },
                    "tooltip": tooltip,
                },
            },
        ],
    }


# -- the Monitoring and Models pages (time axes share one domain; promotions are dashed rules) ------------

TIME_FORMAT = "%Y-%m-%d %H:%M"


def _ms(values: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The values with ``time`` (ISO 8601, UTC) as epoch milliseconds, what Vega reads without parsing."""
    return [
        {**v, "time": datetime.fromisoformat(str(v["time"]).replace("Z", "+00:00")).timestamp() * 1000}
        for v in values
    ]


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _time_x(domain: tuple[float, float]) -> dict[str, Any]:
    """The x encoding of every monitoring chart: bucket start in UTC over the window's fixed domain."""
    return {
        "field": "time",
        "type": "temporal",
        "title": "Time (UTC)",
        # ISO strings: Vega-Lite reads numbers in a temporal domain as nothing (NaN)
        "scale": {"type": "utc", "domain": [_iso(domain[0]), _iso(domain[1])]},
        "axis": {"labelAngle": 0, "labelOverlap": True},
    }


def _time_tooltip() -> dict[str, Any]:
    return {
        "field": "time",
        "type": "temporal",
        "title": "Bucket start (UTC)",
        "format": TIME_FORMAT,
        "formatType": "utc",
    }


def _promotion_layers(promotions: list[dict[str, Any]], domain: tuple[float, float]) -> list[dict[str, Any]]:
    """A dashed vertical rule and a label at each promotion to champion (its own legend, "Registry")."""
    if not promotions:
        return []
    values = _ms(
        [
            {"time": p["time"], "label": p["label"], "how": p["how"], "event": "promotion to champion"}
            for p in promotions
        ]
    )
    x = _time_x(domain)
    return [
        {
            "data": {"values": values},
            "mark": {"type": "rule", "strokeWidth": 2, "color": "#6e7781"},
            "encoding": {
                "x": x,
                "strokeDash": {
                    "field": "event",
                    "type": "nominal",
                    "title": "Registry",
                    "scale": {"domain": ["promotion to champion"], "range": [[6, 4]]},
                },
                "tooltip": [
                    {"field": "label", "title": "Promotion"},
                    {"field": "how", "title": "By"},
                    {
                        "field": "time",
                        "type": "temporal",
                        "title": "When (UTC)",
                        "format": TIME_FORMAT,
                        "formatType": "utc",
                    },
                ],
            },
        },
        {
            "data": {"values": values},
            "mark": {
                "type": "text",
                "align": "right",
                "baseline": "top",
                "dx": -4,
                "dy": 2,
                "color": "#57606a",
            },
            "encoding": {"x": x, "y": {"value": 0}, "text": {"field": "label"}},
        },
    ]


def _time_chart(
    title: str,
    layer: dict[str, Any],
    promotions: list[dict[str, Any]],
    domain: tuple[float, float],
    extra_layers: list[dict[str, Any]] | None = None,
    height: int = 200,
) -> dict[str, Any]:
    return {
        "$schema": SCHEMA,
        "title": title,
        "width": "container",
        "height": height,
        "layer": [layer, *(extra_layers or []), *_promotion_layers(promotions, domain)],
        "resolve": {"scale": {"color": "independent"}},
    }


def requests_spec(
    rows: list[dict[str, Any]],
    bucket_text: str,
    promotions: list[dict[str, Any]],
    domain: tuple[float, float],
) -> dict[str, Any]:
    """Requests per bucket, stacked by the model version that answered them."""
    layer = {
        "data": {"values": _ms(rows)},
        "mark": {"type": "bar"},
        "encoding": {
            "x": _time_x(domain),
            "y": {
                "field": "requests",
                "type": "quantitative",
                "title": f"Requests (per {bucket_text})",
                "stack": "zero",
            },
            "color": {"field": "model_version", "type": "nominal", "title": "Model version"},
            "tooltip": [
                _time_tooltip(),
                {"field": "model_version", "title": "Model version"},
                {"field": "requests", "title": "Requests", "format": ","},
                {"field": "rows", "title": "Customers scored", "format": ","},
            ],
        },
    }
    return _time_chart(f"Requests per {bucket_text}", layer, promotions, domain)


def latency_spec(
    rows: list[dict[str, Any]], promotions: list[dict[str, Any]], domain: tuple[float, float]
) -> dict[str, Any]:
    """Mean, 95th percentile (sampled) and largest logged latency per bucket, in milliseconds."""
    names = {
        "latency_mean_ms": "mean",
        "latency_p95_ms": "95th percentile (sample)",
        "latency_max_ms": "largest",
    }
    values = [
        {"time": r["time"], "statistic": label, "ms": r[key]}
        for r in rows
        for key, label in names.items()
        if r.get(key) is not None
    ]
    layer = {
        "data": {"values": _ms(values)},
        "mark": {"type": "line", "point": True},
        "encoding": {
            "x": _time_x(domain),
            "y": {"field": "ms", "type": "quantitative", "title": "Latency (ms)"},
            "color": {
                "field": "statistic",
                "type": "nominal",
                "title": "Latency",
                "scale": {"domain": list(names.values())},
            },
            "tooltip": [
                _time_tooltip(),
                {"field": "statistic", "title": "Latency"},
                {"field": "ms", "title": "ms", "format": ".2f"},
            ],
        },
    }
    return _time_chart("Latency of the logged predictions", layer, promotions, domain)


def mix_spec(
    rows: list[dict[str, Any]],
    bucket_text: str,
    promotions: list[dict[str, Any]],
    domain: tuple[float, float],
) -> dict[str, Any]:
    """The share of each predicted segment per bucket (stacked to 100%)."""
    layer = {
        "data": {"values": _ms(rows)},
        "mark": {"type": "bar"},
        "encoding": {
            "x": _time_x(domain),
            "y": {
                "field": "share",
                "type": "quantitative",
                "title": "Share of predictions (%)",
                "stack": "normalize",
                "axis": {"format": ".0%"},
            },
            "color": {"field": "segment", "type": "nominal", "title": "Segment"},
            "tooltip": [
                _time_tooltip(),
                {"field": "segment", "title": "Segment"},
                {"field": "share", "title": "Share", "format": ".1%"},
                {"field": "rows", "title": "Predictions", "format": ","},
            ],
        },
    }
    return _time_chart(f"Segment mix per {bucket_text}", layer, promotions, domain)


def drift_spec(
    rows: list[dict[str, Any]],
    thresholds: dict[str, float],
    promotions: list[dict[str, Any]],
    domain: tuple[float, float],
) -> dict[str, Any]:
    """PSI in excess of sampling noise per feature and bucket, with the warning and drift thresholds."""
    judged = [r for r in rows if r["status"] != "insufficient"]
    layer = {
        "data": {"values": _ms(judged)},
        "mark": {"type": "line", "point": True},
        "encoding": {
            "x": _time_x(domain),
            "y": {
                "field": "psi_excess",
                "type": "quantitative",
                "title": "PSI above sampling noise (unitless)",
            },
            "color": {"field": "feature", "type": "nominal", "title": "Feature"},
            "tooltip": [
                _time_tooltip(),
                {"field": "feature", "title": "Feature"},
                {"field": "psi_excess", "title": "PSI above noise", "format": ".3f"},
                {"field": "psi", "title": "PSI", "format": ".3f"},
                {"field": "status", "title": "Status"},
                {"field": "rows", "title": "Sampled rows"},
            ],
        },
    }
    levels = [
        {"threshold": thresholds["psi"], "level": f"drift ({thresholds['psi']:g})"},
        {"threshold": thresholds["psi_warn"], "level": f"warning ({thresholds['psi_warn']:g})"},
    ]
    rules = {
        "data": {"values": levels},
        "mark": {"type": "rule", "strokeDash": [2, 2]},
        "encoding": {
            "y": {"field": "threshold", "type": "quantitative"},
            "color": {
                "field": "level",
                "type": "nominal",
                "title": "Threshold",
                "scale": {"range": ["#cf222e", "#bf8700"]},
            },
            "tooltip": [{"field": "level", "title": "Threshold"}],
        },
    }
    return _time_chart(
        "Drift per feature against its threshold", layer, promotions, domain, [rules], height=320
    )


def performance_spec(
    rows: list[dict[str, Any]],
    labels: list[str],
    promotions: list[dict[str, Any]],
    domain: tuple[float, float],
) -> dict[str, Any]:
    """Realised macro-F1 and per-segment recall per bucket, from feedback."""
    names = {"macro_f1": "macro-F1", **{f"recall_{label}": f"recall {label}" for label in labels}}
    values = [
        {"time": r["time"], "metric": title, "value": r[key], "feedback": r["n_feedback"]}
        for r in rows
        for key, title in names.items()
        if key in r
    ]
    layer = {
        "data": {"values": _ms(values)},
        "mark": {"type": "line", "point": True},
        "encoding": {
            "x": _time_x(domain),
            "y": {
                "field": "value",
                "type": "quantitative",
                "title": "Score (0 to 1)",
                "scale": {"domain": [0, 1]},
            },
            "color": {
                "field": "metric",
                "type": "nominal",
                "title": "Metric",
                "scale": {"domain": list(names.values())},
            },
            "tooltip": [
                _time_tooltip(),
                {"field": "metric", "title": "Metric"},
                {"field": "value", "title": "Value", "format": ".3f"},
                {"field": "feedback", "title": "Predictions with feedback"},
            ],
        },
    }
    return _time_chart("Realised performance from feedback", layer, promotions, domain)


def importance_spec(rows: list[dict[str, Any]], threshold: float) -> dict[str, Any]:
    """Each feature's share of the importance: training reference against this window."""
    values = [
        {"feature": r["feature"], "source": source, "share": r[key], "flagged": r["flagged"]}
        for r in rows
        for key, source in (("reference_share", "training reference"), ("current_share", "this window"))
    ]
    return {
        "$schema": SCHEMA,
        "title": f"Importance share per feature (flagged when it moves by {threshold:.0%} or more)",
        "width": "container",
        "data": {"values": values},
        "mark": {"type": "bar"},
        "encoding": {
            "y": {"field": "feature", "type": "nominal", "title": "Feature", "sort": None},
            "yOffset": {"field": "source"},
            "x": {
                "field": "share",
                "type": "quantitative",
                "title": "Share of mean |contribution| (%)",
                "axis": {"format": ".0%"},
            },
            "color": {
                "field": "source",
                "type": "nominal",
                "title": "Rows",
                "scale": {"domain": ["training reference", "this window"], "range": ["#9aa4b2", "#1f6feb"]},
            },
            "tooltip": [
                {"field": "feature", "title": "Feature"},
                {"field": "source", "title": "Rows"},
                {"field": "share", "title": "Share", "format": ".1%"},
                {"field": "flagged", "title": "Flagged"},
            ],
        },
    }


def versions_spec(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Hold-out and realised macro-F1 of each registered version, side by side."""
    values = [
        {"version": f"v{r['version']}", "measure": measure, "macro_f1": r[key]}
        for r in rows
        for key, measure in (("holdout_macro_f1", "hold-out"), ("realised_macro_f1", "realised (feedback)"))
        if r.get(key) is not None
    ]
    return {
        "$schema": SCHEMA,
        "title": "Macro-F1 per version: hold-out at training and realised from feedback",
        "width": "container",
        "data": {"values": values},
        "mark": {"type": "bar"},
        "encoding": {
            "y": {"field": "version", "type": "nominal", "title": "Model version", "sort": None},
            "yOffset": {"field": "measure"},
            "x": {
                "field": "macro_f1",
                "type": "quantitative",
                "title": "Macro-F1 (0 to 1)",
                "scale": {"domain": [0, 1]},
            },
            "color": {
                "field": "measure",
                "type": "nominal",
                "title": "Measured on",
                "scale": {"domain": ["hold-out", "realised (feedback)"], "range": ["#9aa4b2", "#1f6feb"]},
            },
            "tooltip": [
                {"field": "version", "title": "Version"},
                {"field": "measure", "title": "Measured on"},
                {"field": "macro_f1", "title": "Macro-F1", "format": ".4f"},
            ],
        },
    }
