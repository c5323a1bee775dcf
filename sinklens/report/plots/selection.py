"""Figures of multi-layer QK pruning (notebook 05). Each takes a
:class:`~sinklens.assess.selection.LayerSelection`, runs no model and returns a plotly Figure."""

from __future__ import annotations

import plotly.graph_objects as go

from ...assess.selection import LayerSelection
from ...core.errors import InputError
from ...core.validate import check_type

_COLORS = {"single_layer_rank": "#1f77b4", "greedy": "#d62728", "exhaustive": "#2ca02c", "random": "#7f7f7f",
           "head_removal": "#ff7f0e"}


def _layer_text(rows):
    """``rows`` with its layer sets written ``"1,3"`` for hover labels."""
    return rows.assign(layers=rows["layers"].map(lambda v: ",".join(map(str, v))))


def _target_line(fig: go.Figure, target: float) -> None:
    fig.add_hline(y=target, line_dash="dash", line_color="black", annotation_text=f"target {target:.0%}",
                  annotation_position="bottom right")


def single_layer_retention(selection: LayerSelection) -> go.Figure:
    """Bar per candidate layer: retention of the selection metric when only that layer's
    sink-specialized heads are pruned (calibration items), with its bootstrap CI.

    Args:
        selection: a :class:`~sinklens.assess.selection.LayerSelection`.
    """
    sel = check_type(selection, LayerSelection, "selection")
    rows = sel.single_layer.assign(layer=lambda t: t["layers"].map(lambda v: int(v[0]))).sort_values("layer")
    fig = go.Figure(go.Bar(
        x=rows["layer"], y=rows["retention"], customdata=rows[["n_heads", "params_zeroed"]],
        error_y={"type": "data", "symmetric": False, "array": rows["ci_high"] - rows["retention"],
                 "arrayminus": rows["retention"] - rows["ci_low"]},
        hovertemplate="layer %{x}: retention %{y:.3f}<br>%{customdata[0]} heads, %{customdata[1]} Q/K params "
                      "zeroed<extra></extra>"))
    _target_line(fig, sel.target)
    fig.update_layout(title=f"Single-layer retention of {sel.metric} (k = {sel.settings['k']}, search items)",
                      xaxis_title="pruned layer (all its sink-specialized heads)", yaxis_title="retention",
                      xaxis={"dtick": 1})
    return fig


def retention_by_n_layers(selection: LayerSelection, *, show_head_removal: bool = True) -> go.Figure:
    """Held-out retention against the number of pruned layers, one line per strategy (random:
    one line per replicate), with whole-head removal of the same heads dashed.

    Args:
        selection: a :class:`~sinklens.assess.selection.LayerSelection`.
        show_head_removal: add whole-head removal of the same heads.
    """
    sel = check_type(selection, LayerSelection, "selection")
    confirmed = sel.confirmed()
    fig = go.Figure()
    for (strategy, replicate), group in confirmed.groupby(["strategy", "replicate"], sort=False):
        group = group.sort_values("n_layers")
        name = strategy if strategy != "random" else f"random #{replicate + 1}"
        fig.add_trace(go.Scatter(
            x=group["n_layers"], y=group["retention"], mode="lines+markers", name=name,
            line={"color": _COLORS.get(strategy)}, customdata=_layer_text(group)[["layers", "n_heads"]],
            hovertemplate="layers %{customdata[0]} (%{customdata[1]} heads): %{y:.3f}<extra>" + name + "</extra>"))
    removal = sel.confirmed("head_removal")
    if show_head_removal and not removal.empty:
        sets = {tuple(v) for v in confirmed.loc[confirmed["strategy"] != "random", "layers"]}
        rm = removal[removal["layers"].map(tuple).isin(sets)]
        rm = rm[~rm["layers"].map(tuple).duplicated()].sort_values("n_layers")
        fig.add_trace(go.Scatter(x=rm["n_layers"], y=rm["retention"], mode="markers", name="whole-head removal",
                                 marker={"color": _COLORS["head_removal"], "symbol": "x", "size": 9},
                                 customdata=[",".join(map(str, v)) for v in rm["layers"]],
                                 hovertemplate="remove heads of layers %{customdata}: %{y:.3f}<extra></extra>"))
    _target_line(fig, sel.target)
    fig.update_layout(title=f"Retention of {sel.metric} against pruned layers (k = {sel.settings['k']}, "
                            "held-out items)",
                      xaxis_title="number of pruned layers", yaxis_title="retention", xaxis={"dtick": 1})
    return fig


def pareto_frontier(selection: LayerSelection) -> go.Figure:
    """Every held-out QK configuration (pruned heads against retention), coloured by strategy,
    with the Pareto frontier as a step line.

    Args:
        selection: a :class:`~sinklens.assess.selection.LayerSelection`.
    """
    sel = check_type(selection, LayerSelection, "selection")
    confirmed = sel.confirmed()
    fig = go.Figure()
    for strategy, group in confirmed.groupby("strategy", sort=False):
        fig.add_trace(go.Scatter(
            x=group["n_heads"], y=group["retention"], mode="markers", name=strategy,
            marker={"color": _COLORS.get(strategy), "size": 8, "opacity": 0.7},
            customdata=_layer_text(group)[["layers", "params_zeroed"]],
            hovertemplate="layers %{customdata[0]}<br>%{x} heads, %{customdata[1]} Q/K params zeroed<br>"
                          "retention %{y:.3f}<extra>" + strategy + "</extra>"))
    front = sel.frontier()
    fig.add_trace(go.Scatter(x=front["n_heads"], y=front["retention"], mode="lines", name="Pareto frontier",
                             line={"shape": "vh", "color": "black"}))
    _target_line(fig, sel.target)
    fig.update_layout(title=f"Pruned heads against retention of {sel.metric} (held-out items)",
                      xaxis_title="pruned sink-specialized heads", yaxis_title="retention")
    return fig


def head_removal_comparison(selection: LayerSelection) -> go.Figure:
    """Grouped bars per layer set: QK column pruning against whole-head removal of the same heads.

    Args:
        selection: a :class:`~sinklens.assess.selection.LayerSelection`.
    """
    sel = check_type(selection, LayerSelection, "selection")
    table = sel.head_removal_comparison()
    if table.empty:
        raise InputError("No whole-head removal was evaluated: run layer_selection with "
                         'SearchOptions(head_removal="best") or "all".')
    labels = [f"{','.join(map(str, row.layers))} ({row.n_heads} heads)" for row in table.itertuples()]
    fig = go.Figure([
        go.Bar(x=labels, y=table["qk_retention"], name=f"QK pruning, k = {sel.settings['k']}"),
        go.Bar(x=labels, y=table["head_removal_retention"], name="whole-head removal",
               marker_color=_COLORS["head_removal"])])
    _target_line(fig, sel.target)
    fig.update_layout(barmode="group", title=f"QK pruning against removing the same heads ({sel.metric}, held-out)",
                      xaxis_title="pruned layers", yaxis_title="retention")
    return fig


__all__ = ["head_removal_comparison", "pareto_frontier", "retention_by_n_layers", "single_layer_retention"]
