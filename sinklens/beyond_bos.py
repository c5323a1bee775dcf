"""Summaries of the kept-dims comparison beyond the BOS dims (notebook 07): per-variant quantiles, overlaps, headline.

A variant is one (policy, fill, calibration) of a :func:`sinklens.k_sweep` frame; its label is
``policy/fill/calibration`` (e.g. ``optimized/mean/temperature``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd
from jaxtyping import Int
from torch import Tensor

from .calibration import CalibrationSet
from .errors import InputError
from .spec import Head
from .validate import check_int

VARIANT = ["policy", "fill", "calibration"]


def _check(frame, columns: Sequence[str]) -> pd.DataFrame:
    if not isinstance(frame, pd.DataFrame) or frame.empty or not set(columns) <= set(frame.columns):
        raise InputError(f"Expected a non-empty sinklens.k_sweep frame with columns {list(columns)}.")
    return frame


def variant_labels(sweep: pd.DataFrame) -> pd.DataFrame:
    """A copy of a k_sweep frame whose ``policy`` column holds the variant label ``policy/fill/calibration``
    (whole-head removal keeps its name), for figures that draw one line per policy.

    Args:
        sweep: a :func:`sinklens.k_sweep` frame.
    """
    sweep = _check(sweep, VARIANT).copy()
    fitted = sweep["fill"].notna()
    sweep.loc[fitted, "policy"] = (sweep.loc[fitted, "policy"] + "/" + sweep.loc[fitted, "fill"] + "/"
                                   + sweep.loc[fitted, "calibration"])
    return sweep


def variant_table(sweep: pd.DataFrame, ks: Sequence[int], metrics: Sequence[str] = ("frob_rel", "kl")) -> pd.DataFrame:
    """Median and 10/90 % quantiles over heads of each metric, per variant and k: one row per (variant, k).

    Args:
        sweep: a :func:`sinklens.k_sweep` frame (whole-head rows are left out).
        ks: the ks tabulated.
        metrics: the error columns summarised.
    """
    sweep = _check(sweep, VARIANT + ["k", *metrics])
    part = sweep[sweep["fill"].notna() & sweep["k"].isin(list(ks))]
    if part.empty:
        raise InputError(f"The sweep has no pruning rows at ks={list(ks)}.")
    grouped = part.groupby(VARIANT + ["k"])
    table = pd.concat({f"{metric}_{name}": grouped[metric].quantile(q) for metric in metrics
                       for name, q in (("q10", 0.1), ("q50", 0.5), ("q90", 0.9))}, axis=1)
    table["n_heads"] = grouped.size()
    return table.reset_index()


def dims_overlap(first: Mapping[Head, Int[Tensor, " k"]], second: Mapping[Head, Int[Tensor, " k"]]) -> pd.DataFrame:
    """Per head, how many kept dims two choices share: ``shared`` and ``share`` (shared / k of ``second``).

    Args:
        first: kept dims per head (e.g. ``bos_top``'s, from :func:`sinklens.select_dims`).
        second: kept dims per head for the same heads (e.g. ``optimized``'s).
    """
    if set(first) != set(second):
        raise InputError("The two dims choices must cover the same heads.")
    rows = []
    for (layer, head) in sorted(first):
        a, b = set(first[(layer, head)].tolist()), set(second[(layer, head)].tolist())
        rows.append({"layer": layer, "head": head, "k": len(b), "shared": len(a & b), "share": len(a & b) / len(b)})
    return pd.DataFrame(rows)


def spread_heads(heads: Sequence[Head], n: int) -> list[Head]:
    """``n`` of ``heads`` spread evenly over the sorted list (every head when ``n`` is 0 or at least their count): a
    sample across layers for the costly optimized search.

    Args:
        heads: ``(layer, head)`` pairs.
        n: how many to keep (0: all).
    """
    heads = sorted((int(l), int(h)) for l, h in heads)
    n = check_int("n", n, minimum=0, meaning="0: every head")
    if n == 0 or n >= len(heads):
        return heads
    return [heads[round(i * (len(heads) - 1) / max(n - 1, 1))] for i in range(n)]


def search_cost_table(calibration: CalibrationSet) -> pd.DataFrame:
    """The optimized search's cost per head and setting: seconds, candidate evaluations, dims ranked.

    Args:
        calibration: the calibration set the searches ran on.
    """
    rows = [{"layer": pair[0], "head": pair[1], "fill": fill, "mode": mode, "objective": objective, "pool": pool,
             **cost} for (pair, fill, mode, objective, pool), cost in calibration.search_cost.items()]
    return pd.DataFrame(rows, columns=["layer", "head", "fill", "mode", "objective", "pool", "seconds", "candidates",
                                       "ranked"])


def beyond_bos_headline(table: pd.DataFrame, k: int, baseline: str = "bos_top/zero/none") -> dict:
    """The numbers notebook 07 leads with: per variant the median held-out frob_rel at k, the best variant and
    how it compares with the thesis' choice (``baseline``).

    Args:
        table: from :func:`variant_table`.
        k: the k of the headline.
        baseline: the variant label compared against.
    """
    table = _check(table, VARIANT + ["k", "frob_rel_q50"])
    at_k = table[table["k"] == k]
    if at_k.empty:
        raise InputError(f"The table has no rows at k={k}.")
    labels = at_k["policy"] + "/" + at_k["fill"] + "/" + at_k["calibration"]
    medians = dict(zip(labels, at_k["frob_rel_q50"].astype(float)))
    best = min(medians, key=medians.get)
    return {"k": int(k), "frob_rel_median_at_k": medians, "best_variant": best,
            "best_frob_rel_median": medians[best], "baseline_variant": baseline,
            "baseline_frob_rel_median": medians.get(baseline)}


__all__ = ["beyond_bos_headline", "dims_overlap", "search_cost_table", "spread_heads", "variant_labels",
           "variant_table"]
