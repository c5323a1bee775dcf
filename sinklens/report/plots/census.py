"""Figures of the sink census, massive activations and head specialization (notebooks 01 and 02).

Every helper takes package objects (:class:`~sinklens.measure.census.Census`,
:class:`~sinklens.measure.massive.MassiveActivations`) or the DataFrames the package returns, runs no
model, and returns a ``plotly.graph_objects.Figure`` (save it with ``RunFolder.save_figure``).
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float
from plotly.subplots import make_subplots
from torch import Tensor

from ...core.choices import BASES, Basis
from ...core.errors import InputError
from ...core.validate import check_fraction, check_frame, check_type
from ...measure.census import Census
from ...measure.massive import MassiveActivations

_CASE_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd")


def head_label(layer: int, head: int) -> str:
    """Short label of head (layer, head), e.g. ``L12H3``.

    Args:
        layer, head: the head.
    """
    return f"L{int(layer)}H{int(head)}"


def layer_head_heatmap(values: Float[Tensor, "layer head"], layers: Sequence[int], title: str,
                       colorbar: str, *, zmax: float | None = 1.0) -> go.Figure:
    """Heatmap of one number per head, layers on the y axis (layer 0 at the top).

    Args:
        values: one number per layer and head.
        layers: the model layers of the rows.
        title: the figure title.
        colorbar: the colour bar's title.
        zmax: the top of the colour scale (None: automatic).
    """
    values = torch.as_tensor(values, dtype=torch.float32, device="cpu")
    if values.dim() != 2 or values.shape[0] != len(layers):
        raise InputError(f"values must be [layer, head] with {len(layers)} layers, got shape {tuple(values.shape)}.")
    fig = go.Figure(go.Heatmap(
        z=values.numpy(), x=list(range(values.shape[1])), y=list(layers), zmin=0, zmax=zmax,
        colorscale="Viridis", colorbar={"title": colorbar},
        hovertemplate="layer %{y}, head %{x}<br>" + colorbar + " %{z:.3f}<extra></extra>"))
    fig.update_layout(title=title, xaxis_title="head", yaxis_title="layer", yaxis_autorange="reversed",
                      height=max(350, 18 * len(layers) + 120), width=max(450, 45 * values.shape[1] + 200))
    return fig


def sink_heatmap(census: Census, key_pos: int = 0) -> go.Figure:
    """Mean sink score alpha_{key_pos} over prompts, per layer and head.

    Args:
        census: a :class:`~sinklens.measure.census.Census`.
        key_pos: the key position of the sink score.
    """
    check_type(census, Census, "census")
    mean = census.sink_scores(key_pos).mean(0)
    bos = {True: "BOS prepended", False: "no BOS", None: "first token unknown"}[census.prepend_bos]
    title = f"Mean sink score alpha_{key_pos} ({census.n_prompts} prompts, {bos})"
    return layer_head_heatmap(mean, census.layers, title, f"alpha_{key_pos}")


def sink_rate_bars(census: Census, eps: float = 0.3, *, key_pos: int = 0) -> go.Figure:
    """Sink^eps in % per layer (share of the layer's heads with alpha_{key_pos} > eps, mean over prompts).

    Args:
        census: a :class:`~sinklens.measure.census.Census`.
        eps: the sink threshold.
        key_pos: the key position of the sink score.
    """
    check_type(census, Census, "census")
    rate = census.sink_rate_by_layer(eps, key_pos)
    overall = census.sink_rate(eps, key_pos)
    fig = go.Figure(go.Bar(x=census.layers, y=rate.numpy(), name="per layer",
                           hovertemplate="layer %{x}: %{y:.1f}%<extra></extra>"))
    fig.add_hline(y=overall, line_dash="dash", annotation_text=f"all heads: {overall:.1f}%")
    fig.update_layout(title=f"Sink rate per layer: heads with alpha_{key_pos} > {eps}", xaxis_title="layer",
                      yaxis_title=f"Sink^{eps} (%)", yaxis_range=[0, 100])
    return fig


def massive_profile(massive: MassiveActivations, basis: Basis = "resid", *, n: int = 3) -> go.Figure:
    """Sun et al. style profile per layer (log y): the first token's n largest mean |x| against the
    median |x| of the hidden state and the largest |x| of the other tokens.

    Args:
        massive: a :class:`~sinklens.measure.massive.MassiveActivations`.
        basis: ``"resid"`` or ``"normalized"``.
        n: how many of the largest dims per layer.
    """
    check_type(massive, MassiveActivations, "massive")
    table = massive.top_values(n, basis)
    fig = go.Figure()
    for rank in range(1, n + 1):
        fig.add_trace(go.Scatter(
            x=table["layer"], y=table[f"top{rank}_abs"], mode="lines+markers", name=f"first token, top-{rank} |x|",
            customdata=table[f"top{rank}_dim"],
            hovertemplate="layer %{x}: |x| = %{y:.4g} (dim %{customdata})<extra></extra>"))
    fig.add_trace(go.Scatter(x=table["layer"], y=table["other_max_abs"], mode="lines", name="other tokens, max |x|",
                             line={"dash": "dot", "color": "gray"}))
    fig.add_trace(go.Scatter(x=table["layer"], y=table["median_abs"], mode="lines", name="median |x|",
                             line={"dash": "dash", "color": "black"}))
    fig.update_layout(title=f"Largest first-token magnitudes per layer ({basis} basis)", xaxis_title="layer",
                      yaxis_title="|x| (log)", yaxis_type="log")
    return fig


def first_token_norms(massive: MassiveActivations, basis: Basis = "resid") -> go.Figure:
    """L2 norm of the first token against the mean norm of the other tokens, per layer (log y).

    Args:
        massive: a :class:`~sinklens.measure.massive.MassiveActivations`.
        basis: ``"resid"`` or ``"normalized"``.
    """
    check_type(massive, MassiveActivations, "massive")
    table = massive.norms(basis)
    fig = go.Figure([
        go.Scatter(x=table["layer"], y=table["first_norm"], mode="lines+markers", name="first token"),
        go.Scatter(x=table["layer"], y=table["other_norm"], mode="lines+markers", name="other tokens (mean)"),
    ])
    fig.update_layout(title=f"First-token norm vs other tokens ({basis} basis)", xaxis_title="layer",
                      yaxis_title="L2 norm (log)", yaxis_type="log")
    return fig


def norm_share(massive: MassiveActivations, k_values: Sequence[int] = (1, 2, 10),
               bases: Sequence[Basis] = BASES) -> go.Figure:
    """Share of the first token's squared norm held by its top-k dims, per layer, one line per (basis, k).

    Args:
        massive: a :class:`~sinklens.measure.massive.MassiveActivations`.
        k_values: the k of each line.
        bases: the bases drawn.
    """
    check_type(massive, MassiveActivations, "massive")
    return _lines_by_basis_and_k(massive, massive.norm_share, k_values, bases,
                                 "Share of the first token's squared norm in its top-k dims", "share of ||x||^2")


def rank_stability(massive: MassiveActivations, k_values: Sequence[int] = (1, 2, 10),
                   bases: Sequence[Basis] = BASES) -> go.Figure:
    """Mean Jaccard overlap of each prompt's top-k first-token dims with the aggregate top-k, per layer.

    Args:
        massive: a :class:`~sinklens.measure.massive.MassiveActivations`.
        k_values: the k of each line.
        bases: the bases drawn.
    """
    check_type(massive, MassiveActivations, "massive")
    return _lines_by_basis_and_k(massive, massive.rank_stability, k_values, bases,
                                 "Stability of the top-k first-token dims across prompts (Jaccard)",
                                 "mean Jaccard overlap")


def _lines_by_basis_and_k(massive: MassiveActivations, values, k_values: Sequence[int], bases: Sequence[str],
                          title: str, yaxis_title: str) -> go.Figure:
    """One line per (basis, k) of ``values(k, basis)`` (a per-layer tensor in [0, 1]) against the layer."""
    fig = go.Figure()
    for basis, dash in zip(bases, ("solid", "dash", "dot")):
        for k in k_values:
            fig.add_trace(go.Scatter(x=massive.layers, y=values(k, basis).numpy(), mode="lines+markers",
                                     name=f"{basis}, k={k}", line={"dash": dash}))
    fig.update_layout(title=title, xaxis_title="layer", yaxis_title=yaxis_title, yaxis_range=[0, 1.02])
    return fig


def bos_comparison(comparison: pd.DataFrame) -> go.Figure:
    """With-BOS vs without-BOS (from ``first_token_comparison``): mean alpha and sink rate per layer per case.

    Args:
        comparison: the frame of :func:`sinklens.first_token_comparison`.
    """
    comparison = check_frame(comparison, ["case", "layer", "mean_alpha", "sink_rate"], "comparison",
                              "sinklens.first_token_comparison")
    fig = make_subplots(rows=1, cols=2, subplot_titles=("mean sink score alpha", "sink rate (%)"))
    for i, (case, part) in enumerate(comparison.groupby("case", sort=False)):
        color = _CASE_COLORS[i % len(_CASE_COLORS)]
        fig.add_trace(go.Scatter(x=part["layer"], y=part["mean_alpha"], mode="lines+markers", name=case,
                                 legendgroup=case, line={"color": color}), row=1, col=1)
        fig.add_trace(go.Scatter(x=part["layer"], y=part["sink_rate"], mode="lines+markers", name=case,
                                 legendgroup=case, showlegend=False, line={"color": color}), row=1, col=2)
    fig.update_xaxes(title_text="layer")
    fig.update_yaxes(range=[0, 1.02], row=1, col=1)
    fig.update_yaxes(range=[0, 102], row=1, col=2)
    fig.update_layout(title="Is the sink the BOS token or the first position?", legend={"orientation": "h", "y": -0.25})
    return fig


def specialization(table: pd.DataFrame, *, eps: float | None = None, top: int | None = None) -> go.Figure:
    """Mean BOS score per head with its bootstrap CI (from ``specialization_table``), sink-specialized
    heads highlighted, in the table's order (highest mean first); ``top`` keeps the first rows.

    Args:
        table: the frame of :func:`sinklens.specialization_table`.
        eps: draw the threshold line at eps (None: no line).
        top: keep the first rows only (None: all).
    """
    table = check_frame(table, ["layer", "head", "mean", "ci_low", "ci_high", "frac_above_eps", "specialized"],
                         "table", "sinklens.specialization_table")
    if top is not None:
        table = table.head(top)
    fig = go.Figure()
    for flag, name, color in ((True, "sink-specialized", "#d62728"), (False, "other heads", "#7f7f7f")):
        part = table[table["specialized"] == flag]
        if part.empty:
            continue
        fig.add_trace(go.Scatter(
            x=[head_label(l, h) for l, h in zip(part["layer"], part["head"])], y=part["mean"], mode="markers",
            name=name, marker={"color": color, "size": 6},
            error_y={"type": "data", "symmetric": False, "array": part["ci_high"] - part["mean"],
                     "arrayminus": part["mean"] - part["ci_low"], "thickness": 1},
            customdata=part["frac_above_eps"],
            hovertemplate="%{x}: mean %{y:.3f}<br>prompts above eps: %{customdata:.0%}<extra></extra>"))
    order = [head_label(l, h) for l, h in zip(table["layer"], table["head"])]
    fig.update_xaxes(categoryorder="array", categoryarray=order, title_text="head (sorted by mean score)")
    if eps is not None:
        fig.add_hline(y=check_fraction("eps", eps), line_dash="dash", annotation_text=f"eps = {eps}")
    n_specialized = int(table["specialized"].sum())
    fig.update_layout(title=f"BOS sink score per head with bootstrap CI ({n_specialized} specialized)",
                      yaxis_title="mean alpha_0", yaxis_range=[0, 1.02], width=max(700, 9 * len(table) + 200))
    return fig


def specialization_heatmap(table: pd.DataFrame) -> go.Figure:
    """Fraction of prompts on which each head's BOS score exceeds eps, per layer and head.

    Args:
        table: the frame of :func:`sinklens.specialization_table`.
    """
    table = check_frame(table, ["layer", "head", "frac_above_eps"], "table", "sinklens.specialization_table")
    grid = table.pivot(index="layer", columns="head", values="frac_above_eps").sort_index()
    return layer_head_heatmap(torch.tensor(grid.to_numpy(), dtype=torch.float32, device="cpu"), list(grid.index),
                              "Fraction of prompts with alpha_0 > eps", "fraction")


def confidence_vs_alpha(census: Census, table: pd.DataFrame | None = None) -> go.Figure:
    """Per head: head confidence (mean max attention weight) against mean alpha_0; specialized heads
    highlighted when ``table`` (from ``specialization_table``) is given.

    Args:
        census: a :class:`~sinklens.measure.census.Census`.
        table: the frame of :func:`sinklens.specialization_table` (None: nothing highlighted).
    """
    check_type(census, Census, "census")
    alpha = census.sink_scores(0).mean(0)
    confidence = census.confidence.mean(0)
    layer_idx, head_idx = torch.meshgrid(torch.arange(alpha.shape[0], device="cpu"),
                                         torch.arange(alpha.shape[1], device="cpu"), indexing="ij")
    frame = pd.DataFrame({"layer": torch.tensor(census.layers, device="cpu")[layer_idx.flatten()].numpy(),
                          "head": head_idx.flatten().numpy(), "alpha0": alpha.flatten().numpy(),
                          "confidence": confidence.flatten().numpy()})
    frame["specialized"] = False
    if table is not None:
        table = check_frame(table, ["layer", "head", "specialized"], "table", "sinklens.specialization_table")
        flagged = set(zip(table.loc[table["specialized"], "layer"], table.loc[table["specialized"], "head"]))
        frame["specialized"] = [(l, h) in flagged for l, h in zip(frame["layer"], frame["head"])]
    fig = go.Figure()
    for flag, name, color in ((False, "other heads", "#7f7f7f"), (True, "sink-specialized", "#d62728")):
        part = frame[frame["specialized"] == flag]
        if part.empty:
            continue
        fig.add_trace(go.Scatter(x=part["alpha0"], y=part["confidence"], mode="markers", name=name,
                                 marker={"color": color, "size": 7, "opacity": 0.8},
                                 text=[head_label(l, h) for l, h in zip(part["layer"], part["head"])],
                                 hovertemplate="%{text}: alpha_0 %{x:.3f}, confidence %{y:.3f}<extra></extra>"))
    fig.update_layout(title="Head confidence vs BOS sink score (means over prompts)", xaxis_title="mean alpha_0",
                      yaxis_title="head confidence (mean max weight)", xaxis_range=[0, 1.02], yaxis_range=[0, 1.02])
    return fig


def prompt_consistency(census: Census, heads: Sequence[tuple[int, int]] | pd.DataFrame,
                       *, eps: float | None = None) -> go.Figure:
    """alpha_0 of the given heads on every prompt (prompts x heads): is a head's sink behaviour the same on
    every prompt? ``heads`` is a list of (layer, head) or a table with layer/head columns (e.g. the top
    rows of ``specialization_table``); ``eps`` (optional) is named in the title.

    Args:
        census: a :class:`~sinklens.measure.census.Census`.
        heads: ``(layer, head)`` pairs or a table with layer/head columns.
        eps: named in the title (None: not).
    """
    check_type(census, Census, "census")
    if isinstance(heads, pd.DataFrame):
        heads = list(zip(check_frame(heads, ["layer", "head"], "heads", "sinklens.specialization_table")["layer"],
                         heads["head"]))
    heads = [(int(l), int(h)) for l, h in heads]
    if not heads:
        raise InputError("heads is empty: pass at least one (layer, head), e.g. the sink-specialized heads or the "
                         "top rows of specialization_table.")
    missing = [lh for lh in heads if lh[0] not in census.layers or not 0 <= lh[1] < census.alpha.shape[2]]
    if missing:
        raise InputError(f"Heads {missing} are not in the census (layers {census.layers}, "
                         f"{census.alpha.shape[2]} heads).")
    scores = census.sink_scores(0)
    z = torch.stack([scores[:, census.layers.index(l), h] for l, h in heads], 1)
    labels = [head_label(l, h) for l, h in heads]
    title = "alpha_0 per prompt" + (f" (eps = {check_fraction('eps', eps)})" if eps is not None else "")
    fig = go.Figure(go.Heatmap(z=z.numpy(), x=labels, y=list(range(z.shape[0])), zmin=0, zmax=1, colorscale="Viridis",
                               colorbar={"title": "alpha_0"},
                               hovertemplate="prompt %{y}, %{x}: alpha_0 %{z:.3f}<extra></extra>"))
    fig.update_layout(title=title, xaxis_title="head", yaxis_title="prompt", yaxis_autorange="reversed",
                      width=max(500, 14 * len(labels) + 200))
    return fig
