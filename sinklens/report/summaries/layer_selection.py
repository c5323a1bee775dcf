"""Notebook 05's summary: the layer selection (best configuration meeting the target, held-out), the largest
layer sets meeting each target, whole-head removal of the same heads, with the headline numbers."""

from __future__ import annotations

from collections.abc import Sequence

from ...assess.selection import LayerSelection
from ...core.validate import check_type
from ...prune.spec import parse_layers


def layer_selection_headline(selection: LayerSelection) -> dict:
    """The numbers a report leads with: the best configuration meeting the target (held-out), and whole-head
    removal of the same heads (``best_layers`` is the display form ``"15,16,22"``; the summary's ``best`` holds
    the list).

    Args:
        selection: a :class:`sinklens.LayerSelection`.
    """
    check_type(selection, LayerSelection, "selection")
    best = selection.best()
    out = {"metric": selection.metric, "target_retention": selection.target, "n_sink_heads": len(selection.heads),
           "n_configurations": int(len(selection.table))}
    if best is None:
        return out | {"best_layers": None}
    removal = selection.by_layer_set("head_removal")
    key = tuple(parse_layers(best["layers"]))  # the index of by_layer_set
    return out | {"best_layers": ",".join(map(str, key)), "best_n_heads": int(best["n_heads"]),
                  "best_params_zeroed": int(best["params_zeroed"]), "best_retention": float(best["retention"]),
                  "best_ci_low": float(best["ci_low"]), "best_ci_high": float(best["ci_high"]),
                  "head_removal_retention_same_heads": (float(removal.loc[[key], "retention"].iloc[0])
                                                        if key in removal.index else None)}


def layer_selection_summary(selection: LayerSelection, *, targets: Sequence[float], heads_from: str,
                            parameters: dict | None = None) -> dict:
    """Everything notebook 05 writes to ``layer_selection.json``, as a JSON-ready dict with its ``headline``.

    Args:
        selection: the :class:`sinklens.LayerSelection` of the notebook.
        targets: the retentions whose largest meeting layer sets are listed.
        heads_from: where the sink-specialized heads came from (a head list file, or "measured").
        parameters: the notebook's checked parameters.
    """
    check_type(selection, LayerSelection, "selection")
    best = selection.best()
    return {"best": None if best is None else best.to_dict(),
            "largest_meeting": selection.largest_meeting(targets).to_dict("records"), "dense": selection.dense,
            "heads": selection.heads, "heads_from": heads_from, "dims": selection.dims,
            "settings": selection.settings, "cost": selection.cost, "parameters": parameters,
            "headline": layer_selection_headline(selection)}
