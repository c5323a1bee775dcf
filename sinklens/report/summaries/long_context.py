"""Notebook 06's summary: sinks against context length (the sweep of sdpa censuses), what the full census of one
long prompt found (non-first sinks, massive tokens), and the headline numbers."""

from __future__ import annotations

import pandas as pd

from ...core.errors import InputError
from ...core.loading import model_info
from ...measure.census import Census
from ...measure.long_context import first_keys_share, sink_heads_over_length, sink_rate_by_length
from ...measure.massive_tokens import MassiveTokens

HEADLINE_DETAILS = ("non_first_sinks", "non_first_sink_heads", "massive_positions", "massive_position_kinds")


def long_context_details(detail: Census, massive: MassiveTokens, model, view: tuple[int, int, object] | None = None,
                         threshold: float = 0.1, min_queries: int = 8) -> dict:
    """What the full census ``detail`` and the massive-token scan ``massive`` (same prompt) found: the non-first
    sinks (count, heads, median position), the massive (position, dim) pairs, their positions and carrier kinds,
    the saturated positions; with ``view = (layer, head, weights)`` (weights from
    :func:`sinklens.measure.lse_census.first_key_weights`, one prompt) that head's mean weight on the first keys."""
    if not isinstance(detail, Census) or not isinstance(massive, MassiveTokens):
        raise InputError("long_context_details needs a full Census (run_census(..., full=True)) and a MassiveTokens.")
    hits = detail.non_first_sinks(threshold, min_queries)
    pairs = massive.carriers(model)
    positions = pairs.drop_duplicates(["prompt", "position"])
    found = {"detail_length": int(detail.tokens.shape[1]), "non_first_sinks": len(hits),
             "non_first_sink_heads": int(hits.groupby(["layer", "head"]).ngroups) if len(hits) else 0,
             "non_first_sink_median_position": float(hits["position"].median()) if len(hits) else None,
             "massive_pairs": len(pairs), "massive_positions": len(positions),
             "massive_position_kinds": ",".join(f"{k}:{v}" for k, v in positions["kind"].value_counts().items()),
             "massive_saturated_positions": massive.saturated()}
    if view is not None:
        layer, head, weights = view
        found |= {"view_head": f"L{layer}H{head}", "view_first_keys_share": round(first_keys_share(weights), 4)}
    return found


def long_context_headline(sweep: pd.DataFrame, eps: float = 0.3, details: dict | None = None) -> dict:
    """Notebook 06's headline numbers: Sink^eps and the mean alpha_0 of the sink heads (alpha_0 > eps at the
    shortest length) at the shortest and longest length, the share of those heads still above eps at the
    longest, and from ``details`` (:func:`long_context_details`) the non-first sinks and massive positions."""
    followed = sink_heads_over_length(sweep, eps)
    rates = sink_rate_by_length(sweep, eps)
    overall = rates[rates["layer"] == -1].set_index("length")["sink_rate"]
    short, long = int(sweep["length"].min()), int(sweep["length"].max())
    at = {length: followed[followed["length"] == length] for length in (short, long)}
    head = {"lengths": f"{short}..{long}", "eps": eps, "n_sink_heads_at_shortest": len(at[short]),
            "sink_rate_pct_shortest": round(float(overall[short]), 2),
            "sink_rate_pct_longest": round(float(overall[long]), 2),
            "sink_heads_alpha0_shortest": _mean_or_none(at[short]["alpha_0"]),
            "sink_heads_alpha0_longest": _mean_or_none(at[long]["alpha_0"]),
            "sink_heads_still_above_eps_pct": _pct((at[long]["alpha_0"] > eps).mean()) if len(at[long]) else None}
    if details is not None:
        head |= {key: details[key] for key in HEADLINE_DETAILS}
    return head


def long_context_summary(model, sweep: pd.DataFrame, detail: Census, massive: MassiveTokens, *, eps: float = 0.3,
                         view: tuple[int, int, object] | None = None, probe: dict | None = None,
                         parameters: dict | None = None) -> dict:
    """Everything notebook 06 writes to ``long_context.json``, as a JSON-ready dict with its ``headline``.

    Args:
        model: the bridge (model info).
        sweep: :func:`sinklens.measure.long_context.length_sweep`'s table.
        detail: the full census (``run_census(..., engine="sdpa", full=True)``) of the one long prompt.
        massive: :func:`sinklens.massive_tokens` of the same prompt.
        eps: the sink threshold on alpha_0.
        view: ``(layer, head, weights)`` of the head whose first-key weights the notebook shows.
        probe: the provenance of the probe prompts (``sl.probe_provenance()`` with split, counts, lengths).
        parameters: the notebook's checked parameters.
    """
    details = long_context_details(detail, massive, model, view=view)
    return {"model": model_info(model).as_dict(), "parameters": parameters, "prepend_bos": True,
            "engine": detail.engine, "probe": probe, "details": details,
            "headline": long_context_headline(sweep, eps, details)}


def _mean_or_none(values: pd.Series) -> float | None:
    """The mean rounded to 4 decimals, or None for no values (JSON has no NaN)."""
    return round(float(values.mean()), 4) if len(values) else None


def _pct(share: float) -> float:
    """A share in [0, 1] as a percentage with one decimal (0.4567 -> 45.7)."""
    return round(float(share) * 100, 1)
