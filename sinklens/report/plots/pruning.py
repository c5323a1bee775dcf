"""Figures of QK column pruning and reconstruction error (notebooks 03 and 04).

Every helper takes package objects or the DataFrames the package returns (``reconstruction_error``,
``k_sweep``), runs no model, and returns a ``plotly.graph_objects.Figure``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float
from plotly.colors import sample_colorscale
from plotly.subplots import make_subplots
from torch import Tensor

from ...core.errors import InputError
from ...core.validate import check_frame, check_type
from ...measure.massive import Basis, MassiveActivations
from ...prune.spec import head_pairs
from .census import head_label, layer_head_heatmap

POLICY_COLORS = {"bos_top": "#1f77b4", "random": "#7f7f7f", "weight_norm": "#ff7f0e", "head_removal": "#d62728",
                 "explicit": "#2ca02c"}
METRIC_TITLES = {"frob_rel": "||A - A'||_F / ||A||_F", "kl": "mean row KL(A || A')", "d_alpha0": "change in alpha_0",
                 "out_rel": "head output error ||c - c'|| / ||c||", "next_kl": "next-token KL",
                 "d_loss": "change in loss"}
SWEEP = "sinklens.k_sweep"


def kept_dims(massive: MassiveActivations, layer: int, dims: Sequence[int] | Tensor, *,
              basis: Basis = "normalized", top: int = 30) -> go.Figure:
    """Mean |x_d| of the first token at ``layer`` for its ``top`` largest dims (and every kept dim), kept ones
    highlighted; the title gives the share of the first token's squared norm the kept dims hold.

    Args:
        massive: a :class:`~sinklens.measure.massive.MassiveActivations` holding ``layer``.
        layer: the layer shown.
        dims: the kept dims.
        basis: ``"normalized"`` or ``"resid"``.
        top: how many of the largest dims are shown (kept dims are always shown).
    """
    check_type(massive, MassiveActivations, "massive")
    values = massive.layer_values(layer, basis).float()  # [batch, d]
    kept = sorted(int(d) for d in (dims.tolist() if isinstance(dims, Tensor) else dims))
    magnitude = values.abs().mean(0)
    order = magnitude.argsort(descending=True)[:top].tolist()
    shown = order + [d for d in kept if d not in order]
    squares = values.double().square()
    share = float((squares[:, kept].sum(-1) / squares.sum(-1)).mean())
    fig = go.Figure(go.Bar(
        x=[str(d) for d in shown], y=magnitude[shown].numpy(),
        marker_color=["#1f77b4" if d in kept else "#c7c7c7" for d in shown],
        hovertemplate="dim %{x}: mean |x| %{y:.3g}<extra></extra>"))
    fig.update_layout(title=f"Layer {layer}: first-token |x_d| ({basis} basis); {len(kept)} kept dims (blue) hold "
                            f"{100 * share:.1f}% of its squared norm",
                      xaxis_title="dim (largest first)", yaxis_title="mean |x_d| over prompts", xaxis_type="category")
    return fig


def pattern_pairs(dense: Float[Tensor, "head query key"], pruned: Float[Tensor, "head query key"],
                  heads: Sequence[tuple[int, int]], tokens: Sequence[str] | None = None, *,
                  title: str = "", names: tuple[str, str] = ("dense", "pruned")) -> go.Figure:
    """Dense and pruned attention patterns side by side, one row per head (same colour scale, 0..1).

    Args:
        dense, pruned: the patterns of ``heads`` (``pruned``: any edited pattern, e.g. calibrated).
        heads: the ``(layer, head)`` pairs of the first axis, all in one layer (e.g. an attention view's heads).
        tokens: the token strings of the axes (None: positions).
        title: the figure title (default: layer and what is shown).
        names: what the two columns show (the edited one: ``"calibrated"`` for an attention calibration).
    """
    dense, pruned = torch.as_tensor(dense, device="cpu").float(), torch.as_tensor(pruned, device="cpu").float()
    heads = head_pairs(heads)
    layers = sorted({l for l, _ in heads})
    if len(layers) != 1:
        raise InputError(f"pattern_pairs shows the heads of one layer, got heads of layers {layers}.")
    layer = layers[0]
    if dense.shape != pruned.shape or dense.dim() != 3 or dense.shape[0] != len(heads):
        raise InputError(f"dense and pruned must both be [head, query, key] with {len(heads)} heads, got "
                         f"{tuple(dense.shape)} and {tuple(pruned.shape)}.")
    labels = [f"{i}:{t}" for i, t in enumerate(tokens)] if tokens is not None else list(range(dense.shape[-1]))
    names = [f"{head_label(l, h)} {name}" for l, h in heads for name in names]
    fig = make_subplots(rows=len(heads), cols=2, subplot_titles=names, horizontal_spacing=0.08,
                        vertical_spacing=min(0.3 / max(len(heads), 1), 0.08))
    for row, _ in enumerate(heads, start=1):
        for col, pattern in enumerate((dense, pruned), start=1):
            fig.add_trace(go.Heatmap(z=pattern[row - 1].numpy(), x=labels, y=labels, zmin=0, zmax=1,
                                     colorscale="Viridis", showscale=row == 1 and col == 2,
                                     hovertemplate="query %{y}<br>key %{x}<br>%{z:.3f}<extra></extra>"), row, col)
            fig.update_yaxes(autorange="reversed", showticklabels=False, row=row, col=col)
            fig.update_xaxes(showticklabels=False, row=row, col=col)
    fig.update_layout(title=title or f"Layer {layer}: attention before and after pruning",
                      height=320 * len(heads) + 100, width=820)
    return fig


def alpha0_before_after(frame: pd.DataFrame) -> go.Figure:
    """BOS sink score alpha_0 of each head, dense and pruned (from a reconstruction_error frame).

    Args:
        frame: a :func:`sinklens.reconstruction_error` frame.
    """
    frame = check_frame(frame, ["layer", "head", "alpha0", "d_alpha0"], "frame", "sinklens.reconstruction_error")
    labels = [head_label(l, h) for l, h in zip(frame["layer"], frame["head"])]
    fig = go.Figure([go.Bar(name="dense", x=labels, y=frame["alpha0"]),
                     go.Bar(name="pruned", x=labels, y=frame["alpha0"] + frame["d_alpha0"])])
    k = frame["k"].iloc[0] if "k" in frame else None
    fig.update_layout(barmode="group", title=f"alpha_0 before and after pruning (k = {k}), mean over prompts",
                      yaxis_title="alpha_0", yaxis_range=[0, 1], xaxis_title="head")
    return fig


def error_vs_k(sweep: pd.DataFrame, metric: str = "frob_rel", *, group: Literal["policy", "layer", "head"] = "policy",
               policies: str | Sequence[str] | None = None, band: tuple[float, float] = (0.1, 0.9)) -> go.Figure:
    """Error against k (log axis) from a k_sweep frame, for the policies in ``policies`` (None: all of them).

    ``group="policy"``: one line per policy, the median over heads (and seeds), shaded between the ``band``
    quantiles; random also shows each seed's median (its spread). ``group="layer"`` / ``"head"``: one panel
    per policy with one line per layer (median over its heads and seeds) / per head (median over seeds).
    Policies whose metric is undefined (NaN, e.g. whole-head pattern errors) are left out.

    Args:
        sweep: a :func:`sinklens.k_sweep` frame.
        metric: the error plotted (a column of the frame).
        group: ``"policy"``, ``"layer"`` or ``"head"`` (above).
        policies: the policies shown (a name or a list; None: every policy with a defined ``metric``).
        band: the lower and upper quantiles shaded with ``group="policy"``.
    """
    sweep = check_frame(sweep, ["k", "policy", "layer", "head", metric], "sweep", SWEEP)
    if group not in ("policy", "layer", "head"):
        raise InputError(f"group must be 'policy', 'layer' or 'head', got {group!r}.")
    wanted = None if policies is None else [policies] if isinstance(policies, str) else list(policies)
    shown = [p for p in sweep["policy"].unique() if (wanted is None or p in wanted)
             and not sweep.loc[sweep["policy"] == p, metric].isna().all()]
    if not shown:
        raise InputError(f"No policy of the sweep ({sorted(sweep['policy'].unique())}) matches policies={policies!r} "
                         f"with a "
                         f"defined {metric}.")
    title = METRIC_TITLES.get(metric, metric)
    if group == "policy":
        fig = go.Figure()
        for policy in shown:
            part = sweep[sweep["policy"] == policy]
            color = POLICY_COLORS.get(policy, None)
            stats = part.groupby("k")[metric].quantile([band[0], 0.5, band[1]]).unstack()
            ks = stats.index.astype(int).tolist()
            fig.add_trace(go.Scatter(x=ks + ks[::-1], y=list(stats[band[1]]) + list(stats[band[0]])[::-1],
                                     fill="toself", line_width=0, fillcolor=color, opacity=0.15, showlegend=False,
                                     hoverinfo="skip", name=f"{policy} band"))
            fig.add_trace(go.Scatter(x=ks, y=stats[0.5], mode="lines+markers", name=f"{policy} (median)",
                                     line_color=color))
            if policy == "random" and "seed" in part and part["seed"].nunique() > 1:
                for seed, one in part.groupby("seed"):
                    med = one.groupby("k")[metric].median()
                    fig.add_trace(go.Scatter(x=med.index.astype(int), y=med, mode="lines", line_dash="dot",
                                             line_color=color, line_width=1, name=f"random seed {int(seed)}",
                                             legendgroup="seeds"))
        fig.update_layout(title=f"{title} against k (median over heads, band {round(band[0] * 100)}-"
                                f"{round(band[1] * 100)}%)", xaxis_type="log", xaxis_title="k (kept dims per head)",
                          yaxis_title=metric, height=480, width=900)
        return fig
    keys = ["layer"] if group == "layer" else ["layer", "head"]
    layers = sorted(sweep["layer"].unique())
    palette = sample_colorscale("Viridis", [i / max(len(layers) - 1, 1) for i in range(len(layers))])
    fig = make_subplots(rows=1, cols=len(shown), shared_yaxes=True, subplot_titles=shown, horizontal_spacing=0.03)
    for col, policy in enumerate(shown, start=1):
        for key, one in sweep[sweep["policy"] == policy].groupby(keys):
            key = key if isinstance(key, tuple) else (key,)
            med = one.groupby("k")[metric].median()
            name = f"layer {key[0]}" if group == "layer" else head_label(*key)
            fig.add_trace(go.Scatter(x=med.index.astype(int), y=med, mode="lines", name=name, legendgroup=name,
                                     showlegend=col == 1, line_color=palette[layers.index(key[0])],
                                     line_width=1.5 if group == "layer" else 1), 1, col)
        fig.update_xaxes(type="log", title_text="k", row=1, col=col)
    fig.update_yaxes(title_text=metric, row=1, col=1)
    fig.update_layout(title=f"{title} against k, median per {group} (colour: layer)", height=480,
                      width=max(500, 380 * len(shown)))
    return fig


def sweep_heatmap(sweep: pd.DataFrame, k: int, metric: str = "frob_rel", *, policy: str = "bos_top",
                  n_heads: int | None = None, zmax: float | None = None) -> go.Figure:
    """Layer x head heatmap of ``metric`` at ``k`` for one policy (median over seeds); heads not swept are blank.

    Args:
        sweep: a :func:`sinklens.k_sweep` frame.
        k: the k shown.
        metric: the error shown.
        policy: the kept-dims policy shown.
        n_heads: the heads per layer (None: the largest head index swept, plus one).
        zmax: the top of the colour scale (None: automatic).
    """
    sweep = check_frame(sweep, ["k", "policy", "layer", "head", metric], "sweep", SWEEP)
    part = sweep[(sweep["policy"] == policy) & (sweep["k"] == k)]
    if part.empty:
        raise InputError(f"The sweep has no rows for policy={policy!r} at k={k}.")
    values = part.groupby(["layer", "head"])[metric].median()
    layers = list(range(int(values.index.get_level_values(0).min()), int(values.index.get_level_values(0).max()) + 1))
    width = n_heads or int(values.index.get_level_values(1).max()) + 1
    grid = torch.full((len(layers), width), float("nan"), device="cpu")
    for (layer, head), value in values.items():
        grid[layers.index(int(layer)), int(head)] = float(value)
    return layer_head_heatmap(grid, layers, f"{METRIC_TITLES.get(metric, metric)} at k = {k} ({policy} dims)", metric,
                              zmax=zmax)


def model_level(frame: pd.DataFrame, metrics: Sequence[str] = ("next_kl", "d_loss")) -> go.Figure:
    """Model-level effect per configuration (one bar per policy and k; random: mean over seeds with min-max).

    Args:
        frame: a ``level="model"`` :func:`sinklens.k_sweep` frame.
        metrics: the model-level columns shown, one panel each.
    """
    frame = check_frame(frame, ["policy", "k", *metrics], "frame", "sinklens.k_sweep(level='model')")
    per_config = frame.drop_duplicates(["policy", "k", "seed"])
    fig = make_subplots(rows=1, cols=len(metrics), subplot_titles=[METRIC_TITLES.get(m, m) for m in metrics])
    for col, metric in enumerate(metrics, start=1):
        for policy, part in per_config.groupby("policy", sort=False):
            stats = part.groupby("k")[metric].agg(["mean", "min", "max"])
            fig.add_trace(go.Bar(x=[f"k={int(k)}" for k in stats.index], y=stats["mean"], name=policy,
                                 marker_color=POLICY_COLORS.get(policy), showlegend=col == 1,
                                 error_y={"type": "data", "symmetric": False, "array": stats["max"] - stats["mean"],
                                          "arrayminus": stats["mean"] - stats["min"]}), 1, col)
    fig.update_layout(barmode="group", title="Model-level effect of pruning all listed heads together", height=420,
                      width=900)
    return fig
