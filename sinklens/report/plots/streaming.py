"""Figures of notebook 09: streamed loss against position, the per-KV-head streaming score (layer x KV head, the
sink-specialized groups outlined) and the KV cache saved against the loss increase. Each helper returns a plotly
figure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from ...assess.streaming import StreamingResult
from ...core.errors import InputError
from ...core.validate import check_frame, check_int

_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#7f7f7f")


def binned_losses(result: StreamingResult, bin_size: int = 128) -> pd.DataFrame:
    """Mean loss per bin of ``bin_size`` positions: ``position`` (the bin's first), ``loss``, ``n``.

    Args:
        result: from :func:`sinklens.streaming_perplexity`.
        bin_size: positions averaged per point (a per-token curve is noise).
    """
    bin_size = check_int("bin_size", bin_size, minimum=1)
    frame = result.frame()
    frame["bin"] = frame["position"] // bin_size * bin_size
    out = frame.groupby("bin")["loss"].agg(["mean", "size"]).reset_index()
    return out.rename(columns={"bin": "position", "mean": "loss", "size": "n"})


def binned_curves(curves: Mapping[str, StreamingResult], bin_size: int = 128) -> pd.DataFrame:
    """:func:`binned_losses` of every curve in one table, with a ``curve`` column (its label).

    Args:
        curves: ``{label: StreamingResult}``.
        bin_size: positions averaged per row.
    """
    return pd.concat([binned_losses(r, bin_size).assign(curve=name) for name, r in curves.items()],
                     ignore_index=True)


def loss_vs_position(curves: Mapping[str, StreamingResult], *, n_ctx: int | None = None,
                     bin_size: int = 128) -> go.Figure:
    """Streamed next-token loss against position, one line per setting, a vertical line at the trained context.

    Args:
        curves: ``{label: StreamingResult}`` (e.g. dense, window only, sink + window with and without the shift).
        n_ctx: the model's trained context (drawn when given).
        bin_size: positions averaged per point.
    """
    if not curves:
        raise InputError("curves is empty: pass {label: streaming_perplexity(...)}.")
    fig = go.Figure()
    for i, (name, result) in enumerate(curves.items()):
        if not isinstance(result, StreamingResult):
            raise InputError(f"curves[{name!r}] must be a StreamingResult, got {type(result).__name__}.")
        binned = binned_losses(result, bin_size)
        fig.add_trace(go.Scatter(x=binned["position"], y=binned["loss"], mode="lines", name=name,
                                 line_color=_COLORS[i % len(_COLORS)]))
    if n_ctx is not None:
        fig.add_vline(x=n_ctx, line_dash="dot", line_color="black", annotation_text=f"trained context {n_ctx}")
    fig.update_layout(title=f"Streamed next-token loss against position (mean over {bin_size} positions)",
                      xaxis_title="position of the predicting token", yaxis_title="loss (nats)",
                      template="plotly_white", height=420)
    return fig


def score_heatmap(scores: pd.DataFrame, specialized: Sequence[tuple[int, int]] = (), *, group_size: int = 1,
                  title: str | None = None) -> go.Figure:
    """Streaming score per KV head (layer x KV head), the groups holding a sink-specialized head outlined.

    Args:
        scores: from :func:`sinklens.streaming_head_scores` (``layer``, ``kv_head``, ``score``).
        specialized: the run's sink-specialized ``(layer, head)`` query heads.
        group_size: query heads per KV head (1 on MHA).
        title: the figure's title (a default names the outline).
    """
    check_frame(scores, ["layer", "kv_head", "score"], "scores", "sinklens.streaming_head_scores")
    group_size = check_int("group_size", group_size, minimum=1)
    grid = scores.pivot(index="kv_head", columns="layer", values="score").sort_index()
    fig = go.Figure(go.Heatmap(z=grid.to_numpy(), x=list(grid.columns), y=list(grid.index), colorscale="Viridis",
                               colorbar_title="loss increase (nats)",
                               hovertemplate="layer %{x}, KV head %{y}: %{z:.4f} nats<extra></extra>"))
    outlined = sorted({(int(l), int(h) // group_size) for l, h in specialized})
    for layer, kv in outlined:
        fig.add_shape(type="rect", x0=layer - 0.5, x1=layer + 0.5, y0=kv - 0.5, y1=kv + 0.5,
                      line=dict(color="#ff2d2d", width=2))
    fig.update_layout(title=title or f"Loss increase when one KV head keeps only sink + window "
                      f"({len(outlined)} groups with a sink-specialized head outlined)",
                      xaxis_title="layer", yaxis_title="KV head", template="plotly_white",
                      height=max(260, 60 * len(grid) + 140), yaxis=dict(dtick=1))
    return fig


def kv_saved_vs_loss(budget: pd.DataFrame, curve: pd.DataFrame | None = None, *, n_kv_heads: int) -> go.Figure:
    """Share of the KV cache saved against the loss increase: the search curve (cheapest KV heads first) and each
    tolerance's chosen set on the search and held-out texts.

    Args:
        budget: from :func:`sinklens.kv_budget`.
        curve: its ``attrs["curve"]`` (``kv_heads``, ``search_increase``), drawn when given.
        n_kv_heads: KV heads of the model (the share's denominator).
    """
    check_frame(budget, ["tolerance", "kv_heads", "search_increase", "held_out_increase"], "budget",
                "sinklens.kv_budget")
    n_kv_heads = check_int("n_kv_heads", n_kv_heads, minimum=1)
    fig = go.Figure()
    if curve is not None and len(curve):
        fig.add_trace(go.Scatter(x=np.asarray(curve["kv_heads"]) / n_kv_heads * 100, y=curve["search_increase"],
                                 mode="lines+markers", name="search texts (cheapest first)", line_color="#7f7f7f"))
    share = budget["kv_heads"] / n_kv_heads * 100
    text = [f"tol {t:g}" for t in budget["tolerance"]]
    fig.add_trace(go.Scatter(x=share, y=budget["search_increase"], mode="markers", name="chosen: search",
                             marker=dict(color="#1f77b4", size=10), text=text))
    fig.add_trace(go.Scatter(x=share, y=budget["held_out_increase"], mode="markers+text", name="chosen: held out",
                             marker=dict(color="#d62728", size=10, symbol="diamond"), text=text,
                             textposition="top center"))
    for tol in budget["tolerance"]:
        fig.add_hline(y=float(tol), line_dash="dot", line_color="#bbbbbb")
    fig.update_layout(title="KV heads on sink + window: share of the KV cache restricted against the loss increase",
                      xaxis_title="KV heads restricted (% of the cache's heads)", yaxis_title="loss increase (nats)",
                      template="plotly_white", height=420)
    return fig


__all__ = ["binned_curves", "binned_losses", "kv_saved_vs_loss", "loss_vs_position", "score_heatmap"]
