"""Notebook 08's summary: the attention-calibration (ACT) head search, its held-out gains against ACT's own recipe,
the sinks the calibration leaves, and QK pruning, whole-head removal and calibration of the same heads side by side,
with the headline numbers."""

from __future__ import annotations

import math

import pandas as pd

from ...assess.calibration_search import ACT_RECIPE, KEPT, CalibrationSearch
from ...core.validate import check_frame, check_type


def _number(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _held_out_gain(search: CalibrationSearch, configuration: str) -> dict:
    """The search metric's held-out gain of one configuration with its interval (None when not evaluated)."""
    rows = search.held_out(configuration)
    rows = rows[rows["metric"] == search.metric]
    if rows.empty:
        return {"gain": None, "gain_low": None, "gain_high": None}
    row = rows.iloc[0]
    return {"gain": _number(row["gain"]), "gain_low": _number(row["gain_low"]), "gain_high": _number(row["gain_high"])}


def attention_calibration_headline(search: CalibrationSearch, census: pd.DataFrame,
                                   comparison: pd.DataFrame) -> dict:
    """The numbers a report leads with: candidates and kept heads, the held-out gain of the search metric for the
    kept heads and for ACT's recipe (with the lower ends of their intervals), what the calibration does to the sinks
    of the shown heads, and the retention of QK pruning, removal and pruning plus calibration of the same heads.

    Args:
        search: the notebook's :class:`~sinklens.assess.calibration_search.CalibrationSearch`.
        census: its :func:`~sinklens.assess.calibration_effects.calibration_census` table.
        comparison: its :func:`~sinklens.assess.calibration_effects.calibration_comparison` table.
    """
    check_type(search, CalibrationSearch, "search")
    census = check_frame(census, ["alpha0_change", "non_first_before", "non_first_after"], "census",
                         "calibration_census")
    comparison = check_frame(comparison, ["method", "retention"], "comparison", "calibration_comparison")
    kept, recipe = _held_out_gain(search, KEPT), _held_out_gain(search, ACT_RECIPE)
    by_method = comparison.set_index("method")["retention"]
    return {"n_head_candidates": int(search.cost["n_candidates"]), "n_kept_heads": len(search.kept),
            "kept_gain": kept["gain"], "kept_gain_low": kept["gain_low"],
            "act_recipe_gain": recipe["gain"], "act_recipe_gain_low": recipe["gain_low"],
            "alpha0_change": _number(census["alpha0_change"].mean()),
            "non_first_sinks_before": _number(census["non_first_before"].mean()),
            "non_first_sinks_after": _number(census["non_first_after"].mean()),
            "same_heads_qk_retention": _number(by_method["qk"]),
            "same_heads_removal_retention": _number(by_method["head_removal"]),
            "same_heads_qk_calibration_retention": _number(by_method["qk+calibration"])}


def attention_calibration_summary(search: CalibrationSearch, *, census: pd.DataFrame, comparison: pd.DataFrame,
                                  layer_set: dict, heads_from: str, n_sink_heads: int,
                                  parameters: dict | None = None) -> dict:
    """Everything notebook 08 writes to ``attention_calibration.json``, as a JSON-ready dict with its ``headline``.

    Args:
        search: the :class:`~sinklens.assess.calibration_search.CalibrationSearch` of the notebook.
        census: the census of the shown heads without and with calibration (``calibration_census``).
        comparison: pruning, removal and calibration of the same heads (``calibration_comparison``).
        layer_set: the compared heads' description (``sinklens.series.head_list.LayerSet.as_dict()``).
        heads_from: where the sink-specialized heads came from (a head list file, or "measured").
        n_sink_heads: how many sink-specialized heads the run has.
        parameters: the notebook's checked parameters.
    """
    headline = attention_calibration_headline(search, census, comparison)
    held_out = search.combined[search.combined["split"] == "held_out"]
    mass = search.mass[search.mass["candidate"].astype(bool)] if len(search.mass) else search.mass
    return {"metric": search.metric, "kept": [list(h) for h in search.kept],
            "candidates": search.settings.get("candidates"), "mass_screen": mass.to_dict("records"),
            "n_screened_layers": int(search.cost["n_screened_layers"]),
            "screened_layers": search.layers.to_dict("records"), "heads": search.heads.to_dict("records"),
            "held_out": held_out.to_dict("records"), "dense": search.dense, "cost": search.cost,
            "census": census.to_dict("records"), "comparison": comparison.to_dict("records"), "layer_set": layer_set,
            "heads_from": heads_from, "n_sink_heads": n_sink_heads, "settings": search.settings,
            "parameters": parameters, "headline": headline}
