"""Figures of notebook 06: sinks against context length, non-first sinks and massive tokens against position,
and one head's attention to the first keys over a long prompt. Each helper returns a plotly figure."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float
from plotly.subplots import make_subplots
from torch import Tensor

from ...core.errors import InputError
from ...core.validate import check_frame
from ...measure.long_context import sink_heads_over_length, sink_rate_by_length
from ...measure.massive_tokens import KINDS

_KIND_COLORS = dict(zip(KINDS, ("#d62728", "#ff7f0e", "#2ca02c", "#1f77b4", "#7f7f7f")))
MAX_ROWS = 1024  # query rows drawn in the first-keys view (longer prompts are averaged over bins)


def alpha0_vs_length(sweep: pd.DataFrame, eps: float = 0.3) -> go.Figure:
    """Mean alpha_0 of the sink heads (alpha_0 > eps at the shortest length; band: their 10-90% range) and
    Sink^eps over all heads, against the prompt length (log axis)."""
    check_frame(sweep, ["length", "layer", "head", "alpha_0"], "sweep", "sinklens.measure.long_context.length_sweep")
    followed = sink_heads_over_length(sweep, eps).groupby("length")["alpha_0"]
    stats = pd.DataFrame({"mean": followed.mean(), "low": followed.quantile(0.1), "high": followed.quantile(0.9)})
    rates = sink_rate_by_length(sweep, eps)
    overall = rates[rates["layer"] == -1]
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(go.Scatter(x=list(stats.index) + list(stats.index[::-1]),
                             y=list(stats["high"]) + list(stats["low"][::-1]), fill="toself", line_width=0,
                             fillcolor="rgba(31,119,180,0.2)", name="sink heads: 10-90%", hoverinfo="skip"))
    fig.add_trace(go.Scatter(x=stats.index, y=stats["mean"], mode="lines+markers", name="sink heads: mean alpha_0",
                             line_color="#1f77b4"))
    fig.add_trace(go.Scatter(x=overall["length"], y=overall["sink_rate"], mode="lines+markers",
                             name=f"Sink^{eps} (% of all heads)", line_color="#d62728", line_dash="dash"),
                  secondary_y=True)
    n_heads = sink_heads_over_length(sweep, eps)[["layer", "head"]].drop_duplicates().shape[0]
    fig.update_layout(title=f"alpha_0 against context length ({n_heads} heads with alpha_0 > {eps} at the shortest)",
                      xaxis_title="prompt length (tokens, BOS included)", xaxis_type="log", height=450, width=800)
    fig.update_yaxes(title_text="alpha_0", range=[0, 1], secondary_y=False)
    fig.update_yaxes(title_text="Sink^eps (%)", range=[0, 100], secondary_y=True)
    return fig


def sink_rate_by_layer_and_length(sweep: pd.DataFrame, eps: float = 0.3) -> go.Figure:
    """Heatmap of Sink^eps (% of the layer's heads with alpha_0 > eps) per layer (rows) and length (columns)."""
    check_frame(sweep, ["length", "layer", "head", "alpha_0"], "sweep", "sinklens.measure.long_context.length_sweep")
    rates = sink_rate_by_length(sweep, eps)
    grid = rates[rates["layer"] >= 0].pivot(index="layer", columns="length", values="sink_rate")
    fig = go.Figure(go.Heatmap(z=grid.to_numpy(), x=[str(c) for c in grid.columns], y=grid.index, zmin=0, zmax=100,
                               colorscale="Viridis", colorbar={"title": "Sink^eps %"},
                               hovertemplate="layer %{y}, length %{x}: %{z:.0f}%<extra></extra>"))
    fig.update_layout(title=f"Sink rate by layer at each length (alpha_0 > {eps})", xaxis_title="prompt length",
                      yaxis_title="layer", yaxis_autorange="reversed", height=max(350, 16 * len(grid) + 120), width=700)
    return fig


def sinks_and_massive_vs_position(non_first: pd.DataFrame, carriers: pd.DataFrame, length: int) -> go.Figure:
    """Two panels against position: non-first sinks (layer vs key position, size by score; from
    ``Census.non_first_sinks``) and massive (position, dim) pairs (layer vs position, colour by token kind;
    from ``MassiveTokens.carriers``)."""
    if not isinstance(non_first, pd.DataFrame) or not isinstance(carriers, pd.DataFrame):
        raise InputError("sinks_and_massive_vs_position needs Census.non_first_sinks() and MassiveTokens.carriers().")
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, horizontal_spacing=0.05,
                        subplot_titles=(f"non-first sinks ({len(non_first)} head-positions)",
                                        f"massive activations ({len(carriers)} position-dims)"))
    if len(non_first):
        fig.add_trace(go.Scatter(x=non_first["position"], y=non_first["layer"], mode="markers", name="non-first sink",
                                 marker={"size": 4 + 14 * non_first["score"].clip(0, 1), "color": "#9467bd",
                                         "opacity": 0.6},
                                 text=[f"head {h}, score {s:.2f}"
                                       for h, s in zip(non_first["head"], non_first["score"])],
                                 hovertemplate="position %{x}, layer %{y}<br>%{text}<extra></extra>"), row=1, col=1)
    for kind in KINDS:
        part = carriers[carriers["kind"] == kind] if "kind" in carriers else carriers.iloc[0:0]
        if len(part):
            fig.add_trace(go.Scatter(x=part["position"], y=part["layer"], mode="markers", name=f"massive: {kind}",
                                     marker={"color": _KIND_COLORS[kind], "size": 7, "opacity": 0.7},
                                     text=[f"dim {d}, value {v:.0f}, token {t!r}" for d, v, t in
                                           zip(part["dim"], part["value"], part["token"])],
                                     hovertemplate="position %{x}, layer %{y}<br>%{text}<extra></extra>"), row=1, col=2)
    fig.update_xaxes(title_text="position", range=[-0.02 * length, length * 1.02])
    fig.update_yaxes(title_text="layer", autorange="reversed", row=1, col=1)
    fig.update_layout(title=f"Where secondary sinks and massive activations sit in a {length}-token prompt",
                      height=500, width=1100)
    return fig


