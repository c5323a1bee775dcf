"""Notebook 01's summary (:func:`sink_discovery_summary`) and the census readings it and notebooks 02 and 06
show: the strongest sink head, which first token the prompts used, the non-first sinks by token, the
with/without-BOS verdict."""

from __future__ import annotations

import pandas as pd
import torch

from ...core.errors import InputError
from ...core.loading import model_info
from ...core.tokens import TokenBatch, token_strings
from ...core.validate import check_fraction
from ...measure.census import CASE_AFTER_BOS, CASE_BOS, CASE_NO_BOS, Census
from ...measure.massive import MassiveActivations

# --- choosing heads -----------------------------------------------------------------------------


def strongest_sink_head(source: Census | pd.DataFrame) -> tuple[int, int]:
    """``(layer, head)`` with the highest mean BOS sink score: from a Census (mean alpha_0 over
    prompts) or a ``specialization_table`` (its ``mean`` column)."""
    if isinstance(source, Census):
        mean = source.sink_scores(0).mean(0)
        flat = int(torch.argmax(torch.nan_to_num(mean, nan=-1.0)))
        return source.layers[flat // mean.shape[1]], flat % mean.shape[1]
    if isinstance(source, pd.DataFrame) and {"layer", "head", "mean"} <= set(source.columns) and not source.empty:
        best = source.loc[source["mean"].idxmax()]
        return int(best["layer"]), int(best["head"])
    raise InputError("strongest_sink_head needs a Census or the DataFrame from sinklens.specialization_table "
                     f"(columns layer, head, mean), got {type(source).__name__}.")


# --- summaries of a census ----------------------------------------------------------------------


def first_token_record(model, batch: TokenBatch) -> dict:
    """Which token the prompts start with: whether BOS was prepended, the distinct first ids and their strings."""
    if not isinstance(batch, TokenBatch):
        raise InputError("batch must be a TokenBatch (from sinklens.probe_tokens or tokenize), got "
                         f"{type(batch).__name__}.")
    starts = batch.attention_mask.argmax(1)
    first = batch.tokens.gather(1, starts[:, None]).flatten().cpu()
    ids = sorted(set(first.tolist()))
    info = model_info(model)
    return {"prepend_bos": batch.prepend_bos, "bos_id": info.bos_id,
            "bos_string": None if info.bos_id is None else token_strings(model, [info.bos_id])[0],
            "first_ids": ids[:20], "n_distinct_first_ids": len(ids),
            "first_strings": token_strings(model, ids[:20])}


def non_first_summary(census: Census, model=None, threshold: float = 0.1, min_queries: int = 8,
                      top_heads: int = 5) -> pd.DataFrame:
    """Non-first sinks (``Census.non_first_sinks``) grouped by token: hits (prompt, head, position
    triples), distinct prompts and heads, positions, mean score and the heads hit most often.
    Token strings are decoded when ``model`` is given."""
    if not isinstance(census, Census):
        raise InputError(f"census must be a Census (from sinklens.run_census), got {type(census).__name__}.")
    hits = census.non_first_sinks(threshold, min_queries)
    columns = ["token_id", "token", "n_hits", "n_prompts", "n_heads", "positions", "mean_score", "top_heads"]
    if hits.empty:
        return pd.DataFrame(columns=columns)
    hits = hits.assign(label=[f"L{l}H{h}" for l, h in zip(hits["layer"], hits["head"])])
    rows = []
    for token_id, part in hits.groupby("token_id"):
        positions = sorted(set(part["position"].tolist()))
        heads = part["label"].value_counts().head(top_heads)
        rows.append({"token_id": int(token_id), "token": None, "n_hits": len(part),
                     "n_prompts": part["prompt"].nunique(), "n_heads": part["label"].nunique(),
                     "positions": " ".join(map(str, positions[:10])) + (" ..." if len(positions) > 10 else ""),
                     "mean_score": float(part["score"].mean()),
                     "top_heads": " ".join(f"{k}({v})" for k, v in heads.items())})
    frame = pd.DataFrame(rows, columns=columns).sort_values("n_hits", ascending=False, ignore_index=True)
    if model is not None:
        frame["token"] = token_strings(model, frame["token_id"].tolist())
    return frame


# case names written by sinklens.measure.census.first_token_comparison


def first_token_verdict(comparison: pd.DataFrame) -> dict:
    """Read a ``first_token_comparison`` table: overall sink rate and mean alpha per case, and a verdict.

    Rule (rates are Sink^eps over all heads): "position" when the first text token without BOS
    sinks at least half as often as BOS does and the same token behind BOS sinks less than half as
    often as without; "token" when without BOS it sinks less than half as often as BOS; else "mixed".
    """
    cases = (CASE_BOS, CASE_AFTER_BOS, CASE_NO_BOS)
    if not isinstance(comparison, pd.DataFrame) or not set(cases) <= set(comparison.get("case", [])):
        raise InputError(f"comparison must be the DataFrame from sinklens.first_token_comparison with cases {cases}.")
    overall = comparison.groupby("case")[["sink_rate", "mean_alpha"]].mean()
    rate = {case: float(overall.loc[case, "sink_rate"]) for case in cases}
    if rate[CASE_BOS] == 0 and rate[CASE_NO_BOS] == 0:
        verdict, text = "none", "Neither BOS nor the first text token is a sink at this eps."
    elif rate[CASE_NO_BOS] >= 0.5 * rate[CASE_BOS] and rate[CASE_AFTER_BOS] < 0.5 * rate[CASE_NO_BOS]:
        verdict, text = "position", ("The sink is positional: without BOS the first text token becomes the sink, "
                                     "and the same token behind BOS is not one.")
    elif rate[CASE_NO_BOS] < 0.5 * rate[CASE_BOS]:
        verdict, text = "token", "The sink follows the BOS token: without it, the first position sinks far less."
    else:
        verdict, text = "mixed", "Both the BOS token and the first position matter."
    return {"verdict": verdict, "explanation": text,
            "sink_rate_pct": rate, "mean_alpha": {case: float(overall.loc[case, "mean_alpha"]) for case in cases}}


def sink_discovery_summary(model, census: Census, massive: MassiveActivations, comparison: pd.DataFrame,
                           eps: float = 0.3, first_token: dict | None = None, probe: dict | None = None,
                           parameters: dict | None = None) -> dict:
    """The numbers notebook 01 reports, as a JSON-ready dict: Sink^eps overall and per layer, heads whose
    mean alpha_0 exceeds eps, the strongest head, massive dims by layer (resid basis, Sun et al.
    criterion), the with/without-BOS verdict, model info, the first token used, the probe set and
    the notebook parameters."""
    if not isinstance(census, Census) or not isinstance(massive, MassiveActivations):
        raise InputError("sink_discovery_summary needs a Census (run_census) and a MassiveActivations "
                         "(massive_activations).")
    check_fraction("eps", eps)
    mean_alpha = census.sink_scores(0).mean(0)
    dims = massive.massive_dims("resid")
    by_layer = {str(layer): sorted(int(d) for d in part["dim"]) for layer, part in dims.groupby("layer")}
    layer, head = strongest_sink_head(census)
    return {
        "model": model_info(model).as_dict(),
        "parameters": parameters,
        "prepend_bos": census.prepend_bos,
        "first_token": first_token,
        "probe": probe,
        "n_prompts": census.n_prompts,
        "eps": eps,
        "sink_rate_pct": census.sink_rate(eps),
        "sink_rate_by_layer_pct": {str(l): float(r) for l, r in zip(census.layers, census.sink_rate_by_layer(eps))},
        "n_heads": int(mean_alpha.numel()),
        "n_heads_mean_alpha0_above_eps": int((mean_alpha > eps).sum()),
        "strongest_head": {"layer": layer, "head": head,
                           "mean_alpha0": float(mean_alpha[census.layers.index(layer), head])},
        "massive_dims_by_layer": by_layer,
        "bos_comparison": first_token_verdict(comparison),
    }
