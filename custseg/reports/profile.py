"""The HTML page of ``custseg inspect --html``: a data profile as one self-contained file.

:func:`render_html` turns a :class:`~custseg.core.profile_results.DataProfile` into HTML with inline PNG
plots (feature distributions by segment, correlations) and no external assets, so the page
can be mailed or archived as it is.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any

import numpy as np
import pandas as pd

from custseg import schema
from custseg.core.profile_results import DataProfile

# --------------------------------------------------------------------------------------------------
# HTML report
# --------------------------------------------------------------------------------------------------

_SEGMENT_COLOURS = {"low_value": "#cc3311", "medium_value": "#0077bb", "high_value": "#009988"}


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def distribution_figure(sample: pd.DataFrame) -> Any:
    """Per-feature distributions split by segment (densities, so a tiny segment stays visible)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(4, 3, figsize=(13, 12))
    labels = [label for label in schema.LABELS if (sample[schema.LABEL_COLUMN] == label).any()]
    for ax, feature in zip(axes.flat, schema.FEATURES, strict=False):
        if feature.is_numeric and feature.name != "loyalty_program":
            values = sample[feature.name].astype(float)
            bins = np.histogram_bin_edges(values, bins=30)
            for label in labels:
                part = values[sample[schema.LABEL_COLUMN] == label]
                ax.hist(
                    part,
                    bins=bins,
                    density=True,
                    histtype="step",
                    linewidth=1.6,
                    color=_SEGMENT_COLOURS.get(label),
                    label=f"{label} ({len(part)})",
                )
        else:
            column = sample[feature.name] if not feature.is_numeric else sample[feature.name].astype(int)
            column = column.astype(str)
            categories = sorted(column.unique())
            width = 0.8 / max(len(labels), 1)
            for i, label in enumerate(labels):
                part = column[sample[schema.LABEL_COLUMN] == label]
                shares = part.value_counts(normalize=True)
                ax.bar(
                    np.arange(len(categories)) + i * width,
                    [shares.get(c, 0.0) for c in categories],
                    width=width,
                    color=_SEGMENT_COLOURS.get(label),
                    label=label,
                )
            ax.set_xticks(np.arange(len(categories)) + width * (len(labels) - 1) / 2, categories)
            ax.set_ylabel("share within segment")
        ax.set_title(feature.name, fontsize=10)
    for ax in list(axes.flat)[len(schema.FEATURES) :]:
        ax.axis("off")
    handles, names = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower right", bbox_to_anchor=(0.95, 0.08))
    fig.suptitle(f"feature distributions by segment ({len(sample):,} sampled valid rows, densities)")
    fig.tight_layout()
    return fig


