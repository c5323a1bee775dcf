"""Notebook 03's summary: one layer's sink-specialized heads QK-pruned at k, the per-head errors and the pruning
record, with the headline numbers."""

from __future__ import annotations

import pandas as pd

from ...core.loading import model_info
from ...core.validate import check_frame


def reconstruction_headline(errors: pd.DataFrame, n_sink_heads: int) -> dict:
    """The numbers a report leads with for one pruning: heads pruned (of ``n_sink_heads``), k, median
    frob_rel, mean alpha_0 dense and pruned, next-token KL, d_loss.

    Args:
        errors: a model-level :func:`sinklens.reconstruction_error` frame.
        n_sink_heads: the number of sink-specialized heads the pruned ones were taken from.
    """
    check_frame(errors, ["k", "frob_rel", "alpha0", "d_alpha0", "next_kl", "d_loss"], "errors",
                "sinklens.reconstruction_error(..., level='model')")
    return {"n_heads_pruned": len(errors), "n_sink_heads": n_sink_heads, "k": errors["k"].iloc[0],
            "frob_rel_median": errors["frob_rel"].median(), "alpha0_dense_mean": errors["alpha0"].mean(),
            "alpha0_pruned_mean": (errors["alpha0"] + errors["d_alpha0"]).mean(),
            "next_kl": errors["next_kl"].iloc[0], "d_loss": errors["d_loss"].iloc[0]}


def topk_pruning_summary(model, errors: pd.DataFrame, *, layer: int, heads: list, pruning: dict, sink_heads: dict,
                         n_sink_heads: int, prepend_bos: bool, probe: dict | None = None,
                         parameters: dict | None = None) -> dict:
    """Everything notebook 03 writes to ``topk_pruning.json``, as a JSON-ready dict with its ``headline``.

    Args:
        model: the bridge (model info).
        errors: the model-level :func:`sinklens.reconstruction_error` frame of the pruned heads.
        layer: the pruned layer.
        heads: the pruned ``(layer, head)`` pairs.
        pruning: the pruning handle's record (``handle.as_dict()``: spec, kept dims, edits).
        sink_heads: the record of the run's sink-specialized heads (where they came from).
        n_sink_heads: how many sink-specialized heads the model has.
        prepend_bos: whether the probe prompts start with BOS.
        probe: the provenance of the probe prompts.
        parameters: the notebook's checked parameters.
    """
    return {"model": model_info(model).as_dict(), "parameters": parameters, "prepend_bos": prepend_bos,
            "probe": probe, "sink_heads": sink_heads, "n_sink_heads": n_sink_heads, "layer": layer,
            "heads": [list(h) for h in heads], "pruning": pruning, "errors": errors.to_dict(orient="records"),
            "headline": {"layer": layer, **reconstruction_headline(errors, n_sink_heads=n_sink_heads)}}
