"""Notebook 07's summary: kept dims beyond the BOS top-k (the variants' held-out errors against k, the optimized
search in and out of sample, the overlap with the BOS dims, the model-level loss) and the layer selection of the
best variant against ``bos_top``, with the headline numbers."""

from __future__ import annotations

from collections.abc import Mapping

import pandas as pd

from ...assess.beyond_bos import VARIANT, variant_frame, variant_labels
from ...assess.selection import LayerSelection
from ...core.errors import InputError
from ...core.loading import model_info
from ...core.validate import check_frame
from ...prune.calibration import CalibrationSet
from ...prune.spec import variant_label


def beyond_bos_headline(table: pd.DataFrame, k: int, baseline: str = "bos_top/zero/none") -> dict:
    """The numbers notebook 07 leads with: per variant the median held-out frob_rel at k, the best variant and
    how it compares with the thesis' choice (``baseline``).

    Args:
        table: from :func:`sinklens.assess.beyond_bos.variant_table`.
        k: the k of the headline.
        baseline: the variant label compared against.
    """
    table = variant_frame(table, VARIANT + ["k", "frob_rel_q50"])
    at_k = table[table["k"] == k]
    if at_k.empty:
        raise InputError(f"The table has no rows at k={k}.")
    labels = [variant_label(p, f, t) for p, f, t in at_k[VARIANT].itertuples(index=False)]
    medians = dict(zip(labels, at_k["frob_rel_q50"].astype(float)))
    best = min(medians, key=medians.get)
    return {"k": int(k), "frob_rel_median_at_k": medians, "best_variant": best,
            "best_frob_rel_median": medians[best], "baseline_variant": baseline,
            "baseline_frob_rel_median": medians.get(baseline)}


def selection_headline(comparison: pd.DataFrame, best: str, baseline: str = "bos_top/zero/none") -> dict:
    """The layer-selection numbers notebook 07 leads with (the comparison's first target): for the best variant and
    the baseline, the heads QK-pruned and the Q/K parameters zeroed by the largest set meeting the
    target (0 when none meets it).

    Args:
        comparison: from :func:`sinklens.assess.beyond_bos.selection_comparison`.
        best: the best variant's label (:func:`sinklens.prune.spec.variant_label` of ``best_variant``).
        baseline: the baseline's label.
    """
    comparison = check_frame(comparison, ["variant", "target", "n_heads", "params_zeroed"], "comparison",
                             "sinklens.assess.beyond_bos.selection_comparison")
    first = comparison[comparison["target"] == comparison["target"].iloc[0]].set_index("variant")
    missing = sorted({best, baseline} - set(first.index))
    if missing:
        raise InputError(f"The comparison has no rows for variants {missing} (it has {sorted(first.index)}).")
    return {"selection_heads_bos_top": int(first.loc[baseline, "n_heads"]),
            "selection_heads_best": int(first.loc[best, "n_heads"]),
            "selection_params_bos_top": int(first.loc[baseline, "params_zeroed"]),
            "selection_params_best": int(first.loc[best, "params_zeroed"])}


def beyond_bos_summary(model, *, k: int, variants: pd.DataFrame, variants_all_heads: pd.DataFrame,
                       optimized_in_sample: pd.DataFrame, overlap: pd.DataFrame, model_level: pd.DataFrame,
                       search_cost: pd.DataFrame, selections: Mapping[str, LayerSelection],
                       selection_table: pd.DataFrame, best: dict, target_retention: float, selection_strategy: str,
                       calibration: CalibrationSet, heads: list, n_sink_heads: int, heads_from: str,
                       splits: dict, parameters: dict | None = None) -> dict:
    """Everything notebook 07 writes to ``beyond_bos_dims.json``, as a JSON-ready dict with its ``headline``.

    Args:
        model: the bridge (model info).
        k: the k of the headline.
        variants: :func:`sinklens.assess.beyond_bos.variant_table` of the compared heads (the search included).
        variants_all_heads: the same table over every sink-specialized head (the variants without a search).
        optimized_in_sample: the optimized search's table fitted and measured on the same prompts.
        overlap: :func:`sinklens.assess.beyond_bos.dims_overlap` of ``bos_top`` and ``optimized`` at k.
        model_level: the model-level :func:`sinklens.k_sweep` frame at k.
        search_cost: :func:`sinklens.assess.beyond_bos.search_cost_table` of the calibration set.
        selections: the layer selections by variant label.
        selection_table: :func:`sinklens.assess.beyond_bos.selection_comparison` of ``selections``.
        best: the best variant without a search (``best_variant``: policy, fill, temperature).
        target_retention: the retention the selections meet.
        selection_strategy: the selections' search strategy.
        calibration: the calibration set the variants were fitted on.
        heads: the compared ``(layer, head)`` pairs (the optimized search's sample).
        n_sink_heads: how many sink-specialized heads the model has.
        heads_from: where they came from.
        splits: the prompts the variants were fitted on and measured on.
        parameters: the notebook's checked parameters.
    """
    headline = beyond_bos_headline(variants_all_heads, k)  # every sink-specialized head, no search
    sample = beyond_bos_headline(variants, k)  # the compared heads, the optimized search included
    baseline_variant = headline.pop("baseline_variant")  # the headline holds its number; its name is the summary's
    in_sample = variant_frame(optimized_in_sample, ["k", "frob_rel_q50"])
    check_frame(overlap, ["share"], "overlap", "sinklens.assess.beyond_bos.dims_overlap")
    check_frame(search_cost, ["seconds"], "search_cost", "sinklens.assess.beyond_bos.search_cost_table",
                allow_empty=True)
    if not selections:
        raise InputError("selections is empty: pass the layer selections by variant label.")
    at_k = variant_labels(variant_frame(model_level, VARIANT + ["k", "next_kl", "loss", "d_loss"],
                                        "sinklens.k_sweep(..., level='model')"))
    summary = {
        "model": model_info(model).as_dict(), "parameters": parameters, "prepend_bos": True, "splits": splits,
        "calibration": calibration.as_dict(), "n_sink_heads": n_sink_heads, "heads_from": heads_from,
        "heads": [list(h) for h in heads], "variants": variants.to_dict(orient="records"),
        "overlap_at_k": overlap.to_dict(orient="records"), "baseline_variant": baseline_variant,
        "optimized_in_sample": in_sample.to_dict(orient="records"),
        "optimized_in_sample_best_at_k": float(in_sample.loc[in_sample["k"] == k, "frob_rel_q50"].min()),
        "variants_all_heads": variants_all_heads.to_dict(orient="records"),
        "selection": {"best_variant": best, "target_retention": target_retention, "strategy": selection_strategy,
                      "comparison": selection_table.to_dict(orient="records"),
                      "dense": next(iter(selections.values())).dense,
                      "cost": {label: s.cost for label, s in selections.items()}},
        "optimized_search_seconds_per_head": float(search_cost["seconds"].sum() / max(len(heads), 1)),
        "model_level_at_k": at_k.drop_duplicates("policy")[["policy", "k", "next_kl", "loss", "d_loss"]].to_dict(
            orient="records")}
    best_label = variant_label(best["policy"], best["fill"], best["temperature"])
    summary["headline"] = {**headline, "sample_best_variant": sample["best_variant"],
                           "sample_best_frob_rel_median": sample["best_frob_rel_median"],
                           "n_heads_compared": len(heads), "bos_optimized_overlap_mean": float(overlap["share"].mean()),
                           **selection_headline(selection_table, best_label)}
    return summary