def correlation_figure(sample: pd.DataFrame) -> Any:
    """Pearson correlations of the features (gender as 1 = Male) and the segments (one-vs-rest)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = pd.DataFrame({name: sample[name] for name in schema.NUMERIC_FEATURES}).astype(float)
    table.insert(1, "gender=Male", (sample["gender"] == "Male").astype(float))
    for label in schema.LABELS:
        if (sample[schema.LABEL_COLUMN] == label).any():
            table[f"is_{label}"] = (sample[schema.LABEL_COLUMN] == label).astype(float)
    corr = table.corr().fillna(0.0)
    fig, ax = plt.subplots(figsize=(9, 7.5))
    image = ax.imshow(corr.to_numpy(), cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_xticks(range(len(corr)), corr.columns, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(corr)), corr.columns, fontsize=8)
    for (i, j), value in np.ndenumerate(corr.to_numpy()):
        ax.text(
            j,
            i,
            f"{value:.2f}",
            ha="center",
            va="center",
            fontsize=6,
            color="white" if abs(value) > 0.6 else "black",
        )
    fig.colorbar(image, ax=ax, shrink=0.8)
    ax.set_title("correlation (Pearson) of features and segments", fontsize=10)
    fig.tight_layout()
    return fig


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:,.6g}"


def render_html(data: DataProfile) -> str:
    """A self-contained HTML report: tables plus inline base64 PNG plots, no external assets."""
    parts = [
        f"<h1>custseg inspect: {html.escape(data.source)}</h1>",
        f"<p>{data.rows:,} rows, {len(data.columns)} columns, ~{data.memory_bytes / 1e6:,.1f} MB in memory; "
        f"{data.invalid_rows:,} invalid row(s), {data.duplicate_rows:,} duplicate row(s), "
        f"{data.duplicate_ids:,} conflicting duplicate id(s).</p>",
        "<h2>Structure</h2>",
        _table(
            ["#", "column", "role", "dtype", "non-null", "memory"],
            [
                [c.position, c.name, c.role, c.dtype, f"{c.non_null:,}", f"{c.memory_bytes:,}"]
                for c in data.columns
            ],
        ),
        "<h2>Problems</h2>",
        _table(["column", "problem"], [[f.column or "(rows)", str(f)] for f in data.findings])
        if data.findings
        else "<p>None found.</p>",
        "<h2>Values against the schema's domains</h2>",
        _table(
            [
                "feature",
                "domain",
                "valid",
                "empty",
                "wrong type",
                "not integer",
                "out of domain",
                "min",
                "max",
                "mean",
                "categories",
            ],
            [
                [
                    s.name,
                    s.domain,
                    f"{s.valid:,}",
                    s.empty,
                    s.wrong_type,
                    s.not_integer,
                    s.out_of_domain,
                    _num(s.minimum),
                    _num(s.maximum),
                    _num(s.mean),
                    ", ".join(f"{k} {v:,}" for k, v in s.categories.items()),
                ]
                for s in data.features
            ],
        ),
    ]
    if data.balance is not None:
        parts += [
            "<h2>Class balance</h2>",
            _table(
                ["segment", "rows", "share"],
                [
                    [k, f"{v:,}", f"{v / max(sum(data.balance.counts.values()), 1):.2%}"]
                    for k, v in data.balance.counts.items()
                ],
            ),
            f"<p>{html.escape(data.balance.verdict)}</p>",
            "".join(f"<p class='warn'>warning: {html.escape(w)}</p>" for w in data.balance.warnings),
        ]
    if data.separation:
        parts += [
            "<h2>Features that separate the segments</h2>",
            f"<p>{html.escape(data.separation_method)} ({len(data.sample):,} rows).</p>",
            _table(["feature", "score"], [[k, f"{v:.4f}"] for k, v in data.separation.items()]),
        ]
    if len(data.sample) and schema.LABEL_COLUMN in data.sample:
        parts += [
            "<h2>Distributions by segment</h2>",
            f"<img alt='distributions' src='data:image/png;base64,{_png(distribution_figure(data.sample))}'>",
            "<h2>Correlations</h2>",
            f"<img alt='correlations' src='data:image/png;base64,{_png(correlation_figure(data.sample))}'>",
        ]
    else:
        parts.append(
            "<p>No distributions or correlations: they need the label and every feature column, and at "
            "least one valid row.</p>"
        )
    style = (
        "body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:left}"
        ".warn{color:#a33}img{max-width:100%}"
    )
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>custseg inspect: {html.escape(data.source)}</title><style>{style}</style></head>"
        f"<body>{''.join(parts)}</body></html>"
    )


# --------------------------------------------------------------------------------------------------
# Terminal report (rich renderables; the CLI prints them)
# --------------------------------------------------------------------------------------------------


def _short_domain(name: str) -> str:
    feature = schema.FEATURES_BY_NAME[name]
    if feature.categories is not None:
        return "|".join(feature.categories)
    low = "-inf" if feature.minimum is None else f"{feature.minimum:g}"
    high = "inf" if feature.maximum is None else f"{feature.maximum:g}"
    return f"{feature.kind} [{low}, {high}]"


def rich_report(data: DataProfile) -> list[Any]:
    """The terminal report as rich renderables, in reading order."""
    from rich.table import Table
    from rich.text import Text

    heading = Text(data.source, "bold")
    heading.append(
        f": {data.rows:,} rows, {len(data.columns)} columns, ~{data.memory_bytes / 1e6:,.1f} MB in memory"
    )
    out: list[Any] = [heading]
    structure = Table(title="structure", title_justify="left")
    for name in ("#", "column", "role", "dtype", "non-null", "memory"):
        structure.add_column(name, justify="right" if name in ("#", "non-null", "memory") else "left")
    for c in data.columns:
        style = "red" if c.role == "unknown" else None
        structure.add_row(
            str(c.position), c.name, c.role, c.dtype, f"{c.non_null:,}", f"{c.memory_bytes:,}", style=style
        )
    out.append(structure)

    domains = Table(title="values against the schema's domains", title_justify="left")
    for name in ("feature", "domain", "valid", "problems", "observed"):
        domains.add_column(name, justify="right" if name == "valid" else "left")
    for s in data.features:
        if s.categories:
            observed = ", ".join(f"{k} {v:,}" for k, v in s.categories.items())
        else:
            observed = f"{_num(s.minimum)} – {_num(s.maximum)}" if s.minimum is not None else "-"
        bad = [
            f"{count:,} {what}"
            for count, what in (
                (s.empty, "empty"),
                (s.wrong_type, "wrong type"),
                (s.not_integer, "not integer"),
                (s.out_of_domain, "out of domain"),
            )
            if count
        ]
        domains.add_row(
            s.name,
            _short_domain(s.name),
            f"{s.valid:,}",
            ", ".join(bad),
            observed,
            style=None if s.in_domain else "red",
        )
    out.append(domains)

    if data.findings:
        out.append(
            Text(f"{len(data.findings)} problem(s) ({data.invalid_rows:,} invalid row(s)):", "bold red")
        )
        out += [Text(f"  - {finding}", "red") for finding in data.findings]
    else:
        out.append(
            Text("no problems: every cell is in its domain, no duplicates, all columns known", "green")
        )

    if data.balance is None:
        out.append(Text(f"no {schema.LABEL_COLUMN} column: unlabelled data (fine for scoring, not training)"))
    else:
        total = max(sum(data.balance.counts.values()), 1)
        balance = Table(title="class balance", title_justify="left")
        for name in ("segment", "rows", "share"):
            balance.add_column(name, justify="left" if name == "segment" else "right")
        for label, count in data.balance.counts.items():
            balance.add_row(label, f"{count:,}", f"{count / total:.2%}")
        out.append(balance)
        out.append(Text(data.balance.verdict, "green" if data.balance.trainable else "bold red"))
        out += [Text(f"warning: {w}", "yellow") for w in data.balance.warnings]

    if data.separation:
        # The method is a line of its own: as a table title it would wrap to the narrow table's width.
        out.append(
            Text(f"features that separate the segments: {data.separation_method} ({len(data.sample):,} rows)")
        )
        ranking = Table()
        ranking.add_column("feature")
        ranking.add_column("score", justify="right")
        for name, score in data.separation.items():
            ranking.add_row(name, f"{score:.4f}")
        out.append(ranking)
    return out
