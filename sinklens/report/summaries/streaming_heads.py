"""Notebook 09's summary: streamed loss past the trained context, the per-KV-head streaming score against the sink
measures, the measured KV budget and StreamingLLM's ablations, with the headline numbers."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from ...assess.streaming import StreamingResult
from ...core.errors import InputError
from ...core.loading import model_info
from ...core.validate import check_frame

MIB = 2 ** 20


def curve_record(result: StreamingResult, n_ctx: int, common: tuple[int, int] | None = None) -> dict:
    """One streamed curve's settings and losses: over every position, past the trained context (positions >=
    ``n_ctx``; None when the text does not reach it) and over the ``common`` positions ``[start, stop)``.

    Args:
        result: from :func:`sinklens.streaming_perplexity`.
        n_ctx: the model's trained context.
        common: positions every compared curve covers and evicts in.
    """
    losses = result.losses
    past = losses[n_ctx:] if len(losses) > n_ctx else None
    record = {**result.as_dict(), "loss": float(losses.mean()),
              "loss_past_context": float(past.mean()) if past is not None else None,
              "ppl_past_context": float(np.exp(past.mean())) if past is not None else None}
    if common is not None:
        part = losses[common[0]:common[1]]
        record |= {"loss_common": float(part.mean()), "ppl_common": float(np.exp(part.mean()))}
    return record


def _ppl_by(table: pd.DataFrame, key: str) -> dict:
    return {str(int(row[key])): round(float(row["ppl_from"]), 4) for _, row in table.iterrows()}


def streaming_heads_headline(curves: dict, comparison: dict, budget: pd.DataFrame, sink_table: pd.DataFrame,
                             initial_table: pd.DataFrame) -> dict:
    """The headline numbers of notebook 09 (see :func:`streaming_heads_summary` for the arguments' meaning)."""
    head: dict = {}
    longest = max(curves.values(), key=lambda c: c["n_tokens"]) if curves else None
    if longest is not None:
        head["curve_tokens"] = longest["n_tokens"]
    for key, name in (("sink_window", "sink + window"), ("window_only", "window only")):
        if name in curves and curves[name]["ppl_past_context"] is not None:
            head[f"ppl_past_context_{key}"] = round(curves[name]["ppl_past_context"], 4)
    # the README's table keeps the first 12 numbers: the budget before the ablations (all are in the findings)
    head |= {"spearman_score_alpha0": comparison["spearman_alpha0"],
             "sink_groups_among_cheap": comparison["overlap"], "n_sink_groups": comparison["n_sink_groups"]}
    head["kv_heads_at_tolerance"] = {f"{t:g}": int(n) for t, n in zip(budget["tolerance"], budget["kv_heads"])}
    head["held_out_increase_at_tolerance"] = {f"{t:g}": round(float(v), 4)
                                              for t, v in zip(budget["tolerance"], budget["held_out_increase"])}
    head["ppl_by_sinks"] = _ppl_by(sink_table, "sink")
    head["spearman_score_non_first"] = comparison["spearman_non_first"]
    by_initial = {row["initial"]: round(float(row["ppl_from"]), 4) for _, row in initial_table.iterrows()}
    head["ppl_by_initial"] = by_initial
    return head


def streaming_heads_summary(model, *, curves: Mapping[str, StreamingResult], scores: pd.DataFrame,
                            comparison: dict, budget: pd.DataFrame, sink_table: pd.DataFrame,
                            window_table: pd.DataFrame, initial_table: pd.DataFrame, heads_from: str = "",
                            n_sink_heads: int | None = None, settings: dict | None = None,
                            probe: dict | None = None, parameters: dict | None = None) -> dict:
    """Everything notebook 09 writes to ``streaming_heads.json``, as a JSON-ready dict with its ``headline``.

    Args:
        model: the bridge (model info, context).
        curves: ``{label: StreamingResult}``; labels ``"dense"``, ``"window only"``, ``"sink + window"`` (with the
            position shift) and ``"sink + window, no shift"`` are read by the headline and the findings.
        scores: :func:`sinklens.streaming_head_scores`.
        comparison: :func:`sinklens.compare_with_sinks`.
        budget: :func:`sinklens.kv_budget` (one row per tolerance).
        sink_table, window_table, initial_table: :func:`sinklens.streaming_ablation` over sink counts, windows and
            the kept initial tokens.
        heads_from: where the sink-specialized heads came from (the run's list or measured).
        n_sink_heads: how many there are.
        settings: the settings of the score, the curves and the ablations (sink, windows, lengths).
        probe: the provenance of the probe text.
        parameters: the notebook's checked parameters.
    """
    check_frame(scores, ["layer", "kv_head", "score"], "scores", "sinklens.streaming_head_scores")
    check_frame(budget, ["tolerance", "kv_heads", "held_out_increase", "saved_bytes"], "budget", "sinklens.kv_budget")
    for name, table in (("sink_table", sink_table), ("window_table", window_table),
                        ("initial_table", initial_table)):
        check_frame(table, ["initial", "sink", "window", "ppl_from"], name, "sinklens.streaming_ablation")
    if not curves:
        raise InputError("curves is empty: pass {label: streaming_perplexity(...)}.")
    info = model_info(model)
    evicting = [r.sink + r.window + 1 for r in curves.values() if r.meta.get("evicts")]
    common = (max(evicting, default=0), min(len(r.losses) for r in curves.values()))
    records = {name: curve_record(r, info.n_ctx, common if common[0] < common[1] else None)
               for name, r in curves.items()}
    kv = budget.drop(columns=[c for c in ("context",) if c in budget]).assign(
        saved_mib=budget["saved_bytes"] / MIB, cache_mib=budget["cache_bytes"] / MIB,
        llama2_7b_saved_gib=budget["llama2_7b_saved_bytes"] / 2 ** 30,
        llama2_7b_cache_gib=budget["llama2_7b_cache_bytes"] / 2 ** 30)
    ranked = scores.sort_values("score")
    return {"model": info.as_dict(), "parameters": parameters, "probe": probe, "settings": settings or {},
            "heads_from": heads_from, "n_sink_heads": n_sink_heads, "curves": records,
            "common_positions": list(common),
            "scores": {"n_kv_heads": len(scores), "median": float(scores["score"].median()),
                       "min": float(ranked["score"].iloc[0]), "max": float(ranked["score"].iloc[-1]),
                       "cheapest": [int(ranked["layer"].iloc[0]), int(ranked["kv_head"].iloc[0])],
                       "dearest": [int(ranked["layer"].iloc[-1]), int(ranked["kv_head"].iloc[-1])],
                       "dense_loss": float(scores["dense_loss"].iloc[0]) if "dense_loss" in scores else None},
            "comparison": comparison, "kv_budget": kv.to_dict(orient="records"),
            "kv_context": int(budget["context"].iloc[0]) if "context" in budget and len(budget) else None,
            "sink_table": sink_table.to_dict(orient="records"), "window_table": window_table.to_dict(orient="records"),
            "initial_table": initial_table.to_dict(orient="records"),
            "headline": streaming_heads_headline(records, comparison, budget, sink_table, initial_table)}


__all__ = ["curve_record", "streaming_heads_headline", "streaming_heads_summary"]
