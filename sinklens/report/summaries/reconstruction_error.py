"""Notebook 04's summary: attention reconstruction error against k for every sink-specialized head (BOS dims
against the controls), the smallest k per threshold, the model-level loss at k, with the headline numbers."""

from __future__ import annotations

import pandas as pd

from ...core.loading import model_info
from ...core.validate import check_frame


def k_sweep_headline(quantiles: pd.DataFrame, smallest: pd.DataFrame, model_level: pd.DataFrame, k: int,
                     threshold: float) -> dict:
    """The numbers a report leads with for a k sweep: per policy the median error at ``k``, the smallest k
    whose median is below ``threshold`` (policies without a pattern error left out) and the mean d_loss of
    the model-level sweep at k.

    Args:
        quantiles: from :func:`sinklens.error_quantiles`.
        smallest: from :func:`sinklens.smallest_k`.
        model_level: a ``level="model"`` :func:`sinklens.k_sweep` frame at ``k``.
        k: the k the headline is at.
        threshold: one of the thresholds ``smallest`` was computed for.
    """
    check_frame(quantiles, ["policy", "k", "q50"], "quantiles", "sinklens.error_quantiles")
    check_frame(smallest, ["policy", "threshold", "k"], "smallest", "sinklens.smallest_k")
    check_frame(model_level, ["policy", "d_loss"], "model_level", "sinklens.k_sweep(..., level='model')")
    at_k = quantiles[quantiles["k"] == k].set_index("policy")["q50"].dropna()
    first_below = smallest[smallest["threshold"] == threshold].set_index("policy")["k"].reindex(at_k.index)
    return {"frob_rel_median_at_k": at_k.to_dict(), f"smallest_k_median_below_{threshold}": first_below.to_dict(),
            "d_loss_at_k": model_level.groupby("policy")["d_loss"].mean().to_dict()}


def reconstruction_error_summary(model, *, quantiles: pd.DataFrame, smallest: pd.DataFrame,
                                 model_level: pd.DataFrame, k: int, threshold: float, sink_heads: list,
                                 heads_record: dict, params_zeroed: dict, prepend_bos: bool, probe: dict | None = None,
                                 parameters: dict | None = None) -> dict:
    """Everything notebook 04 writes to ``reconstruction_error.json``, as a JSON-ready dict with its ``headline``.

    Args:
        model: the bridge (model info).
        quantiles: :func:`sinklens.error_quantiles` of the layer-level sweep.
        smallest: :func:`sinklens.smallest_k` of the same sweep.
        model_level: the model-level :func:`sinklens.k_sweep` frame at ``k`` (every sink-specialized head pruned).
        k: the k the headline is at.
        threshold: the error threshold the headline's smallest k is for.
        sink_heads: the sink-specialized ``(layer, head)`` pairs.
        heads_record: where they came from (the run's head list record).
        params_zeroed: the Q/K parameters zeroed when all of them are pruned at k (``handle.params_zeroed()``).
        prepend_bos: whether the probe prompts start with BOS.
        probe: the provenance of the probe prompts.
        parameters: the notebook's checked parameters.
    """
    at_k = model_level.drop_duplicates(["policy", "seed"])[["policy", "k", "seed", "next_kl", "loss", "d_loss"]]
    return {"model": model_info(model).as_dict(), "parameters": parameters, "prepend_bos": prepend_bos,
            "probe": probe, "n_sink_heads": len(sink_heads), "sink_heads": [list(h) for h in sink_heads],
            "heads": heads_record, "level": "layer", "frob_rel_quantiles_at_k": quantiles.to_dict(orient="records"),
            "smallest_k": smallest.to_dict(orient="records"), "model_level_at_k": at_k.to_dict(orient="records"),
            "params_zeroed_all_sink_heads_at_k": params_zeroed,
            "headline": {"k": k, "n_sink_heads": len(sink_heads),
                         **k_sweep_headline(quantiles, smallest, model_level, k, threshold),
                         "qk_params_zeroed_share": params_zeroed["share"]}}
