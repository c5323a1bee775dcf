"""Reading a k sweep: quantiles of an error metric per policy and k, and the smallest k whose median falls
below a threshold."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from ...core.errors import InputError
from ...core.validate import check_fraction, check_frame
from .common import Metric


def error_quantiles(sweep: pd.DataFrame, k: int | None = None, *, metric: Metric = "frob_rel",
                    quantiles: Sequence[float] = (0.1, 0.5, 0.9)) -> pd.DataFrame:
    """Quantiles of ``metric`` over heads (and seeds) per policy and k, with the row count.

    Args:
        sweep: a :func:`k_sweep` (or :func:`reconstruction_error`) frame.
        k: only this k (None: every k of the sweep).
        metric: the column summarised.
        quantiles: the quantiles, as fractions (columns ``q10``, ``q50``, ...).
    """
    check_frame(sweep, ["k", "policy", metric], "sweep", "sinklens.k_sweep")
    quantiles = [check_fraction("quantile", q) for q in quantiles]
    part = sweep if k is None else sweep[sweep["k"] == k]
    if part.empty:
        raise InputError(f"The sweep has no rows at k={k} (its ks: {sorted(sweep['k'].dropna().unique().tolist())}).")
    table = part.groupby(["policy", "k"])[metric].quantile(quantiles).unstack()
    table.columns = [f"q{round(q * 100):02d}" for q in quantiles]
    table["n_rows"] = part.groupby(["policy", "k"]).size()
    return table.reset_index().assign(metric=metric)


def smallest_k(sweep: pd.DataFrame, thresholds: Sequence[float] = (0.2, 0.1), *, metric: Metric = "frob_rel",
               by: Sequence[str] = ("policy",)) -> pd.DataFrame:
    """Smallest k whose median ``metric`` (over heads, and seeds for random) is below each threshold.

    One row per group of ``by`` and threshold, with the median at that k; k is missing (<NA>) when no
    k of the sweep reaches the threshold.

    Args:
        sweep: a :func:`k_sweep` frame.
        thresholds: the error levels (fractions, except for ``kl``).
        metric: the column compared.
        by: the columns that define a group (default: the policy).
    """
    check_frame(sweep, ["k", metric, *by], "sweep", "sinklens.k_sweep")
    thresholds = [check_fraction("threshold", t, open_low=True) if metric != "kl" else float(t) for t in thresholds]
    rows = []
    by = list(by)
    medians = sweep.groupby(by + ["k"])[metric].median().reset_index()
    for key, part in medians.groupby(by):
        key = key if isinstance(key, tuple) else (key,)
        part = part.sort_values("k")
        for threshold in thresholds:
            below = part[part[metric] < threshold]
            hit = below.iloc[0] if not below.empty else None
            rows.append({**dict(zip(by, key)), "threshold": threshold,
                         "k": pd.NA if hit is None else int(hit["k"]),
                         f"median_{metric}": float("nan") if hit is None else float(hit[metric])})
    frame = pd.DataFrame(rows)
    frame["k"] = frame["k"].astype("Int64")
    return frame
