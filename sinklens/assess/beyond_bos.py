"""Summaries of the kept-dims comparison beyond the BOS dims (notebook 07): per-variant quantiles, overlaps, headline,
the best variant and the layer selections it is compared with ``bos_top`` in.

A variant is one (policy, fill, temperature) of a :func:`sinklens.k_sweep` frame; its label is
``policy/fill/temperature`` or ``policy/fill/none`` (e.g. ``optimized/mean/temperature``), built by
:func:`sinklens.prune.spec.variant_label` (``PruneSpec.variant_label``). Frames written before the vocabulary change
(a ``calibration`` column of ``"none"``/``"temperature"``) are read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from jaxtyping import Int
from torch import Tensor

from ..core.errors import InputError
from ..core.validate import check_fraction, check_frame, check_int
from ..prune.calibration import CalibrationSet
from ..prune.spec import Head, old_temperature, parse_heads, parse_layers
from ..prune.spec import variant_label as label_of
from .selection import LayerSelection

VARIANT = ["policy", "fill", "temperature"]
BASELINE = {"policy": "bos_top", "fill": "zero", "temperature": False}  # the thesis' choice


def variant_frame(frame, columns: Sequence[str], source: str = "sinklens.k_sweep") -> pd.DataFrame:
    """``frame`` checked for ``columns`` (:func:`sinklens.core.validate.check_frame`), with a ``temperature`` column
    read from the ``calibration`` column of a frame written before the vocabulary change.

    Args:
        frame: a k sweep, or a table built from one.
        columns: the columns the caller needs.
        source: the function that returns such a frame, for the message.
    """
    if isinstance(frame, pd.DataFrame) and "temperature" not in frame.columns and "calibration" in frame.columns:
        frame = frame.copy()  # written before the vocabulary change: calibration "none"/"temperature"
        frame["temperature"] = [None if pd.isna(v) else old_temperature(v, "the frame's calibration column")
                                for v in frame.pop("calibration")]
    return check_frame(frame, columns, "the table", source)


def variant_labels(sweep: pd.DataFrame) -> pd.DataFrame:
    """A copy of a k_sweep frame whose ``policy`` column holds the variant label (:func:`variant_label`; whole-head
    removal keeps its name), for figures that draw one line per policy.

    Args:
        sweep: a :func:`sinklens.k_sweep` frame.
    """
    sweep = variant_frame(sweep, VARIANT).copy()
    fitted = sweep["fill"].notna()
    sweep.loc[fitted, "policy"] = [label_of(p, f, t) for p, f, t in sweep.loc[fitted, VARIANT].itertuples(index=False)]
    return sweep


def variant_table(sweep: pd.DataFrame, ks: Sequence[int], metrics: Sequence[str] = ("frob_rel", "kl")) -> pd.DataFrame:
    """Median and 10/90 % quantiles over heads of each metric, per variant and k: one row per (variant, k).

    Args:
        sweep: a :func:`sinklens.k_sweep` frame (whole-head rows are left out).
        ks: the ks tabulated.
        metrics: the error columns summarised.
    """
    sweep = variant_frame(sweep, VARIANT + ["k", *metrics])
    part = sweep[sweep["fill"].notna() & sweep["k"].isin(list(ks))]
    if part.empty:
        raise InputError(f"The sweep has no pruning rows at ks={list(ks)}.")
    grouped = part.groupby(VARIANT + ["k"])
    table = pd.concat({f"{metric}_{name}": grouped[metric].quantile(q) for metric in metrics
                       for name, q in (("q10", 0.1), ("q50", 0.5), ("q90", 0.9))}, axis=1)
    table["n_heads"] = grouped.size()
    return table.reset_index()


def variant_label(variant: Mapping) -> str:
    """The label of a variant mapping (``policy/fill/temperature`` or ``policy/fill/none``, built by
    :func:`sinklens.prune.spec.variant_label`).

    Args:
        variant: a mapping with ``policy``, ``fill`` and ``temperature`` (e.g. from :func:`best_variant`; a former
            ``calibration`` key is read).
    """
    variant = dict(variant)
    if "temperature" not in variant and "calibration" in variant:
        variant["temperature"] = old_temperature(variant.pop("calibration"), "variant")
    missing = [name for name in VARIANT if name not in variant]
    if missing:
        raise InputError(f"A variant needs {VARIANT}, this one lacks {missing}.")
    return label_of(variant["policy"], variant["fill"], variant["temperature"])


def best_variant(table: pd.DataFrame, k: int) -> dict:
    """The variant with the lowest median frob_rel at ``k`` (ties: the first in policy, fill, temperature order, as
    :func:`beyond_bos_headline`): ``{"policy", "fill", "temperature"}``, the fields of the
    :meth:`PruneSpec.template <sinklens.prune.spec.PruneSpec.template>` that prunes with it.

    Args:
        table: from :func:`variant_table`.
        k: the k compared at.
    """
    table = variant_frame(table, VARIANT + ["k", "frob_rel_q50"])
    at_k = table[(table["k"] == k) & table["frob_rel_q50"].notna()]
    if at_k.empty:
        raise InputError(f"The table has no median frob_rel at k={k} (its ks: {sorted(table['k'].unique())}).")
    best = at_k.sort_values(["frob_rel_q50", *VARIANT], kind="stable").iloc[0]
    return {"policy": str(best["policy"]), "fill": str(best["fill"]), "temperature": bool(best["temperature"])}


def selection_comparison(selections: Mapping[str, LayerSelection], targets: Sequence[float]) -> pd.DataFrame:
    """Per variant and target, the held-out layer set with the most QK-pruned heads meeting the target
    (:meth:`LayerSelection.best`): its layers, heads, Q/K parameters zeroed, retention and CI, or
    ``meets=False`` with ``layers=None`` (no heads, no parameters) when no confirmed set meets it. Layers are lists of
    ints and heads ``[layer, head]`` lists.

    Args:
        selections: layer selections by variant label (same k, heads, evaluation and strategies).
        targets: the retentions to meet.
    """
    if not isinstance(selections, Mapping) or not selections:
        raise InputError("selections must be a non-empty mapping {variant label: sinklens.LayerSelection}.")
    targets = [check_fraction("target", t, open_low=True) for t in targets]
    if not targets:
        raise InputError("targets is empty: pass at least one retention to meet (e.g. [0.91]).")
    rows = []
    for label, selection in selections.items():
        if not isinstance(selection, LayerSelection):
            raise InputError(f"selections[{label!r}] must be a sinklens.LayerSelection, got "
                             f"{type(selection).__name__}.")
        spec = selection.settings["spec"]
        for target in targets:
            best = selection.best(target)
            temperature = spec["temperature"] if "temperature" in spec else old_temperature(
                spec.get("calibration") or "none", "the selection's spec")
            row = {"variant": label, "policy": spec["policy"], "fill": spec["fill"], "temperature": temperature,
                   "k": spec["k"],
                   "metric": selection.metric, "target": target, "n_candidate_heads": len(spec["heads"]),
                   "meets": best is not None}
            if best is None:
                row |= {"layers": None, "n_layers": 0, "n_heads": 0, "heads": [], "params_zeroed": 0,
                        "params_share": 0.0, "retention": np.nan, "ci_low": np.nan, "ci_high": np.nan,
                        "strategy": None}
            else:
                row |= {"layers": parse_layers(best["layers"]), "n_layers": int(best["n_layers"]),
                        "n_heads": int(best["n_heads"]), "heads": [list(p) for p in parse_heads(best["heads"])],
                        "params_zeroed": int(best["params_zeroed"]), "params_share": float(best["params_share"]),
                        "retention": float(best["retention"]), "ci_low": float(best["ci_low"]),
                        "ci_high": float(best["ci_high"]), "strategy": best["strategy"]}
            rows.append(row)
    return pd.DataFrame(rows)


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


__all__ = ["BASELINE", "VARIANT", "best_variant", "dims_overlap", "search_cost_table", "selection_comparison",
           "spread_heads", "variant_frame", "variant_label", "variant_labels", "variant_table"]