def first_keys_view(weights: Float[Tensor, "query key"], layer: int, head: int) -> go.Figure:
    """Heatmap of one head's attention from every query (rows; averaged over bins beyond ``MAX_ROWS`` rows)
    to the first keys (columns), from :func:`sinklens.measure.lse_census.first_key_weights` for one prompt."""
    weights = torch.as_tensor(weights, dtype=torch.float32)
    if weights.dim() != 2 or weights.shape[0] < 1:
        raise InputError(f"weights must be [query, key] for one prompt, got shape {tuple(weights.shape)}.")
    n_rows, n_keys = weights.shape
    bin_size = -(-n_rows // MAX_ROWS)
    n_bins = -(-n_rows // bin_size)
    padded = torch.full((n_bins * bin_size, n_keys), float("nan"))
    padded[:n_rows] = weights
    binned = padded.view(n_bins, bin_size, n_keys).nanmean(1)
    starts = [i * bin_size for i in range(n_bins)]
    fig = go.Figure(go.Heatmap(z=binned.numpy(), x=list(range(n_keys)), y=starts, zmin=0, zmax=1,
                               colorscale="Viridis", colorbar={"title": "weight"},
                               hovertemplate="queries %{y}+, key %{x}: %{z:.3f}<extra></extra>"))
    binning = f", rows averaged over {bin_size} queries" if bin_size > 1 else ""
    fig.update_layout(title=f"L{layer}H{head}: attention to the first {n_keys} positions over {n_rows} queries"
                            f"{binning}",
                      xaxis_title="key position", yaxis_title="query position", yaxis_autorange="reversed",
                      height=600, width=700)
    return fig
