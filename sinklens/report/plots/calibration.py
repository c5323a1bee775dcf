"""Figures of attention calibration (ACT, notebook 08). Each takes the tables of
:func:`sinklens.assess.calibration_search.calibration_head_search` or :mod:`sinklens.assess.calibration_effects`,
runs no model and returns a plotly Figure."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from ...assess.calibration_search import ACT_RECIPE, KEPT, CalibrationSearch
from ...core.validate import check_frame, check_type
from .census import head_label

_COLORS = {KEPT: "#d62728", ACT_RECIPE: "#7f7f7f"}


def _error_bars(rows: pd.DataFrame, value: str, low: str, high: str) -> dict:
    return {"type": "data", "symmetric": False, "array": rows[high] - rows[value],
            "arrayminus": rows[value] - rows[low]}


def gain_heatmap(search: CalibrationSearch, *, marked: Sequence[tuple[int, int]] = ()) -> go.Figure:
    """Gain of the search metric per head calibrated alone (search items), layer x head; blank where a head was not
    searched, ``x`` on ``marked`` heads (e.g. the sink-specialized ones), ``*`` on the kept heads.

    Args:
        search: a :class:`~sinklens.assess.calibration_search.CalibrationSearch`.
        marked: ``(layer, head)`` pairs to mark.
    """
    search = check_type(search, CalibrationSearch, "search")
    n_layers, n_heads = search.settings["n_layers"], search.settings["n_heads"]
    grid = search.gain_grid(n_layers, n_heads)
    finite = np.abs(grid[np.isfinite(grid)])
    bound = float(finite.max()) if finite.size and finite.max() > 0 else 1e-3
    text = [["" for _ in range(n_heads)] for _ in range(n_layers)]
    for layer, head in marked:
        text[layer][head] = "x"
    for layer, head in search.kept:
        text[layer][head] += "*"
    fig = go.Figure(go.Heatmap(z=grid, x=list(range(n_heads)), y=list(range(n_layers)), text=text,
                               texttemplate="%{text}", zmid=0, zmin=-bound, zmax=bound, colorscale="RdBu",
                               colorbar={"title": "gain"},
                               hovertemplate="L%{y}.H%{x}: gain %{z:.4f}<extra></extra>"))
    fig.update_layout(title=f"Gain of {search.metric} per head calibrated alone (search items; x: sink-specialized, "
                            "*: kept)", xaxis_title="head", yaxis_title="layer", xaxis={"dtick": 1},
                      yaxis={"dtick": 1}, height=max(400, 22 * n_layers + 150))
    return fig


def mass_screen(search: CalibrationSearch) -> go.Figure:
    """Attention mass each head's calibration moves on the screen prompts (layer x head), ``o`` on the candidates.

    Args:
        search: a :class:`~sinklens.assess.calibration_search.CalibrationSearch` with a mass screen.
    """
    search = check_type(search, CalibrationSearch, "search")
    n_layers, n_heads = search.settings["n_layers"], search.settings["n_heads"]
    grid = np.full((n_layers, n_heads), np.nan)
    text = [["" for _ in range(n_heads)] for _ in range(n_layers)]
    for _, row in search.mass.iterrows():
        grid[int(row["layer"]), int(row["head"])] = row["moved"]
        if row["candidate"]:
            text[int(row["layer"])][int(row["head"])] = "o"
    fig = go.Figure(go.Heatmap(z=grid, x=list(range(n_heads)), y=list(range(n_layers)), text=text,
                               texttemplate="%{text}", colorscale="Viridis", colorbar={"title": "moved"},
                               hovertemplate="L%{y}.H%{x}: moves %{z:.3f} per query<extra></extra>"))
    fig.update_layout(title="Mass screen: attention each head's calibration moves per query (screen prompts; o: "
                            "candidates)", xaxis_title="head", yaxis_title="layer", xaxis={"dtick": 1},
                      yaxis={"dtick": 1}, height=max(400, 22 * n_layers + 150))
    return fig


def layer_screen(search: CalibrationSearch) -> go.Figure:
    """Gain of the search metric per layer calibrated whole (search items), with its bootstrap interval; the layers
    whose heads were searched in red.

    Args:
        search: a :class:`~sinklens.assess.calibration_search.CalibrationSearch` with a layer screen.
    """
    search = check_type(search, CalibrationSearch, "search")
    rows = search.layers
    colors = ["#d62728" if c else "#1f77b4" for c in rows["candidate"]] if len(rows) else []
    fig = go.Figure(go.Bar(x=rows["layer"], y=rows["gain"], marker_color=colors,
                           error_y=_error_bars(rows, "gain", "gain_low", "gain_high") if len(rows) else None,
                           hovertemplate="layer %{x}: gain %{y:.4f}<extra></extra>"))
    fig.add_hline(y=0, line_color="black")
    fig.update_layout(title=f"Layer screen: gain of {search.metric}, every head of one layer calibrated (search "
                            "items; red: searched per head)", xaxis_title="layer", yaxis_title="gain",
                      xaxis={"dtick": 1})
    return fig


def held_out_gains(search: CalibrationSearch, *, metrics: Sequence[str] | None = None) -> go.Figure:
    """Held-out gain per metric (task group) of the kept heads and of ACT's recipe calibrated together, with the
    bootstrap intervals.

    Args:
        search: a :class:`~sinklens.assess.calibration_search.CalibrationSearch`.
        metrics: the metrics shown (None: every accuracy, ``lm/loss`` and the search metric, no ``acc_norm``).
    """
    search = check_type(search, CalibrationSearch, "search")
    fig = go.Figure()
    for name in (KEPT, ACT_RECIPE):
        rows = search.held_out(name)
        if rows.empty:
            continue
        keep = (rows["metric"].isin(metrics) if metrics is not None
                else ~rows["metric"].str.contains("acc_norm") & (rows["metric"] != "lm/ppl"))
        rows = rows[keep]
        label = f"{'kept heads' if name == KEPT else 'ACT recipe'} ({int(rows['n_heads'].iloc[0])} heads)"
        fig.add_trace(go.Bar(name=label, x=rows["metric"], y=rows["gain"], marker_color=_COLORS[name],
                             error_y=_error_bars(rows, "gain", "gain_low", "gain_high"),
                             hovertemplate="%{x}: gain %{y:.4f}<extra></extra>"))
    fig.add_hline(y=0, line_color="black")
    fig.update_layout(title=f"Held-out gain per task group, calibrated together ({search.settings['ci']:.0%} "
                            "bootstrap intervals)", xaxis_title="metric", yaxis_title="gain (retention - 1)",
                      barmode="group")
    return fig


def sinks_before_after(table: pd.DataFrame) -> go.Figure:
    """alpha_0 and non-first sinks per prompt of the calibrated heads, without and with the calibration.

    Args:
        table: a :func:`sinklens.assess.calibration_effects.calibration_census` table.
    """
    table = check_frame(table, ["layer", "head", "alpha0_before", "alpha0_after", "non_first_before",
                                "non_first_after"], "table", "sinklens.assess.calibration_effects.calibration_census")
    labels = [head_label(l, h) for l, h in zip(table["layer"], table["head"])]
    fig = go.Figure([go.Bar(name="alpha_0 dense", x=labels, y=table["alpha0_before"], marker_color="#9ecae1"),
                     go.Bar(name="alpha_0 calibrated", x=labels, y=table["alpha0_after"], marker_color="#08519c"),
                     go.Bar(name="non-first sinks dense", x=labels, y=table["non_first_before"], yaxis="y2",
                            marker_color="#fcae91"),
                     go.Bar(name="non-first sinks calibrated", x=labels, y=table["non_first_after"], yaxis="y2",
                            marker_color="#a50f15")])
    fig.update_layout(title="Calibrated heads: alpha_0 and non-first sinks per prompt, dense and calibrated",
                      barmode="group", yaxis={"title": "alpha_0 (mean over prompts)"},
                      yaxis2={"title": "non-first sinks per prompt", "overlaying": "y", "side": "right"},
                      xaxis_title="head")
    return fig


def edits_side_by_side(table: pd.DataFrame) -> go.Figure:
    """Held-out retention of QK pruning, whole-head removal, calibration and pruning plus calibration of the same
    heads, with the bootstrap intervals.

    Args:
        table: a :func:`sinklens.assess.calibration_effects.calibration_comparison` table.
    """
    table = check_frame(table, ["method", "retention", "ci_low", "ci_high"], "table",
                        "sinklens.assess.calibration_effects.calibration_comparison")
    fig = go.Figure(go.Bar(x=table["method"], y=table["retention"],
                           error_y=_error_bars(table, "retention", "ci_low", "ci_high"),
                           hovertemplate="%{x}: retention %{y:.4f}<extra></extra>"))
    fig.add_hline(y=1, line_dash="dash", line_color="black", annotation_text="dense")
    metric = table.attrs.get("metric", "the metric")
    fig.update_layout(title=f"Same heads, four edits: held-out retention of {metric}", yaxis_title="retention",
                      xaxis_title="edit")
    return fig


__all__ = ["edits_side_by_side", "gain_heatmap", "held_out_gains", "layer_screen", "mass_screen",
           "sinks_before_after"]
