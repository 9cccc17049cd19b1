"""The HTML drift report: a self-contained page (inline PNG plots) from a drift report and its two windows.

It renders what `custseg.core.drift` computed and `custseg.workflows.monitor` assembled; it reads and
writes nothing itself.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    pass
from custseg import schema
from custseg.core.drift import PREDICTION, _is_discrete


def _figure_png(reference: pd.Series, current: pd.Series, name: str, discrete: bool) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.8, 2.8))
    if discrete:
        ref_shares = reference.astype(str).value_counts(normalize=True)
        cur_shares = current.astype(str).value_counts(normalize=True)
        cats = sorted(set(ref_shares.index) | set(cur_shares.index))
        x = np.arange(len(cats))
        ax.bar(x - 0.2, [ref_shares.get(c, 0) for c in cats], 0.4, label="reference", color="#4477aa")
        ax.bar(x + 0.2, [cur_shares.get(c, 0) for c in cats], 0.4, label="current", color="#ee6677")
        ax.set_xticks(x, cats)
        ax.set_ylabel("share")
    else:
        ref = reference.to_numpy(dtype=np.float64)
        cur = current.to_numpy(dtype=np.float64)
        bins = np.histogram_bin_edges(np.concatenate([ref, cur]), bins=30)
        ax.hist(ref, bins=bins.tolist(), density=True, alpha=0.55, label="reference", color="#4477aa")
        ax.hist(cur, bins=bins.tolist(), density=True, alpha=0.55, label="current", color="#ee6677")
        ax.set_ylabel("density")
    ax.set_title(name, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def html_report(report: Mapping[str, Any], reference: pd.DataFrame, current: pd.DataFrame) -> str:
    """A self-contained HTML drift report: summary, one row and one inline PNG plot per feature."""
    colours = {"drift": "#c0392b", "warn": "#d68910", "ok": "#1e8449"}
    model = report.get("model", {})
    rows = []
    for name, result in [*report["features"].items(), (PREDICTION, report["prediction"])]:
        status = str(result.get("status", ""))
        cells = [
            html.escape(name),
            f'<b style="color:{colours.get(status, "#555")}">{html.escape(status)}</b>',
            html.escape(str(result.get("test", "-"))),
            _num(result.get("p_value")),
            _num(result.get("psi")),
            f"{_num(result.get('effect'))} {html.escape(str(result.get('effect_name', '')))}",
        ]
        plot = ""
        column = schema.PREDICTED_COLUMN if name == PREDICTION else name
        if status not in ("insufficient", "not_available") and column in current and len(current):
            ref_col = reference.get(name)
            if name == PREDICTION:
                shares = result.get("reference_shares", {})
                ref_col = pd.Series([k for k, v in shares.items() for _ in range(round(v * 1000))], dtype=str)
            if ref_col is not None:
                discrete = not pd.api.types.is_numeric_dtype(ref_col) or _is_discrete(ref_col)
                png = _figure_png(ref_col, current[column], name, discrete)
                plot = f'<img alt="{html.escape(name)}" src="data:image/png;base64,{png}">'
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + f"<td>{plot}</td></tr>")
    perf = report.get("performance", {})
    perf_text = (
        ", ".join(
            f"{html.escape(k)} {v:.4f}" if k != "n_feedback" else f"{int(v)} labelled rows"
            for k, v in perf.items()
        )
        if perf.get("n_feedback")
        else "no feedback (true segments) in this window"
    )
    verdict = "DRIFT DETECTED" if report["drift_detected"] else str(report["status"]).replace("_", " ")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>custseg drift report</title>
<style>body{{font-family:sans-serif;margin:2em;color:#222}}table{{border-collapse:collapse}}
td,th{{border-bottom:1px solid #ddd;padding:4px 10px;text-align:left;vertical-align:middle}}</style></head>
<body><h1>custseg drift report: {html.escape(verdict)}</h1>
<p>model {html.escape(str(model.get("name", "")))} version {html.escape(str(model.get("version", "")))};
current window: {report["n_current"]} rows from {html.escape(str(report.get("source", "")))};
reference: {report["n_reference"]} training rows.
{html.escape(str(report.get("reason", "")))}</p>
<p>Realised performance: {perf_text}.</p>
<table><tr><th>feature</th><th>status</th><th>test</th><th>p-value</th><th>PSI</th><th>effect</th>
<th>reference (blue) vs current (red)</th></tr>
{"".join(rows)}
</table>
<p>Drift = p &lt; {report["thresholds"]["p_value"]} and (PSI &ge; {report["thresholds"]["psi"]} or
(PSI &ge; {report["thresholds"]["psi_warn"]} and effect &ge; {report["thresholds"]["effect"]})).</p>
</body></html>
"""


def _num(value: Any) -> str:
    return "-" if value is None else f"{float(value):.4g}"
