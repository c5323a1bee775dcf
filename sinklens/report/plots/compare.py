"""Figures of the cross-model report (``python -m sinklens compare``): one line or bar per model, side by side.

Every helper takes a table of :func:`sinklens.report.compare.compare_runs` and returns a
``plotly.graph_objects.Figure``; none runs a model.
"""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from ...core.validate import check_frame


def sink_rate_by_depth(depth: pd.DataFrame) -> go.Figure:
    """Sink rate (% of heads with alpha_0 > eps, over prompts) per layer, against relative depth
    ``layer / (n_layers - 1)``: one line per model, so models of different depths line up.

    Args:
        depth: columns ``model``, ``relative_depth``, ``layer``, ``sink_rate_pct``.
    """
    depth = check_frame(depth, ["model", "relative_depth", "layer", "sink_rate_pct"], "depth",
                        "ModelComparison.depth", allow_empty=True)
    fig = go.Figure()
    for model, rows in depth.groupby("model", sort=False):
        fig.add_scatter(x=rows["relative_depth"], y=rows["sink_rate_pct"], mode="lines+markers", name=str(model),
                        customdata=rows["layer"], hovertemplate="layer %{customdata}: %{y:.1f}%<extra></extra>")
    fig.update_layout(title="Sink rate by relative depth", xaxis_title="relative depth (layer / (n_layers - 1))",
                      yaxis_title="sink rate (% of heads)", yaxis_range=[0, 100], width=640, height=420)
    return fig


def sink_rate_by_length(length: pd.DataFrame) -> go.Figure:
    """Sink rate (mean over layers) against context length, one line per model (log-scaled length).

    Args:
        length: columns ``model``, ``length``, ``sink_rate_pct``.
    """
    length = check_frame(length, ["model", "length", "sink_rate_pct"], "length", "ModelComparison.length",
                         allow_empty=True)
    fig = go.Figure()
    for model, rows in length.groupby("model", sort=False):
        fig.add_scatter(x=rows["length"], y=rows["sink_rate_pct"], mode="lines+markers", name=str(model))
    fig.update_layout(title="Sink rate against context length", xaxis_title="context length (tokens)",
                      xaxis_type="log", yaxis_title="sink rate (% of heads)", yaxis_range=[0, 100], width=640,
                      height=420)
    return fig


def model_bars(summary: pd.DataFrame, column: str, title: str, axis: str) -> go.Figure:
    """One bar per model of ``summary[column]`` (a model without the number has no bar).

    Args:
        summary: :attr:`ModelComparison.summary` (columns ``model`` and ``column``).
        column: the number shown.
        title, axis: the figure's title and y axis label.
    """
    summary = check_frame(summary, ["model", column], "summary", "ModelComparison.summary", allow_empty=True)
    fig = go.Figure(go.Bar(x=summary["model"], y=summary[column], text=summary[column].round(3),
                           textposition="outside"))
    fig.update_layout(title=title, yaxis_title=axis, width=640, height=420)
    return fig
